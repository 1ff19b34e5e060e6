"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import time

from backpack_vault.core.keys import KeyPair, KeyRecord, KeyRef, Origin, Status, generate_pair
from backpack_vault.vault.client import Vault

NOW = "2025-01-01T00:00:00+00:00"


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def store(
    vault: Vault,
    ref: KeyRef,
    *,
    read_only: bool = False,
    status: Status = Status.ACTIVE,
    pair: KeyPair | None = None,
) -> KeyPair:
    """Store a key as `keys add` would (a fresh pair unless one is given); return the pair."""
    pair = pair or generate_pair()
    record = KeyRecord(
        ref=ref,
        api_key=pair.api_key,
        read_only=read_only,
        status=status,
        origin=Origin.BACKPACK_UI,
        created_at=NOW,
        status_since=NOW,
    )
    vault.create_key(record, pair.secret)
    return pair
