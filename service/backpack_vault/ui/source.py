"""What the operator page shows, and where a daemon gets it.

::

    UiSource      the Protocol the page reads (synchronous; the UI calls it in the thread pool)
    DaemonSource  a daemon's UiSource: keys and the change feed from Vault (cached briefly),
                  outstanding copies from the broker, leader, readiness, and an Activity
    Activity      the tally the worker API feeds: copies and signatures per worker identity
                  in the last hour, and the last check of each key on this replica
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from backpack_vault.config import Secret
from backpack_vault.core.clock import Clock, iso_utc
from backpack_vault.core.keys import KeyRecord, KeyRef
from backpack_vault.errors import NotPermitted, UnknownKey
from backpack_vault.vault.port import Change, ChangeFeed, TokenInfo

__all__ = [
    "ACTIVITY_WINDOW_S",
    "Activity",
    "ActivityRow",
    "DaemonSource",
    "Kind",
    "LastCheck",
    "Operator",
    "Readiness",
    "UiSource",
    "UiVault",
]

ACTIVITY_WINDOW_S: Final = 3600.0
OK: Final = "ok"
_UNKNOWN_IDENTITY: Final = "(token not recognised)"
_NO_KEY: Final = "-"  # the API's label for a key it never found

Kind = Literal["copy", "sign"]


# -- what the page shows -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Operator:
    """Who logged in: a name fit to show, and when their token expires (None: never)."""

    identity: str
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class ActivityRow:
    """One worker identity's copies and signatures in the window (refused ones apart)."""

    identity: str
    copies: int
    signatures: int
    refused: int
    keys: tuple[str, ...]
    last_at: float

    def as_dict(self) -> dict[str, object]:
        return {
            "identity": self.identity,
            "copies": self.copies,
            "signatures": self.signatures,
            "refused": self.refused,
            "keys": list(self.keys),
            "last_at": iso_utc(self.last_at),
        }


@dataclass(frozen=True, slots=True)
class LastCheck:
    """The last liveness check this replica ran on a key (checks run on the leader)."""

    at: float
    verdict: str
    reason: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"at": iso_utc(self.at), "verdict": self.verdict, "reason": self.reason}


class UiSource(Protocol):
    """What the page needs. Synchronous: the UI calls it in the thread pool.

    Each method may raise our errors (``VaultUnavailable``, ...); the page then
    shows that part as unavailable and the rest as usual.
    """

    def authorize(self, token: Secret) -> Operator:
        """The operator behind a token; NotAuthenticated (dead) or NotPermitted (no KV read)."""
        ...

    def keys(self) -> list[KeyRecord]: ...

    def outstanding(self) -> Mapping[str, int]:
        """Copies whose wrapping tokens have not expired, by key name."""
        ...

    def activity(self, now: float) -> list[ActivityRow]: ...

    def last_checks(self) -> Mapping[str, LastCheck]: ...

    def leader(self) -> str | None:
        """The replica holding the checks' leader lease, if any."""
        ...

    def health(self) -> Mapping[str, str]:
        """``{"vault": ..., "exchange": ...}``: ``"ok"`` or a word or two on what is wrong."""
        ...

    def history(self, limit: int) -> list[Change]:
        """The latest status changes, newest first."""
        ...


# -- Activity: the tally the API feeds -----------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    copies: int = 0
    signatures: int = 0
    refused: int = 0
    keys: set[str] = field(default_factory=set)
    last_at: float = 0.0


