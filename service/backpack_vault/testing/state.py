"""The sandbox's whole state: keys, faults, the trading venue and request counts.

uvicorn's event loop and admin calls from Python's threads share one
:class:`SandboxState`; one lock guards all of it, and nothing mutable leaves
it (every answer is a fresh dict).
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from backpack_vault.core.keys import parse_api_key
from backpack_vault.testing.faults import Faults
from backpack_vault.testing.market import Fixture, load_fixture
from backpack_vault.testing.venue import Venue

__all__ = ["SandboxState"]

T = TypeVar("T")


@dataclass(slots=True)
class _Key:
    read_only: bool
    revoked: bool = False


@dataclass(slots=True)
class _Stats:
    routes: Counter[str] = field(default_factory=Counter)
    keys: dict[str, Counter[str]] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)
    faulted: int = 0
    total: int = 0


class SandboxState:
    """Keys, faults, the venue and request counts; every method is thread-safe.

    ``seed`` drives fault sampling and the made-up price history; ``fixture``
    (default: the shipped ``markets.json``) the markets and demo balances.
    """

    def __init__(self, *, seed: int = 0, fixture: Fixture | None = None) -> None:
        self._lock = threading.Lock()
        self.seed = seed
        self.fixture = fixture or load_fixture()
        self._rng = random.Random(seed)  # noqa: S311 - fault injection, not cryptography
        self._keys: dict[str, _Key] = {}
        self._faults = Faults()
        self._venue = Venue(self.fixture)
        self._stats = _Stats()

    # -- keys ---------------------------------------------------------------------------

    def register(self, api_key: str, *, read_only: bool = False) -> bool:
        """Accept a public key (again); True when it was not known before.

        A new key's account starts with the fixture's demo balances; a key registered
        again keeps its account.
        """
        api_key = parse_api_key(api_key)
        with self._lock:
            created = api_key not in self._keys
            self._keys[api_key] = _Key(read_only=read_only)
            self._venue.account(api_key)
        return created

    def revoke(self, api_key: str) -> bool:
        """Refuse a key from now on; False when it was never registered."""
        with self._lock:
            entry = self._keys.get(api_key.strip())
            if entry is None:
                return False
            entry.revoked = True
        return True

    def key(self, api_key: str) -> tuple[bool, bool] | None:
        """``(read_only, revoked)`` of a registered key, or None."""
        with self._lock:
            entry = self._keys.get(api_key)
            return None if entry is None else (entry.read_only, entry.revoked)

    def keys(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"api_key": k, "read_only": v.read_only, "revoked": v.revoked}
                for k, v in sorted(self._keys.items())
            ]

    # -- faults and counts --------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    def set_faults(self, faults: Faults) -> None:
        with self._lock:
            self._faults = faults

    def clear_faults(self) -> None:
        self.set_faults(Faults())

    def arrive(self, route: str, api_key: str | None) -> tuple[Faults, bool]:
        """Count a request; return the faults in force and whether this one is hit."""
        with self._lock:
            faults = self._faults
            self._stats.total += 1
            self._stats.routes[route] += 1
            if api_key:
                self._stats.keys.setdefault(api_key, Counter())[route] += 1
            hit = bool(faults.status or faults.latency_ms) and (
                faults.rate >= 1 or self._rng.random() < faults.rate
            )
            if hit:
                self._stats.faulted += 1
        return faults, hit

    def answered(self, route: str, status: int) -> None:
        with self._lock:
            self._stats.answers[f"{route} {status}"] += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self._stats
            return {
                "total": s.total,
                "faulted": s.faulted,
                "routes": dict(s.routes),
                "keys": {k: dict(v) for k, v in s.keys.items()},
                "answers": dict(s.answers),
            }

    def reset(self) -> None:
        """Forget keys, faults, accounts, orders, trades and counts; restore the house book;
        reseed the RNG."""
        with self._lock:
            self._rng = random.Random(self.seed)  # noqa: S311 - see __init__
            self._keys.clear()
            self._faults = Faults()
            self._venue = Venue(self.fixture)
            self._stats = _Stats()

    # -- the venue ----------------------------------------------------------------------

    def trading(self, action: Callable[[Venue], T]) -> T:
        """Run ``action`` on the venue under the lock; the venue itself is not thread-safe."""
        with self._lock:
            return action(self._venue)

    def balances(self, api_key: str) -> dict[str, dict[str, str]] | None:
        """The key's ``/api/v1/capital`` answer, or None when it is not registered."""
        with self._lock:
            if api_key not in self._keys:
                return None
            return self._venue.account(api_key).capital()

    def set_balances(
        self, api_key: str, balances: Mapping[str, str | int | Decimal]
    ) -> dict[str, dict[str, str]] | None:
        """Set the *available* amounts of some assets (locked funds stay as they are);
        None when the key is not registered. ValueError names a bad asset or amount."""
        amounts = self._amounts(balances)
        with self._lock:
            if api_key not in self._keys:
                return None
            return self._venue.set_balances(api_key, amounts)

    def _amounts(self, balances: Mapping[str, str | int | Decimal]) -> dict[str, Decimal]:
        known = {a["symbol"] for a in self.fixture.assets}
        amounts: dict[str, Decimal] = {}
        for asset, value in balances.items():
            if asset not in known:
                raise ValueError(
                    f"unknown asset {asset!r}; the sandbox has {', '.join(sorted(known))}"
                )
            amount = _amount(value)
            if amount is None:
                raise ValueError(f"{asset}: the amount must be a non-negative decimal string")
            amounts[asset] = amount
        return amounts


def _amount(value: object) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        return None
    try:
        amount = Decimal(value)
    except InvalidOperation:
        return None
    return amount if amount.is_finite() and amount >= 0 else None
