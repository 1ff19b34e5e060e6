"""Backpack's side: the instruction table, sans-IO signing, and the daemon's own REST calls."""