class Activity:
    """Copies and signatures per worker identity over the last hour; the last check per key.

    Thread-safe and bounded: counts live in one-minute buckets (so the window is
    an hour to the minute), at most ``max_identities`` identities per bucket and
    ``max_keys`` key names per identity are kept; the rest count as ``(other)``.
    """

    def __init__(
        self,
        *,
        window_s: float = ACTIVITY_WINDOW_S,
        bucket_s: float = 60.0,
        max_identities: int = 1000,
        max_keys: int = 32,
        max_checked: int = 10_000,
    ) -> None:
        self._bucket_s = bucket_s
        self._buckets_kept = max(1, round(window_s / bucket_s))
        self._max_identities = max_identities
        self._max_keys = max_keys
        self._max_checked = max_checked
        self._lock = threading.Lock()
        self._buckets: dict[int, dict[str, _Tally]] = {}
        self._checks: dict[str, LastCheck] = {}

    def record(self, identity: str, kind: Kind, key: str, *, ok: bool, now: float) -> None:
        """One copy (``kind="copy"``) or signature request and whether it was answered."""
        if kind not in ("copy", "sign"):
            raise ValueError(f"kind must be 'copy' or 'sign', not {kind!r}")
        name = identity or _UNKNOWN_IDENTITY
        index = int(now // self._bucket_s)
        with self._lock:
            self._prune(index)
            bucket = self._buckets.setdefault(index, {})
            if name not in bucket and len(bucket) >= self._max_identities:
                name = "(other)"
            tally = bucket.setdefault(name, _Tally())
            if not ok:
                tally.refused += 1
            elif kind == "copy":
                tally.copies += 1
            else:
                tally.signatures += 1
            if key and key != _NO_KEY and len(tally.keys) < self._max_keys:
                tally.keys.add(key)
            tally.last_at = max(tally.last_at, now)

    def checked(self, key: str, verdict: str, reason: str = "", *, now: float) -> None:
        """A liveness check of ``key`` ended with ``verdict`` (and ``reason``)."""
        with self._lock:
            if key not in self._checks and len(self._checks) >= self._max_checked:
                self._checks.pop(next(iter(self._checks)))
            self._checks[key] = LastCheck(now, verdict, reason)

    def summary(self, now: float) -> list[ActivityRow]:
        """Per identity over the window, the busiest first."""
        index = int(now // self._bucket_s)
        totals: dict[str, _Tally] = {}
        with self._lock:
            self._prune(index)
            for bucket in self._buckets.values():
                for name, tally in bucket.items():
                    total = totals.setdefault(name, _Tally())
                    total.copies += tally.copies
                    total.signatures += tally.signatures
                    total.refused += tally.refused
                    total.keys |= tally.keys
                    total.last_at = max(total.last_at, tally.last_at)
        rows = [
            ActivityRow(name, t.copies, t.signatures, t.refused, tuple(sorted(t.keys)), t.last_at)
            for name, t in totals.items()
        ]
        return sorted(rows, key=lambda r: (-(r.copies + r.signatures + r.refused), r.identity))

    def last_checks(self) -> dict[str, LastCheck]:
        with self._lock:
            return dict(self._checks)

    def _prune(self, index: int) -> None:
        oldest = index - self._buckets_kept + 1
        for stale in [i for i in self._buckets if i < oldest]:
            del self._buckets[stale]


# -- DaemonSource: the page's data in the daemon --------------------------------------------------


class UiVault(Protocol):
    """The part of ``VaultPort`` the page reads (``vault.client.Vault`` has it)."""

    def list_refs(self) -> list[KeyRef]: ...

    def read_record(self, ref: KeyRef) -> KeyRecord: ...

    def read_changes(self) -> ChangeFeed: ...

    def capabilities(self, token: Secret, paths: Sequence[str]) -> dict[str, frozenset[str]]: ...

    def lookup_caller(self, token: Secret) -> TokenInfo: ...


Readiness = Callable[[], "tuple[bool, Mapping[str, object]]"]
_READS: Final = frozenset({"read", "list"})


def _may_read(caps: frozenset[str]) -> bool:
    return "root" in caps or ("deny" not in caps and bool(caps & _READS))


class DaemonSource:
    """The :class:`UiSource` of a daemon, built from its parts. Thread-safe.

    Keys are re-read from Vault when the change feed moves (read at most every
    ``feed_cache_s``) or at the latest after ``keys_cache_s`` (a key added with
    the CLI publishes no change), so open pages cost Vault a few reads a second
    however many there are.
    """

    def __init__(
        self,
        vault: UiVault,
        *,
        kv_mount: str,
        kv_prefix: str,
        activity: Activity,
        outstanding: Callable[[], Mapping[KeyRef, int]],
        leader: Callable[[], str | None],
        readiness: Readiness,
        exchange: Callable[[], str] | None = None,
        clock: Clock = time.time,
        feed_cache_s: float = 1.0,
        keys_cache_s: float = 10.0,
    ) -> None:
        """``exchange`` says how Backpack is (``"ok"``, ``"maintenance"``...); without it,
        the last check this replica ran says."""
        self._vault = vault
        self.metadata_path = f"{kv_mount.strip('/')}/metadata/{kv_prefix.strip('/')}/*"
        self._activity = activity
        self._outstanding = outstanding
        self._leader = leader
        self._readiness = readiness
        self._exchange = exchange
        self._clock = clock
        self._feed_cache_s = feed_cache_s
        self._keys_cache_s = keys_cache_s
        self._lock = threading.Lock()
        self._feed: tuple[float, ChangeFeed] | None = None
        self._keys: tuple[float, int, list[KeyRecord]] | None = None

    def authorize(self, token: Secret) -> Operator:
        path = self.metadata_path
        if not _may_read(self._vault.capabilities(token, [path]).get(path, frozenset())):
            raise NotPermitted(
                "",
                "operator page",
                "this Vault token may not read key metadata: log in with a metadata-reader "
                f"or operator token (read or list on {path})",
            )
        info = self._vault.lookup_caller(token)
        return Operator(info.display_name or info.identity, info.expires_at)

    def _changes(self) -> ChangeFeed:
        now = self._clock()
        with self._lock:
            if self._feed is not None and now - self._feed[0] < self._feed_cache_s:
                return self._feed[1]
        feed = self._vault.read_changes()
        with self._lock:
            self._feed = (now, feed)
        return feed

    def keys(self) -> list[KeyRecord]:
        seq = self._changes().seq
        now = self._clock()
        with self._lock:
            cached = self._keys
            if cached is not None and cached[1] == seq and now - cached[0] < self._keys_cache_s:
                return list(cached[2])
        records: list[KeyRecord] = []
        for ref in self._vault.list_refs():
            try:
                records.append(self._vault.read_record(ref))
            except UnknownKey:  # deleted between the list and the read
                continue
        with self._lock:
            self._keys = (now, seq, records)
        return list(records)

    def outstanding(self) -> dict[str, int]:
        return {str(ref): count for ref, count in self._outstanding().items() if count}

    def activity(self, now: float) -> list[ActivityRow]:
        return self._activity.summary(now)

    def last_checks(self) -> dict[str, LastCheck]:
        return self._activity.last_checks()

    def leader(self) -> str | None:
        return self._leader()

    def health(self) -> dict[str, str]:
        return {"vault": self._vault_health(), "exchange": self._exchange_health()}

    def _vault_health(self) -> str:
        ready, details = self._readiness()
        vault, auth = str(details.get("vault", OK)), str(details.get("auth", OK))
        if vault != OK:
            return vault
        if auth != OK:
            return f"login {auth}"
        if not ready:
            missing = details.get("missing")
            names = [str(m) for m in missing] if isinstance(missing, list | tuple) else []
            return f"missing {', '.join(names)}" if names else "not ready"
        return OK

    def _exchange_health(self) -> str:
        if self._exchange is not None:
            return self._exchange()
        checks = self._activity.last_checks().values()
        if not checks:
            return "no checks on this replica"
        last = max(checks, key=lambda c: c.at)
        if last.verdict == "UNKNOWN":
            return last.reason or "unknown"
        return OK  # Backpack answered, whatever it said of the key

    def history(self, limit: int) -> list[Change]:
        return list(reversed(self._changes().entries[-limit:])) if limit > 0 else []
