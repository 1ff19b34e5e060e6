"""The pure core: key references and lifecycle, verdicts, clock, caches. No I/O library here."""
