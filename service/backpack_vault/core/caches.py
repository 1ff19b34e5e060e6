"""Small pure state, time passed in: a TTL cache, the ledger of unclaimed copies, a rate limiter.

None of these reads a clock: every method that needs the time takes ``now``
(epoch or monotonic seconds, as the caller chooses), so tests drive them with
plain numbers. None is thread-safe on its own: the owner holds its lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

__all__ = ["Ledger", "RateLimiter", "TTLCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DEFAULT_MAX_ENTRIES: Final = 10_000


class TTLCache(Generic[K, V]):
    """Entries that expire at a time given on ``put``; bounded in size.

    When full, expired entries go first, then the oldest half: a flood of
    made-up keys cannot grow it without bound.
    """

    __slots__ = ("_entries", "_max")

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._entries: dict[K, tuple[float, V]] = {}
        self._max = max_entries

    def get(self, key: K, *, now: float) -> V | None:
        """The value while ``now`` is before its expiry, else None (and the entry is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: K, value: V, *, until: float, now: float) -> None:
        if key not in self._entries and len(self._entries) >= self._max:
            self._make_room(now)
        self._entries[key] = (until, value)

    def pop(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        return None if entry is None else entry[1]

    def expire(self, *, now: float) -> list[K]:
        """Drop every expired entry; return their keys."""
        gone = [k for k, (until, _) in self._entries.items() if until <= now]
        for key in gone:
            del self._entries[key]
        return gone

    def clear(self) -> None:
        self._entries.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def _make_room(self, now: float) -> None:
        self.expire(now=now)
        if len(self._entries) >= self._max:
            for key in list(self._entries)[: len(self._entries) // 2]:
                del self._entries[key]


@dataclass(frozen=True, slots=True)
class _Claim:
    accessor: str
    expires_at: float


@dataclass(slots=True)
class Ledger(Generic[K]):
    """Accessors of wrapping tokens handed out and not yet expired, per key.

    Vault does not tell us when a copy is unwrapped, so an entry lives until its
    wrapping token's TTL ends; revoking an already unwrapped token is harmless.
    """

    _by_key: dict[K, deque[_Claim]] = field(default_factory=dict)

    def record(self, key: K, accessor: str, expires_at: float, *, now: float) -> None:
        """Note one copy; the key's oldest entries that expired go (all go in ``expired``).

        Entries mostly arrive in the order they expire (one TTL for every copy), so
        dropping from the left keeps a busy key's list short at O(1) per copy, where
        rebuilding it cost O(copies in flight) on every copy.
        """
        claims = self._by_key.get(key)
        if claims is None:
            claims = self._by_key[key] = deque()
        while claims and claims[0].expires_at <= now:
            claims.popleft()
        claims.append(_Claim(accessor, expires_at))

    def expired(self, *, now: float) -> list[tuple[K, str]]:
        """Forget and return every entry whose wrapping token has expired."""
        gone: list[tuple[K, str]] = []
        for key in list(self._by_key):
            keep: deque[_Claim] = deque()
            for claim in self._by_key[key]:
                if claim.expires_at > now:
                    keep.append(claim)
                else:
                    gone.append((key, claim.accessor))
            if keep:
                self._by_key[key] = keep
            else:
                del self._by_key[key]
        return gone

    def pop_key(self, key: K) -> list[str]:
        """Forget and return the accessors of every unclaimed copy of ``key``."""
        return [c.accessor for c in self._by_key.pop(key, ())]

    def keys(self) -> list[K]:
        return list(self._by_key)

    def count(self, key: K | None = None) -> int:
        if key is not None:
            return len(self._by_key.get(key, ()))
        return sum(len(claims) for claims in self._by_key.values())

    def __len__(self) -> int:
        return self.count()


class RateLimiter(Generic[K]):
    """A token bucket per key: ``rate`` requests per ``per`` seconds, refilled continuously.

    ``burst`` (default ``rate``) is the bucket's size. One report per key every
    10 s is ``RateLimiter(1, per=10)``; 120 probes a minute per sub-account is
    ``RateLimiter(120, per=60)``.
    """

    __slots__ = ("_buckets", "_burst", "_max", "_per_s")

    def __init__(
        self,
        rate: float,
        *,
        per: float = 60.0,
        burst: float | None = None,
        max_keys: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if rate <= 0 or per <= 0:
            raise ValueError("rate and per must be positive")
        self._per_s = rate / per
        self._burst = float(rate if burst is None else burst)
        self._buckets: dict[K, tuple[float, float]] = {}  # key -> (tokens, at)
        self._max = max_keys

    @property
    def burst(self) -> float:
        return self._burst

    def remaining(self, key: K, *, now: float) -> float:
        tokens, at = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + max(0.0, now - at) * self._per_s)

    def try_acquire(self, key: K, *, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` from the key's bucket; False (and take nothing) when it is short."""
        tokens = self.remaining(key, now=now)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            return False
        if key not in self._buckets and len(self._buckets) >= self._max:
            self._forget_full(now)
        self._buckets[key] = (tokens - cost, now)
        return True

    def retry_after(self, key: K, *, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` would be available (0 when it is now)."""
        short = cost - self.remaining(key, now=now)
        return max(0.0, short / self._per_s)

    def _forget_full(self, now: float) -> None:
        """Buckets that refilled completely hold no state worth keeping."""
        full = [k for k in self._buckets if self.remaining(k, now=now) >= self._burst]
        for key in full:
            del self._buckets[key]
