"""The copy of one key a worker signs with: fetched, refreshed, watched, cut off in time.

::

    keeper = CopyKeeper(broker, KeyRef.parse("scalper/bot-a"))   # AsyncCopyKeeper: await
    keeper.current().headers(instruction, params, timestamp_ms)  # fetched when due

The one set of rules for every copy-mode user (:class:`BrokerAuth
<backpack_vault.client.broker.BrokerAuth>`, :class:`AsyncBrokerAuth
<backpack_vault.client.aio.AsyncBrokerAuth>`, the ccxt and bpx-py integrations,
``backpack-vault exec``)::

    no copy, or 2/3 of its lifetime gone    fetch one (one fetch at a time)
    the daemon or Vault unreachable         the copy held serves until its expires_at
    the copy does not unwrap                ask info: retired / revoked raises KeyRetired /
      (CopyUnavailable)                     KeyRevoked; active fetches once more (the daemon
                                            revokes the unclaimed copies of a key that
                                            rotated or failed over); else CopyUnavailable
    watch: retired, revoked                 drop the copy; every use raises, no round trip
    watch: active after a cut-off           a revoked key was reinstated: usable again
    watch: rotated (or an active change)    drop the copy unless it is of the key named
                                            (api_key, version): the next use fetches it
    a rejection was reported                verdict(): the daemon's word within confirm_s,
                                            by the watch, else by asking info: retired,
                                            revoked, or rotated (the name holds another
                                            key now: a failover to its standby, say)

The key is watched (a thread, or an asyncio task) from the first copy on. The rules
are written once, in :class:`CopyState`, as generators that yield what they need
(``"copy"``, ``"info"``, or seconds to wait for a watch event) and get the answer
back, the way an ``httpx.Auth`` flow yields requests: :class:`CopyKeeper` drives
them with a blocking ``BrokerClient`` and :class:`AsyncCopyKeeper` with an
``AsyncBrokerClient``, neither holding its lock across a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Generator, Mapping
from typing import Any, Final, Literal, Protocol, TypeVar

from backpack_vault.client.protocol import Copy
from backpack_vault.client.watch import (
    FINAL_STATUSES,
    AsyncWatch,
    Watch,
    WatchEvent,
    afollow,
    follow,
)
from backpack_vault.core.keys import KeyRef
from backpack_vault.errors import BrokerUnavailable, CopyUnavailable, ServiceError, not_usable

__all__ = ["INFO_EVERY_S", "AsyncCopyKeeper", "CopyKeeper", "CopyState", "Verdict"]

T = TypeVar("T")
Call = Literal["copy", "info"]
Step = Call | float  # a call for the keeper to make, or seconds to wait for a watch event
Verdict = Literal["revoked", "retired", "rotated"] | None
INFO_EVERY_S: Final = 0.5  # while no watch is connected, how often a verdict wait asks info


class SyncBroker(Protocol):
    """What :class:`CopyKeeper` needs of a ``BrokerClient``."""

    def copy(self, key: KeyRef) -> Copy: ...
    def info(self, key: KeyRef) -> dict[str, Any]: ...
    def watch(self, key: KeyRef) -> Watch: ...
    def _track(self, thread: threading.Thread) -> None: ...


class AsyncBroker(Protocol):
    """What :class:`AsyncCopyKeeper` needs of an ``AsyncBrokerClient``."""

    async def copy(self, key: KeyRef) -> Copy: ...
    async def info(self, key: KeyRef) -> dict[str, Any]: ...
    def watch(self, key: KeyRef) -> AsyncWatch: ...
    def _track(self, task: asyncio.Task[None]) -> None: ...


def _names_another(copy: Copy, facts: Mapping[str, Any], *, unknown: bool) -> bool:
    """Whether the key the daemon names (``api_key``, ``version``) is not ``copy``'s;
    ``unknown`` when it names neither."""
    api_key, version = facts.get("api_key"), facts.get("version")
    if api_key is None and version is None:
        return unknown
    if api_key is not None and str(api_key) != copy.api_key:
        return True
    try:
        return version is not None and int(version) != copy.version
    except (TypeError, ValueError):
        return unknown


class CopyState:
    """What a keeper knows of its key, and the rules (module docstring); not locked."""

    def __init__(self, key: KeyRef, clock: Callable[[], float]) -> None:
        self.key = key
        self.clock = clock
        self.copy: Copy | None = None
        self.cut_off: str | None = None  # "revoked" or "retired", as the daemon said
        self.named: tuple[str, int] | None = None  # (api_key, version) the name holds

    def usable(self) -> Copy | None:
        """The copy held unless a fresh one is due; raises once the key is cut off."""
        if self.cut_off is not None:
            raise not_usable(str(self.key), self.cut_off)
        if self.copy is None or self.copy.refresh_due(self.clock()):
            return None
        return self.copy

    def due(self) -> bool:
        """Whether the next use asks the daemon first."""
        if self.cut_off is not None:
            return False
        return self.copy is None or self.copy.refresh_due(self.clock())

    def fetch(self) -> Generator[Step, Any, Copy]:
        """A fresh copy, or the one held while the daemon cannot answer (module docstring)."""
        held = self.copy
        retried = False
        while True:
            try:
                fetched: Copy = yield "copy"
            except CopyUnavailable as unavailable:
                try:
                    info: Mapping[str, Any] = yield "info"
                except ServiceError:
                    raise unavailable from None
                final = self.on_info(info)
                if final is not None:
                    raise not_usable(str(self.key), final) from None
                if info.get("status") == "active" and not retried:
                    retried = True  # its wrapping token was revoked under it: once more
                    continue
                raise unavailable from None
            except BrokerUnavailable:
                if held is None or held.expired(self.clock()):
                    raise
                fetched = held  # the daemon may be back before the copy expires
            if self.cut_off is not None:  # the watch spoke meanwhile
                raise not_usable(str(self.key), self.cut_off)
            if fetched is not held:
                self.copy, self.named = fetched, (fetched.api_key, fetched.version)
            return fetched

    def verdict(
        self,
        confirm_s: float,
        monotonic: Callable[[], float],
        watching: Callable[[], bool],
        signer: Copy | None,
    ) -> Generator[Step, Any, Verdict]:
        """After a reported rejection of what ``signer`` signed: "revoked" or "retired"
        once the daemon says so, "rotated" once the name holds another key than
        ``signer``'s, or None when ``confirm_s`` passes first (usable, as far as the
        daemon knows)."""
        deadline = monotonic() + confirm_s
        asked = False
        while True:
            verdict = self._verdict(signer)
            if verdict is not None:
                return verdict
            if not asked or not watching():
                asked = True
                try:
                    info: Mapping[str, Any] = yield "info"
                except ServiceError:
                    pass
                else:
                    self.on_info(info)
                    verdict = self._verdict(signer)
                    if verdict is not None:
                        return verdict
            remaining = deadline - monotonic()
            if remaining <= 0:
                return None
            yield remaining if watching() else min(remaining, INFO_EVERY_S)

    def _verdict(self, signer: Copy | None) -> Verdict:
        if self.cut_off == "retired":
            return "retired"
        if self.cut_off == "revoked":
            return "revoked"
        if signer is not None and self.named not in (None, (signer.api_key, signer.version)):
            return "rotated"
        return None

    def on_info(self, info: Mapping[str, Any]) -> str | None:
        """The daemon's ``info``: a final status cuts the key off (and is returned); a copy
        of another key than the one the name holds now is dropped."""
        status = str(info.get("status", ""))
        if status in FINAL_STATUSES:
            self.copy, self.cut_off = None, status
            return status
        if status == "active":
            self.cut_off = None
            self._note_named(info)
        if self.copy is not None and _names_another(self.copy, info, unknown=False):
            self.copy = None  # a successor is stored under this name: fetch it next time
        return None

    def on_event(self, event: WatchEvent) -> bool:
        """One event of the key's watch; True when it changed what is held."""
        before = (self.copy, self.cut_off)
        status, name = event.status or "", event.event
        if name in FINAL_STATUSES or status in FINAL_STATUSES:
            self.copy = None
            self.cut_off = status if status in FINAL_STATUSES else name
        else:
            if status == "active":
                self.cut_off = None  # a revoked key was reinstated
                self._note_named(event.data)
            # A rotation names the successor; an active change may be one (a daemon
            # without the rotated event): unless it names the copy's key, drop the copy.
            news = name in ("rotated", "active")
            if self.copy is not None and _names_another(self.copy, event.data, unknown=news):
                self.copy = None
        return before[0] is not self.copy or before[1] != self.cut_off

    def _note_named(self, facts: Mapping[str, Any]) -> None:
        api_key, version = facts.get("api_key"), facts.get("version")
        if api_key is not None and version is not None:
            with contextlib.suppress(TypeError, ValueError):
                self.named = (str(api_key), int(version))

    @property
    def watch_more(self) -> bool:
        return self.cut_off != "retired"  # retired is for good


