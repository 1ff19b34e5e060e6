"""Order loops for drills: workers that place sandbox orders without pause and count each.

Each :class:`OrderLoop` is a thread with its own ``BrokerClient`` auth (sign or copy
mode) that sends immediate-or-cancel limit orders to the sandbox exchange, far
from the book so that nothing fills and no funds are locked, and counts the
answers: placed (200) or failed (anything else, or an error before sending).
It also counts which public key signed each order, so a drill sees the moment
every worker has moved to a successor. Used by ``tests/test_rotation.py`` and
``bench/rotate.py``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import httpx

from backpack_vault.client.broker import BrokerClient
from backpack_vault.core.keys import KeyRef
from backpack_vault.errors import ServiceError

__all__ = ["ORDER", "OrderLoop", "Tally", "order_loops", "totals", "wait_all_on"]

# Rests nowhere: an IOC bid far under the book is accepted (200) and expires at once.
ORDER = {
    "symbol": "SOL_USDC",
    "side": "Bid",
    "orderType": "Limit",
    "price": "1",
    "quantity": "0.01",
    "timeInForce": "IOC",
}


@dataclass
class Tally:
    """What one loop saw. ``last_key`` is the public key of its latest placed order."""

    placed: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    by_key: Counter[str] = field(default_factory=Counter)
    last_key: str = ""
    failed_sent_at: list[float] = field(default_factory=list)  # time.monotonic() at sending

    def failed_since(self, moment: float) -> int:
        """Failed orders that were sent after ``moment`` (a ``time.monotonic()``)."""
        return sum(1 for sent in self.failed_sent_at if sent > moment)


class OrderLoop(threading.Thread):
    """Places orders through the daemon's auth until :meth:`stop`."""

    def __init__(
        self,
        broker: BrokerClient,
        ref: KeyRef,
        mode: Literal["copy", "sign"],
        exchange_url: str,
        *,
        pause_s: float = 0.02,
    ) -> None:
        super().__init__(name=f"orders-{mode}", daemon=True)
        self.mode = mode
        self.tally = Tally()
        self._broker = broker
        self._ref = ref
        self._url = exchange_url
        self._pause_s = pause_s
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._halt.set()

    def snapshot(self) -> Tally:
        with self._lock:
            t = self.tally
            return Tally(
                t.placed,
                t.failed,
                Counter(t.errors),
                Counter(t.by_key),
                t.last_key,
                list(t.failed_sent_at),
            )

    def run(self) -> None:
        auth = self._broker.auth(self._ref, mode=self.mode)
        with httpx.Client(base_url=self._url, auth=auth, timeout=10.0) as http:
            while not self._halt.is_set():
                self._one(http)
                self._halt.wait(self._pause_s)
        auth.close()

    def _one(self, http: httpx.Client) -> None:
        sent = time.monotonic()
        try:
            response = http.post("/api/v1/order", json=ORDER)
        except ServiceError as exc:  # the daemon refused, or the key was cut off
            self._count(sent, failed=f"{type(exc).__name__}: {exc.message[:120]}")
            return
        except httpx.HTTPError as exc:
            self._count(sent, failed=type(exc).__name__)
            return
        if response.status_code == httpx.codes.OK:
            self._count(sent, key=response.request.headers.get("X-API-Key", ""))
        else:
            self._count(sent, failed=f"{response.status_code} {response.text[:120]}")

    def _count(self, sent: float, *, key: str = "", failed: str = "") -> None:
        with self._lock:
            if failed:
                self.tally.failed += 1
                self.tally.errors[failed] += 1
                self.tally.failed_sent_at.append(sent)
            else:
                self.tally.placed += 1
                self.tally.by_key[key] += 1
                self.tally.last_key = key


@contextmanager
def order_loops(
    broker: BrokerClient,
    ref: KeyRef,
    exchange_url: str,
    modes: Sequence[Literal["copy", "sign"]] = ("sign", "sign", "copy", "copy"),
    *,
    pause_s: float = 0.02,
) -> Iterator[list[OrderLoop]]:
    """Start one loop per mode; stop and join them all on the way out."""
    loops = [OrderLoop(broker, ref, mode, exchange_url, pause_s=pause_s) for mode in modes]
    for loop in loops:
        loop.start()
    try:
        yield loops
    finally:
        for loop in loops:
            loop.stop()
        for loop in loops:
            loop.join(timeout=15)


def totals(loops: Sequence[OrderLoop]) -> Tally:
    """All loops' counts together."""
    total = Tally()
    for loop in loops:
        t = loop.snapshot()
        total.placed += t.placed
        total.failed += t.failed
        total.errors.update(t.errors)
        total.by_key.update(t.by_key)
        total.failed_sent_at.extend(t.failed_sent_at)
    return total


def wait_all_on(loops: Sequence[OrderLoop], api_key: str, timeout: float) -> bool:
    """Whether every loop places orders signed by ``api_key`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(loop.snapshot().last_key == api_key for loop in loops):
            return True
        time.sleep(0.02)
    return False
