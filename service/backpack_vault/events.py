"""Status changes as events: whoever writes or observes a change emits it once.

::

    checks (a verdict changed the status)  --\
    broker (a read found a change made elsewhere) --> EventBus.emit --> broker (caches, ledger)
    rotation (a switch to the next key: KeyRotated) -/                --> metrics
                                                                      --> webhook alerts
                                                                      --> watchers

The daemon builds one :class:`EventBus` and subscribes its listeners. A listener
that fails is logged and skipped: one failing alert never stops the cascade.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass

from backpack_vault.core.keys import KeyRecord, KeyRef, Status
from backpack_vault.core.verdicts import CheckResult
from backpack_vault.logging import get_logger

__all__ = [
    "Cause",
    "CopiesRevoked",
    "Event",
    "EventBus",
    "KeyRotated",
    "KeyStatusChanged",
    "Listener",
    "PredecessorRetired",
]

log = get_logger("backpack_vault.events")


class Cause(enum.StrEnum):
    """Why a status changed."""

    CHECK = "check"  # a liveness check's verdict, written by this replica
    OBSERVED = "observed"  # a read found a status written elsewhere (CLI, another replica)
    DELETED = "deleted"  # the key is gone from Vault


@dataclass(frozen=True, slots=True)
class KeyStatusChanged:
    """``ref`` went from ``old`` (None: not known before) to ``new``."""

    ref: KeyRef
    old: Status | None
    new: Status
    cause: Cause
    record: KeyRecord | None = None  # the record after the change, when it was read
    result: CheckResult | None = None  # the check behind a ``CHECK`` change


@dataclass(frozen=True, slots=True)
class CopiesRevoked:
    """``count`` unclaimed wrapping tokens of ``ref`` were revoked at Vault."""

    ref: KeyRef
    count: int


@dataclass(frozen=True, slots=True)
class KeyRotated:
    """``ref`` now hands out ``new_api_key`` instead of ``old_api_key``.

    A rotation (the successor was accepted) leaves the old key retiring; a failover (the
    current key was revoked and its standby took over) leaves it revoked, and its
    unclaimed copies are revoked with it.
    """

    ref: KeyRef
    old_api_key: str
    new_api_key: str
    failover: bool
    cause: Cause
    record: KeyRecord | None = None  # the record after the switch, when it was read
    safe_at: str = ""  # a rotation: when deleting the old key in the web UI is safe


@dataclass(frozen=True, slots=True)
class PredecessorRetired:
    """The key ``ref`` replaced has no copy left: deleting it in the Backpack UI is safe."""

    ref: KeyRef
    api_key: str
    record: KeyRecord | None = None


Event = KeyStatusChanged | CopiesRevoked | KeyRotated | PredecessorRetired
Listener = Callable[[Event], None]


class EventBus:
    """Fans each event out to every listener, in subscription order, in the emitter's thread."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def emit(self, event: Event) -> None:
        with self._lock:
            listeners = list(self._listeners)
        if isinstance(event, KeyStatusChanged):
            log.info(
                "key.status_changed",
                key=str(event.ref),
                old=event.old.value if event.old else None,
                new=event.new.value,
                cause=event.cause.value,
            )
        elif isinstance(event, KeyRotated):
            log.info(
                "key.rotated",
                key=str(event.ref),
                api_key=event.new_api_key,
                previous=event.old_api_key,
                failover=event.failover,
                cause=event.cause.value,
            )
        for listener in listeners:
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - one listener must not stop the others
                # Not log.exception: a rendered traceback may show locals (records, secrets).
                log.error(  # noqa: TRY400
                    "events.listener_failed",
                    listener=getattr(listener, "__qualname__", repr(listener)),
                    error=type(exc).__name__,
                )
