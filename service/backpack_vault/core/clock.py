"""Time as the core sees it: a ``Clock`` is any callable returning epoch seconds.

There is one timestamp format in the project, ISO 8601 UTC to the second with a
``Z`` (``2025-01-31T12:00:00Z``): Vault metadata, copies' ``expires_at``, check
results and alerts all use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, Protocol

__all__ = ["ISO_FORMAT", "Clock", "iso_utc", "parse_iso", "wait_for"]

ISO_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"


class Clock(Protocol):
    """Epoch seconds now: ``time.time``, or a test's fake clock."""

    def __call__(self) -> float: ...


def iso_utc(epoch_s: float | None = None) -> str:
    """``epoch_s`` (default: now) as ISO 8601 UTC with a ``Z``, to the second."""
    return datetime.fromtimestamp(time.time() if epoch_s is None else epoch_s, UTC).strftime(
        ISO_FORMAT
    )


def parse_iso(text: str) -> float:
    """Epoch seconds of an ISO 8601 timestamp (``Z`` or an offset; naive means UTC)."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    *,
    every: float = 0.05,
    sleep: Callable[[float], object] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> bool:
    """Call ``condition`` until it holds (True) or ``timeout`` seconds pass (False).

    The one poll loop: ``sleep`` may be an ``Event.wait`` so a stop request ends the wait.
    """
    deadline = monotonic() + timeout
    while True:
        if condition():
            return True
        if monotonic() >= deadline:
            return False
        sleep(every)
