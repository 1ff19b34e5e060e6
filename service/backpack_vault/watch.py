"""The watchers hub: server-sent events of one key's status changes, for the ``watch`` route.

::

    feed poller (a job thread) --publish(changes)--> Watchers --call_soon_threadsafe-->
        one bounded asyncio.Queue per open stream, on the API's event loop
    GET /v1/keys/SUB/NAME/watch (api.py checks the grant first) --> Watchers.stream(ref, id)

A stream, frame by frame::

    retry: 1000
    id: 41  event: retired  data: {"at":...,"key":...,"seq":41,"status":"retired"}   replayed:
                                   the key's changes after Last-Event-ID, if the feed has them
    id: 42  event: status   data: {"at":...,"key":...,"seq":42,"status":"retired"}   the truth now
    id: 43  event: revoked  data: {...}                                              each change
    id: 44  event: rotated  data: {"api_key":...,"status":"active","version":3,...}   a switch
    event: heartbeat  data: {}                                       every heartbeat_s without one

Ids are the change feed's ``seq``, which outlives a daemon restart, so a client
that reconnects with ``Last-Event-ID`` misses nothing the feed still holds, and
the ``status`` frame tells it the truth either way. A deleted key shows as
``retired`` with ``"deleted": true``. A stream whose queue fills up (its client
reads too slowly) is ended, never waited for: the client resumes from its last
id. :meth:`Watchers.close` ends every stream, so a SIGTERM drain never waits on one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from backpack_vault.core.keys import KeyRef, Status
from backpack_vault.errors import ServiceError, UnknownKey
from backpack_vault.logging import get_logger
from backpack_vault.vault.port import Change, ChangeFeed, VaultPort

__all__ = ["DEFAULT_HEARTBEAT_S", "HEARTBEAT", "Watchers", "change_frame", "frame"]

log = get_logger("backpack_vault.watch")

DEFAULT_HEARTBEAT_S: Final = 15.0
MAX_QUEUED: Final = 64
RETRY: Final = b"retry: 1000\n\n"  # what a browser's EventSource waits before reconnecting


def frame(event: str, data: Mapping[str, object], *, event_id: int | None = None) -> bytes:
    """One complete SSE frame (``id:`` only when given; ``data:`` is one line of JSON)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    body = json.dumps(dict(data), separators=(",", ":"), sort_keys=True)
    return f"{head}event: {event}\ndata: {body}\n\n".encode()


HEARTBEAT: Final = frame("heartbeat", {})


def change_frame(change: Change) -> bytes:
    """``id: <seq>``, ``event: <status>`` (or ``rotated``) and the change itself.

    A ``rotated`` frame also names the public key the name now hands out and its version.
    """
    data: dict[str, object] = {
        "key": str(change.ref),
        "status": change.status.value,
        "seq": change.seq,
        "at": change.at,
    }
    if change.deleted:
        data["deleted"] = True
    if change.event:
        data |= {"api_key": change.api_key, "version": change.version}
    return frame(change.name, data, event_id=change.seq)


class _Signal:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_CLOSE: Final = _Signal("close")  # the daemon shuts down
_LAGGED: Final = _Signal("lagged")  # the client reads too slowly: end, it resumes by id
_RESYNC: Final = _Signal("resync")  # changes were missed: send the truth again

_Item = Change | _Signal


@dataclass(eq=False, slots=True)
class _Subscriber:
    ref: KeyRef
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Item] = field(default_factory=lambda: asyncio.Queue(MAX_QUEUED))

    def offer(self, item: _Item) -> None:
        """On the subscriber's loop: queue ``item``; a full queue ends the stream instead."""
        if item is _CLOSE or self.queue.full():
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(_CLOSE if item is _CLOSE else _LAGGED)
            return
        self.queue.put_nowait(item)


