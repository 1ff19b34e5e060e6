"""Copy mode's copy of one key, kept for a third-party client; thread-safe.

A copy is fetched on first use and fetched anew at two thirds of its lifetime
(:meth:`Copy.refresh_due`). While one is held, the key is watched (the daemon's
``watch`` stream, in a daemon thread): ``retired`` or ``revoked`` drops the copy
and every later use raises KeyRetired or KeyRevoked without a round trip (a
revoked key that is reinstated becomes usable again); ``rotated`` drops it so
that the next use fetches the successor. :meth:`CopyKeeper.drop` is for a
rejection by Backpack: the next use fetches a copy, which the daemon refuses once
it has confirmed the revocation.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Final

from backpack_vault.client.broker import BrokerClient, Copy, Watch, WatchEvent
from backpack_vault.client.watch import FINAL_STATUSES, follow
from backpack_vault.core.keys import KeyRef
from backpack_vault.errors import BrokerUnavailable, CopyUnavailable, not_usable

__all__ = ["CopyKeeper"]

_FINAL: Final = frozenset({"revoked", "retired"})  # never handed out again by themselves


class CopyKeeper:
    """The copy of ``key`` a client signs with; ``current()`` from any thread."""

    def __init__(
        self,
        broker: BrokerClient,
        key: KeyRef,
        *,
        watch: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.key = key
        self._clock = clock
        self._lock = threading.Lock()  # the state below; never held across a round trip
        self._fetching = threading.Lock()
        self._copy: Copy | None = None
        self._cut_off: str | None = None  # "revoked" or "retired", as the watch said
        self._watch_wanted = watch
        self._watch: Watch | None = None

    @property
    def watching(self) -> bool:
        """Whether the key's watch stream is connected now."""
        return self._watch is not None and self._watch.connected

    @property
    def cut_off(self) -> str | None:
        """``"retired"`` or ``"revoked"`` once the watch said so, else None."""
        with self._lock:
            return self._cut_off

    def current(self) -> Copy:
        """The copy to sign with, fetched when there is none or its refresh is due.

        The daemon is asked without the state lock held, so that ``due``, ``drop`` and
        the watch never wait for a round trip (an async client calls them on its loop).
        """
        copy = self._usable()
        if copy is not None:
            return copy
        with self._fetching:  # one fetch at a time; the others use its copy
            copy = self._usable()
            if copy is not None:
                return copy
            with self._lock:
                held = self._copy
            fetched = self._fetch(held)
            with self._lock:
                if self._cut_off is not None:  # the watch spoke meanwhile
                    raise not_usable(str(self.key), self._cut_off)
                self._copy = fetched
                self._start_watching()
            return fetched

    def _usable(self) -> Copy | None:
        """The copy held, unless it is time for a fresh one; raises once the key is cut off."""
        with self._lock:
            if self._cut_off is not None:
                raise not_usable(str(self.key), self._cut_off)
            if self._copy is None or self._copy.refresh_due(self._clock()):
                return None
            return self._copy

    def due(self) -> bool:
        """Whether :meth:`current` would ask the daemon (async clients ask off the loop)."""
        with self._lock:
            if self._cut_off is not None:
                return False
            return self._copy is None or self._copy.refresh_due(self._clock())

    def drop(self) -> None:
        """Forget the copy: the next use fetches a new one."""
        with self._lock:
            self._copy = None

    def close(self) -> None:
        """Stop watching (the watcher thread ends) and forget the copy."""
        with self._lock:
            watch, self._watch, self._copy = self._watch, None, None
        if watch is not None:
            watch.close()

    def _fetch(self, held: Copy | None) -> Copy:
        try:
            return self.broker.copy(self.key)
        except CopyUnavailable:
            # The daemon revokes unclaimed copies as a key is revoked or retired: a copy
            # that no longer unwraps most often means exactly that, so say which.
            status = str(self.broker.info(self.key).get("status", ""))
            if status in FINAL_STATUSES:
                raise not_usable(str(self.key), status) from None
            raise
        except BrokerUnavailable:
            # Keep signing with the old copy while it is valid; the daemon may be back soon.
            if held is None or held.expired(self._clock()):
                raise
            return held

    def _start_watching(self) -> None:
        """Under the lock: once a copy is held, watch the key in a daemon thread."""
        if not self._watch_wanted or self._watch is not None:
            return
        watch = self.broker.watch(self.key)
        self._watch = watch
        weakref.finalize(self, watch.close)  # a keeper nobody holds stops watching
        threading.Thread(
            target=follow,
            args=(weakref.ref(self), watch),
            name=f"backpack-vault-watch:{self.key}",
            daemon=True,
        ).start()

    def on_watch_event(self, event: WatchEvent) -> bool:
        """Act on one event of the key's watch; False when there is nothing left to watch."""
        status = event.status or ""
        with self._lock:
            if event.event in _FINAL or status in _FINAL:
                self._copy = None
                self._cut_off = status if status in _FINAL else event.event
            elif event.event == "rotated":
                self._copy = None  # the next use fetches the successor
            elif status == "active":
                self._cut_off = None  # a revoked key was reinstated
            return self._cut_off != "retired"  # retired is for good
