"""A key's status changes, as the daemon streams them (``GET /v1/keys/SUB/NAME/watch``).

::

    with broker.watch("scalper/bot-a") as watch:
        for event in watch:            # blocks; reconnects by itself
            if event.final:            # "retired" or "revoked" (a status frame or a change)
                ...

The stream is server-sent events: a ``status`` event first (the key's status now),
then one event per change (``retired``, ``revoked``, ``active``, ``rotated``, ...)
and a ``heartbeat`` when nothing happens. After a disconnect (the daemon
restarted, the network failed, no heartbeat within ``read_timeout_s``) the watch
connects again with backoff, sending ``Last-Event-ID``, so the daemon replays what
was missed. A refusal (401, 403, or 404 from a daemon without the route) is
raised; :meth:`Watch.close` ends it from any thread.

:class:`AsyncWatch` is the same over an ``httpx.AsyncClient`` (``async for``;
cancel the task that iterates it, or ``await watch.aclose()``). :func:`follow` and
:func:`afollow` feed a :class:`WatchListener` from a thread or a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, Protocol, Self

import httpx

from backpack_vault.errors import CallerError, NotFound, ServiceError

__all__ = [
    "BACKOFF_S",
    "FINAL_STATUSES",
    "READ_TIMEOUT_S",
    "REFUSED_RETRY_S",
    "AsyncWatch",
    "Watch",
    "WatchEvent",
    "WatchListener",
    "afollow",
    "follow",
    "parse_sse",
]

FINAL_STATUSES: Final = frozenset({"revoked", "retired"})
BACKOFF_S: Final = (0.2, 5.0)  # the first wait before reconnecting, and the cap
READ_TIMEOUT_S: Final = 45.0  # three of the daemon's default heartbeats


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One server-sent event: its name, its JSON data and its id (the daemon's feed seq)."""

    event: str
    data: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None

    @property
    def status(self) -> str | None:
        """The key's status this event reports (None for a heartbeat)."""
        status = self.data.get("status")
        return status if isinstance(status, str) else None

    @property
    def final(self) -> bool:
        """Whether the key is revoked or retired now: never handed out again by itself."""
        return self.status in FINAL_STATUSES


def parse_sse(lines: Iterable[str]) -> Iterator[WatchEvent]:
    """Server-sent events from lines of text (comments and ``retry:`` are skipped)."""
    event, event_id = "", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data or event:
                yield _event(event or "message", data, event_id)
            event, data, event_id = "", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


def _event(name: str, data: list[str], event_id: str | None) -> WatchEvent:
    try:
        parsed = json.loads("\n".join(data)) if data else {}
    except ValueError:
        parsed = {}
    return WatchEvent(name, parsed if isinstance(parsed, dict) else {}, event_id)


