"""Helpers for tests of code that uses backpack-vault (ours included): a clock, a poll, keys."""

from __future__ import annotations

import time
from collections.abc import Callable

from backpack_vault.core.clock import iso_utc, wait_for
from backpack_vault.core.keys import (
    PRODUCTION_EXCHANGE,
    KeyPair,
    KeyRecord,
    KeyRef,
    Origin,
    Status,
    generate_pair,
    switch_patch,
)
from backpack_vault.core.rotation import NextKey, NextState, Role
from backpack_vault.vault.client import Vault

__all__ = [
    "NOW",
    "FakeClock",
    "make_record",
    "now_iso",
    "rotate_now",
    "store_key",
    "wait_until",
]

NOW = "2025-01-01T00:00:00Z"


class FakeClock:
    """A clock tests move by hand: ``clock()`` is epoch seconds, ``clock.advance(5)``."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> float:
    """Poll until ``condition`` holds and return the seconds it took; AssertionError after
    ``timeout``."""
    started = time.monotonic()
    if not wait_for(condition, timeout):
        raise AssertionError(f"{what}: not within {timeout:g} s")
    return time.monotonic() - started


def make_record(
    ref: KeyRef,
    api_key: str,
    *,
    status: Status = Status.ACTIVE,
    read_only: bool = False,
    origin: Origin = Origin.BACKPACK_UI,
    now: str = NOW,
    label: str = "",
    exchange: str = PRODUCTION_EXCHANGE,
) -> KeyRecord:
    """A key record as intake makes it, with ``status`` set (active unless told)."""
    record = KeyRecord.new(
        ref, api_key, origin=origin, now=now, read_only=read_only, label=label, exchange=exchange
    )
    if record.status is status:
        return record
    return KeyRecord(
        ref=record.ref,
        api_key=record.api_key,
        read_only=record.read_only,
        status=status,
        origin=record.origin,
        created_at=record.created_at,
        status_since=record.status_since,
        label=record.label,
        exchange=record.exchange,
    )


def store_key(
    vault: Vault,
    ref: KeyRef,
    *,
    status: Status = Status.ACTIVE,
    read_only: bool = False,
    pair: KeyPair | None = None,
    origin: Origin = Origin.BACKPACK_UI,
    exchange: str = PRODUCTION_EXCHANGE,
) -> KeyPair:
    """Store a key as ``keys add`` would (a fresh pair unless one is given); return the pair.

    ``exchange`` is the base URL the key belongs to: pass the sandbox's URL for a key
    that tests check against the sandbox.
    """
    pair = pair or generate_pair()
    record = make_record(
        ref, pair.api_key, status=status, read_only=read_only, origin=origin, exchange=exchange
    )
    vault.create_key(record, pair.secret)
    return pair


def now_iso() -> str:
    """Now, in the one timestamp format."""
    return iso_utc()


def rotate_now(vault: Vault, ref: KeyRef) -> KeyPair:
    """Rotate ``ref`` at once, as ``keys rotate`` and the daemon's switch do once Backpack
    accepts the successor (without asking it): a fresh pair becomes the name's key, the
    old one retiring, and ``rotated`` goes out on the change feed. Returns the new pair."""
    pair = generate_pair()
    now = now_iso()
    current = vault.read_record(ref)
    successor = NextKey(
        api_key=pair.api_key,
        role=Role.SUCCESSOR,
        state=NextState.READY,
        read_only=current.read_only,
        origin=Origin.GENERATED.value,
        created_at=now,
    )
    record = vault.store_next(ref, successor, pair.secret)
    patch = switch_patch(
        record, now=now, failover=False, safe_at=now, verdict="VALID", actor="test"
    )
    version = vault.write_next_pair(record, pair.secret)
    vault.finish_switch(ref, patch, event="rotated", at=now, version=version)
    return pair