class CopyKeeper:
    """The copy of ``key`` for a blocking ``BrokerClient``; thread-safe.

    ``watch=False`` does not watch the key (the keeper learns only by asking).
    ``on_change(event)`` is called on the watcher thread after an event changed what
    the keeper holds (a cut-off, a reinstatement, a dropped copy); it must not block.
    """

    def __init__(
        self,
        broker: SyncBroker,
        key: KeyRef,
        *,
        watch: bool = True,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[WatchEvent], None] | None = None,
    ) -> None:
        self.broker = broker
        self.key = key
        self.state = CopyState(key, clock)
        self._lock = threading.Lock()  # the state; never held across a round trip
        self._changed = threading.Condition(self._lock)
        self._fetching = threading.Lock()  # one fetch at a time; the others use its copy
        self._watch_wanted = watch
        self._watch: Watch | None = None
        self._on_change = on_change

    def __repr__(self) -> str:
        return f"CopyKeeper({str(self.key)!r}, held={self.held}, cut_off={self.cut_off!r})"

    @property
    def watching(self) -> bool:
        """Whether the key's watch stream is connected now."""
        watch = self._watch
        return watch is not None and watch.connected

    @property
    def cut_off(self) -> str | None:
        """``"retired"`` or ``"revoked"`` once the daemon said so (watch or info), else None."""
        return self.state.cut_off

    @property
    def held(self) -> bool:
        """Whether a copy is held now (it may be due for a refresh)."""
        return self.state.copy is not None

    def current(self) -> Copy:
        """The copy to sign with, fetched when there is none or its refresh is due."""
        with self._lock:
            copy = self.state.usable()
        if copy is not None:
            return copy
        with self._fetching:
            with self._lock:
                copy = self.state.usable()
            if copy is not None:
                return copy
            fetched = self._drive(self.state.fetch())
            with self._lock:
                self._start_watching()
            return fetched

    def due(self) -> bool:
        """Whether :meth:`current` would ask the daemon (async callers ask off the loop)."""
        with self._lock:
            return self.state.due()

    def drop(self) -> None:
        """Forget the copy: the next use fetches a new one."""
        with self._lock:
            self.state.copy = None

    def verdict(
        self,
        confirm_s: float,
        *,
        signer: Copy | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> Verdict:
        """After a reported rejection of what ``signer`` signed, the daemon's word:
        ``"revoked"``, ``"retired"``, ``"rotated"`` (the name holds another key now), or
        None within ``confirm_s``; the watch ends the wait as soon as it speaks."""
        flow = self.state.verdict(confirm_s, monotonic, lambda: self.watching, signer)
        return self._drive(flow)

    def recheck(self) -> str | None:
        """Ask the daemon for the key's status now, as the watch would have told it: a
        final status cuts the key off (and is returned); an active one (a reinstatement,
        a switch to another key) lifts a cut-off. For when the watch may be away."""
        info = self.broker.info(self.key)
        with self._lock:
            found = self.state.on_info(info)
            self._changed.notify_all()
        return found

    def close(self) -> None:
        """Stop watching (the watcher thread ends) and forget the copy."""
        with self._lock:
            watch, self._watch = self._watch, None
            self.state.copy = None
        if watch is not None:
            watch.close()

    def on_watch_event(self, event: WatchEvent) -> bool:
        """Act on one event of the key's watch; False when there is nothing left to watch."""
        with self._lock:
            changed = self.state.on_event(event)
            more = self.state.watch_more
            self._changed.notify_all()
        if changed and self._on_change is not None:
            self._on_change(event)
        return more

    def _start_watching(self) -> None:
        """Under the lock: once a copy is held, watch the key in a daemon thread."""
        if not self._watch_wanted or self._watch is not None:
            return
        watch = self.broker.watch(self.key)
        self._watch = watch
        thread = threading.Thread(
            target=follow,
            args=(weakref.ref(self), watch),
            name=f"backpack-vault-watch:{self.key}",
            daemon=True,
        )
        weakref.finalize(self, watch.close)  # a keeper nobody holds stops watching
        self.broker._track(thread)  # noqa: SLF001 - BrokerClient.close() joins it
        thread.start()

    def _drive(self, flow: Generator[Step, Any, T]) -> T:
        """Run a CopyState flow: its steps under the lock, its calls without it."""
        answer: Any = None
        error: ServiceError | None = None
        while True:
            with self._lock:
                try:
                    step = flow.send(answer) if error is None else flow.throw(error)
                except StopIteration as done:
                    result: T = done.value
                    return result
                answer, error = None, None
                if not isinstance(step, str):
                    self._changed.wait(step)
                    continue
            try:
                if step == "copy":
                    answer = self.broker.copy(self.key)
                else:
                    answer = self.broker.info(self.key)
            except ServiceError as exc:
                error = exc


class AsyncCopyKeeper:
    """The copy of ``key`` for an ``AsyncBrokerClient``; for the tasks of one event loop.

    The key is watched by a task (``AsyncBrokerClient.aclose()`` or :meth:`aclose`
    cancels it).
    """

    def __init__(
        self,
        broker: AsyncBroker,
        key: KeyRef,
        *,
        watch: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.key = key
        self.state = CopyState(key, clock)
        self._fetching = asyncio.Lock()
        self._changed = asyncio.Event()
        self._watch_wanted = watch
        self._watch: AsyncWatch | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"AsyncCopyKeeper({str(self.key)!r}, held={self.held}, cut_off={self.cut_off!r})"

    @property
    def watching(self) -> bool:
        watch = self._watch
        return watch is not None and watch.connected

    @property
    def cut_off(self) -> str | None:
        return self.state.cut_off

    @property
    def held(self) -> bool:
        return self.state.copy is not None

    async def current(self) -> Copy:
        copy = self.state.usable()
        if copy is not None:
            return copy
        async with self._fetching:
            copy = self.state.usable()
            if copy is not None:
                return copy
            fetched = await self._drive(self.state.fetch())
            self._start_watching()
            return fetched

    def due(self) -> bool:
        return self.state.due()

    def drop(self) -> None:
        self.state.copy = None

    async def verdict(
        self,
        confirm_s: float,
        *,
        signer: Copy | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> Verdict:
        flow = self.state.verdict(confirm_s, monotonic, lambda: self.watching, signer)
        return await self._drive(flow)

    async def aclose(self) -> None:
        """Stop watching (the task is cancelled) and forget the copy."""
        task, self._task, self._watch = self._task, None, None
        self.state.copy = None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def on_watch_event(self, event: WatchEvent) -> bool:
        self.state.on_event(event)
        self._changed.set()
        return self.state.watch_more

    def _start_watching(self) -> None:
        if not self._watch_wanted or self._task is not None:
            return
        watch = self.broker.watch(self.key)
        self._watch = watch
        task = asyncio.get_running_loop().create_task(
            afollow(weakref.ref(self), watch), name=f"backpack-vault-watch:{self.key}"
        )
        self._task = task
        self.broker._track(task)  # noqa: SLF001 - AsyncBrokerClient.aclose() cancels it
        weakref.finalize(self, _cancel_soon, task)  # a keeper nobody holds stops watching

    async def _drive(self, flow: Generator[Step, Any, T]) -> T:
        answer: Any = None
        error: ServiceError | None = None
        while True:
            try:
                step = flow.send(answer) if error is None else flow.throw(error)
            except StopIteration as done:
                result: T = done.value
                return result
            answer, error = None, None
            if not isinstance(step, str):
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), step)
                continue
            try:
                if step == "copy":
                    answer = await self.broker.copy(self.key)
                else:
                    answer = await self.broker.info(self.key)
            except ServiceError as exc:
                error = exc


def _cancel_soon(task: asyncio.Task[None]) -> None:
    loop = task.get_loop()
    if not loop.is_closed():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(task.cancel)