class Watchers:
    """Open watch streams and the changes fanned out to them; thread-safe (``WatchSource``)."""

    def __init__(self, vault: VaultPort, *, heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> None:
        self._vault = vault
        self._heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._subscribers: set[_Subscriber] = set()
        self._closed = False

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._subscribers)

    # -- from other threads ---------------------------------------------------------------

    def publish(self, changes: Sequence[Change]) -> None:
        """New feed entries, in seq order: each goes to the streams of its key."""
        with self._lock:
            subscribers = list(self._subscribers)
        for change in changes:
            for subscriber in subscribers:
                if subscriber.ref == change.ref:
                    self._send(subscriber, change)

    def resync(self) -> None:
        """Entries were missed: every stream reads its key's status again and sends it."""
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            self._send(subscriber, _RESYNC)

    def close(self) -> None:
        """End every stream now and refuse new ones (the daemon is shutting down)."""
        with self._lock:
            self._closed = True
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            self._send(subscriber, _CLOSE)
        if subscribers:
            log.info("watch.closed", streams=len(subscribers))

    @staticmethod
    def _send(subscriber: _Subscriber, item: _Item) -> None:
        with contextlib.suppress(RuntimeError):  # its loop is closed: the stream is gone
            subscriber.loop.call_soon_threadsafe(subscriber.offer, item)

    # -- on the API's event loop ----------------------------------------------------------

    async def stream(self, ref: KeyRef, last_event_id: str | None) -> AsyncIterator[bytes]:
        """The frames of one watch (see the module docstring); ends on close or lag."""
        subscriber = _Subscriber(ref, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                return
            self._subscribers.add(subscriber)
        try:
            yield RETRY
            snapshot = await self._snapshot(ref)
            if snapshot is None:
                return  # Vault cannot answer: the client reconnects with backoff
            feed, status = snapshot
            for change in _replay(feed, ref, last_event_id):
                yield change_frame(change)
            yield status
            async for chunk in self._follow(subscriber, feed.seq):
                yield chunk
        finally:
            with self._lock:
                self._subscribers.discard(subscriber)

    async def _follow(self, subscriber: _Subscriber, sent: int) -> AsyncIterator[bytes]:
        """Changes after ``sent`` as they come, heartbeats between them; ends on close or lag."""
        while True:
            try:
                item = await asyncio.wait_for(subscriber.queue.get(), self._heartbeat_s)
            except TimeoutError:
                yield HEARTBEAT
                continue
            if item is _CLOSE:
                return
            if item is _LAGGED:
                log.info("watch.lagged", key=str(subscriber.ref))
                return
            if item is _RESYNC:
                snapshot = await self._snapshot(subscriber.ref)
                if snapshot is None:
                    return
                feed, status = snapshot
                yield status
                sent = max(sent, feed.seq)
            elif isinstance(item, Change) and item.seq > sent:
                yield change_frame(item)
                sent = item.seq

    async def _snapshot(self, ref: KeyRef) -> tuple[ChangeFeed, bytes] | None:
        try:
            return await asyncio.to_thread(self._read, ref)
        except ServiceError as exc:
            log.warning("watch.unavailable", key=str(ref), error=exc.code)
            return None

    def _read(self, ref: KeyRef) -> tuple[ChangeFeed, bytes]:
        """The feed, then the key (so the record is at least as new as the feed's seq)."""
        feed = self._vault.read_changes()
        data: dict[str, object] = {"key": str(ref), "seq": feed.seq}
        try:
            record = self._vault.read_record(ref)
        except UnknownKey:
            data |= {"status": Status.RETIRED.value, "at": "", "deleted": True}
        else:
            data |= {"status": record.status.value, "at": record.status_since}
        return feed, frame("status", data, event_id=feed.seq)


def _replay(feed: ChangeFeed, ref: KeyRef, last_event_id: str | None) -> tuple[Change, ...]:
    """The key's changes after ``last_event_id``, when the feed still holds all of them."""
    if last_event_id is None:
        return ()
    try:
        last = int(last_event_id.strip())
    except ValueError:
        return ()
    if last < 0 or last > feed.seq or not feed.covers(last):
        return ()
    return tuple(c for c in feed.since(last) if c.ref == ref)