class Watch:
    """Iterate for the events of one key; thread-safe ``close``; resumes after a disconnect."""

    def __init__(
        self,
        http: httpx.Client,
        url: str,
        headers: Callable[[], Mapping[str, str]],
        *,
        error_for: Callable[[httpx.Response], ServiceError],
        last_event_id: str | None = None,
        backoff_s: tuple[float, float] = BACKOFF_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        """``headers`` is asked before each connection (a token file may have changed);
        ``error_for`` turns a refusal into our error."""
        self._http = http
        self.url = url
        self._headers = headers
        self._error_for = error_for
        self.last_event_id = last_event_id
        self._backoff_s = backoff_s
        self._timeout = httpx.Timeout(10.0, read=read_timeout_s)
        self._closed = threading.Event()
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._response: httpx.Response | None = None
        self.connections = 0  # how many times a stream was opened

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def connected(self) -> bool:
        """Whether a stream is open now (its first frame arrived)."""
        return self._connected.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True at once when the watch is closed meanwhile."""
        return self._closed.wait(seconds)

    def __iter__(self) -> Iterator[WatchEvent]:
        first, cap = self._backoff_s
        delay = first
        while not self.closed:
            try:
                with contextlib.closing(self._once()) as events:
                    for event in events:
                        delay = first  # the stream works: a later disconnect starts over
                        yield event
            except httpx.TransportError:
                pass  # refused, reset, or silent past read_timeout_s: connect again
            except RuntimeError:  # the httpx client was closed: nothing more to watch
                self.close()
            finally:
                self._connected.clear()
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, cap)

    def _once(self) -> Generator[WatchEvent, None, None]:
        """One connection: its events, until it ends; a refusal is raised."""
        headers = {"Accept": "text/event-stream", **self._headers()}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        with self._http.stream("GET", self.url, headers=headers, timeout=self._timeout) as answer:
            if answer.status_code != HTTPStatus.OK:
                answer.read()
                error = self._error_for(answer)
                if isinstance(error, CallerError):
                    raise error
                if answer.status_code == HTTPStatus.NOT_FOUND:  # a daemon without the route
                    raise NotFound(f"the daemon serves no watch stream at {self.url}")
                return  # the daemon cannot answer now (503, ...): connect again later
            with self._lock:
                if self.closed:
                    return
                self._response = answer
                self.connections += 1
            try:
                for event in parse_sse(answer.iter_lines()):
                    if self.closed:
                        return
                    if event.id is not None:
                        self.last_event_id = event.id
                    self._connected.set()
                    yield event
            finally:
                with self._lock:
                    self._response = None

    def close(self) -> None:
        """End the watch: the iteration returns, even from a read blocked in another thread."""
        self._closed.set()
        with self._lock:
            response = self._response
        if response is not None:
            _shutdown(response)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _shutdown(response: httpx.Response) -> None:
    """Wake a read blocked on this response's socket (closing it would not)."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


REFUSED_RETRY_S: Final = 30.0  # the daemon refused the watch (401, 403): ask again this late


class WatchListener(Protocol):
    """What a watcher thread feeds: False from ``on_watch_event`` ends the watch."""

    def on_watch_event(self, event: WatchEvent) -> bool: ...


def follow(owner_ref: weakref.ref[Any], watch: Watch) -> None:
    """The watcher thread: feed the owner its key's events until closed, retired or dropped.

    It holds the owner (a ``WatchListener``) only while handing over an event, so an
    owner nobody uses any more is collected, which closes its watch and ends this thread.
    """
    try:
        while not watch.closed:
            try:
                for event in watch:
                    owner: WatchListener | None = owner_ref()
                    if owner is None or not owner.on_watch_event(event):
                        return
                    del owner
            except ServiceError:  # the daemon refused the watch: maybe a new token later
                if watch.wait(REFUSED_RETRY_S):
                    return
    except Exception:  # noqa: BLE001, S110 - a watcher thread must never die loudly in a bot
        pass
    finally:
        watch.close()


async def afollow(owner_ref: weakref.ref[Any], watch: AsyncWatch) -> None:
    """:func:`follow` as an asyncio task: cancelling the task ends the watch."""
    try:
        while not watch.closed:
            try:
                async for event in watch:
                    owner: WatchListener | None = owner_ref()
                    if owner is None or not owner.on_watch_event(event):
                        return
                    del owner
            except ServiceError:  # the daemon refused the watch: maybe a new token later
                await asyncio.sleep(REFUSED_RETRY_S)
    except Exception:  # noqa: BLE001, S110 - a watcher task must never die loudly in a bot
        pass
    finally:
        await watch.aclose()


class AsyncWatch:
    """:class:`Watch` over an ``httpx.AsyncClient``: ``async for event in watch``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        headers: Callable[[], Awaitable[Mapping[str, str]]],
        *,
        error_for: Callable[[httpx.Response], ServiceError],
        last_event_id: str | None = None,
        backoff_s: tuple[float, float] = BACKOFF_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self._http = http
        self.url = url
        self._headers = headers
        self._error_for = error_for
        self.last_event_id = last_event_id
        self._backoff_s = backoff_s
        self._timeout = httpx.Timeout(10.0, read=read_timeout_s)
        self._closed = False
        self._connected = False
        self._events: AsyncGenerator[WatchEvent, None] | None = None
        self.connections = 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected(self) -> bool:
        """Whether a stream is open now (its first frame arrived)."""
        return self._connected

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._events is None:
            self._events = self._run()
        return await anext(self._events)

    async def _run(self) -> AsyncGenerator[WatchEvent, None]:
        first, cap = self._backoff_s
        delay = first
        while not self._closed:
            try:
                async with contextlib.aclosing(self._once()) as events:
                    async for event in events:
                        delay = first
                        yield event
            except httpx.TransportError:
                pass  # refused, reset, or silent past read_timeout_s: connect again
            except RuntimeError:  # the httpx client was closed: nothing more to watch
                self._closed = True
            finally:
                self._connected = False
            if self._closed:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)

    async def _once(self) -> AsyncGenerator[WatchEvent, None]:
        headers = {"Accept": "text/event-stream", **(await self._headers())}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        async with self._http.stream(
            "GET", self.url, headers=headers, timeout=self._timeout
        ) as answer:
            if answer.status_code != HTTPStatus.OK:
                await answer.aread()
                error = self._error_for(answer)
                if isinstance(error, CallerError):
                    raise error
                if answer.status_code == HTTPStatus.NOT_FOUND:
                    raise NotFound(f"the daemon serves no watch stream at {self.url}")
                return  # the daemon cannot answer now (503, ...): connect again later
            self.connections += 1
            async with contextlib.aclosing(_async_events(answer.aiter_lines())) as events:
                async for event in events:
                    if self._closed:
                        return
                    if event.id is not None:
                        self.last_event_id = event.id
                    self._connected = True
                    yield event

    async def aclose(self) -> None:
        """End the watch (from the task that iterates it; other tasks cancel that one)."""
        self._closed = True
        events, self._events = self._events, None
        if events is not None:
            with contextlib.suppress(RuntimeError):  # iterated by another task right now
                await events.aclose()


async def _async_events(lines: AsyncIterator[str]) -> AsyncGenerator[WatchEvent, None]:
    """parse_sse over an async line stream, one event at a time."""
    block: list[str] = []
    async for line in lines:
        block.append(line)
        if not line:
            for event in parse_sse(block):
                yield event
            block = []
