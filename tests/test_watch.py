"""The watch stream: the hub's frames, and the route end to end with the Python client.

The hub reads the session's real OpenBao dev server; the end-to-end tests run
daemons serving loopback HTTP and follow them with ``BrokerClient.watch``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from backpack_vault.client.broker import AccessDenied, BrokerClient
from backpack_vault.client.watch import Watch, WatchEvent, parse_sse
from backpack_vault.config import BrokerSettings, CheckSettings, Settings, VaultSettings
from backpack_vault.core.keys import KeyRef, Status
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread, free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import NotFound
from backpack_vault.testing import now_iso, store_key, wait_until
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.port import Change
from backpack_vault.watch import MAX_QUEUED, Watchers, change_frame

REF = KeyRef("main", "bot-a")
BOUND = 10.0


def events_of(chunks: list[bytes]) -> list[WatchEvent]:
    return list(parse_sse(b"".join(chunks).decode().split("\n")))


async def take(stream: AsyncIterator[bytes], count: int) -> list[bytes]:
    return [await anext(stream) for _ in range(count)]


class TestFrames:
    def test_a_frame_is_id_event_and_one_line_of_json(self) -> None:
        """The SSE framing a client parses back into the same event."""
        change = Change(7, REF, Status.RETIRED, "2025-01-01T00:00:00Z")
        raw = change_frame(change)
        assert raw == (
            b"id: 7\nevent: retired\n"
            b'data: {"at":"2025-01-01T00:00:00Z","key":"main/bot-a","seq":7,"status":"retired"}'
            b"\n\n"
        )
        (event,) = events_of([raw])
        assert (event.id, event.event, event.status, event.final) == (
            "7",
            "retired",
            "retired",
            True,
        )

    def test_the_parser_skips_comments_and_retry(self) -> None:
        lines = [": hello", "retry: 1000", "", "event: heartbeat", "data: {}", ""]
        assert list(parse_sse(lines)) == [WatchEvent("heartbeat", {}, None)]


class TestHub:
    def test_the_first_frame_is_the_status_now(self, vault: Vault) -> None:
        """A new stream starts with the key's status and the feed's seq as its id."""
        store_key(vault, REF)
        seq = vault.read_changes().seq

        async def run() -> list[bytes]:
            stream = Watchers(vault).stream(REF, None)
            try:
                return await take(stream, 2)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        (status,) = events_of(asyncio.run(run()))
        assert (status.event, status.id, status.status) == ("status", str(seq), "active")
        assert status.data["key"] == "main/bot-a"

    def test_changes_of_the_key_follow_with_their_seq(self, vault: Vault) -> None:
        """Published changes reach the streams of their key only, in order."""
        store_key(vault, REF)
        hub = Watchers(vault)
        other = KeyRef("main", "other")

        async def run() -> list[bytes]:
            stream = hub.stream(REF, None)
            first = await take(stream, 2)
            hub.publish(
                [
                    Change(1001, other, Status.RETIRED, "t1"),
                    Change(1002, REF, Status.REVOKED, "t2"),
                    Change(1003, REF, Status.ACTIVE, "t3"),
                ]
            )
            rest = await take(stream, 2)
            await stream.aclose()  # type: ignore[attr-defined]
            return first + rest

        events = events_of(asyncio.run(run()))
        assert [(e.event, e.id) for e in events[1:]] == [("revoked", "1002"), ("active", "1003")]
        assert hub.open_streams == 0

    def test_a_reconnect_replays_what_it_missed(self, vault: Vault) -> None:
        """With Last-Event-ID the key's changes after it come first, then the status now."""
        store_key(vault, REF)
        before = vault.read_changes().seq
        vault.set_status(REF, Status.REVOKED, now=now_iso())
        vault.set_status(REF, Status.ACTIVE, now=now_iso())

        async def run(last: str | None, count: int) -> list[bytes]:
            stream = Watchers(vault).stream(REF, last)
            frames = await take(stream, count)
            await stream.aclose()  # type: ignore[attr-defined]
            return frames

        replayed = events_of(asyncio.run(run(str(before), 4)))
        assert [(e.event, e.id) for e in replayed] == [
            ("revoked", str(before + 1)),
            ("active", str(before + 2)),
            ("status", str(before + 2)),
        ]
        assert [e.event for e in events_of(asyncio.run(run("not-a-number", 2)))] == ["status"]

    def test_an_idle_stream_sends_heartbeats(self, vault: Vault) -> None:
        store_key(vault, REF)

        async def run() -> list[bytes]:
            stream = Watchers(vault, heartbeat_s=0.05).stream(REF, None)
            frames = await take(stream, 4)
            await stream.aclose()  # type: ignore[attr-defined]
            return frames

        events = events_of(asyncio.run(run()))
        assert [e.event for e in events] == ["status", "heartbeat", "heartbeat"]
        assert events[1].id is None

    def test_a_deleted_key_shows_as_retired(self, vault: Vault) -> None:
        async def run() -> list[bytes]:
            stream = Watchers(vault).stream(KeyRef("main", "gone"), None)
            frames = await take(stream, 2)
            await stream.aclose()  # type: ignore[attr-defined]
            return frames

        (status,) = events_of(asyncio.run(run()))
        assert (status.status, status.data["deleted"]) == ("retired", True)

    def test_close_ends_every_stream_and_refuses_new_ones(self, vault: Vault) -> None:
        """A SIGTERM drain never waits on a stream: close() ends them from another thread."""
        store_key(vault, REF)
        hub = Watchers(vault)

        async def run() -> tuple[list[bytes], list[bytes]]:
            stream = hub.stream(REF, None)
            frames = await take(stream, 2)
            threading.Thread(target=hub.close).start()
            frames += [chunk async for chunk in stream]  # ends
            after = [chunk async for chunk in hub.stream(REF, None)]
            return frames, after

        frames, after = asyncio.run(asyncio.wait_for(run(), BOUND))
        assert [e.event for e in events_of(frames)] == ["status"]
        assert after == []
        assert hub.open_streams == 0

    def test_a_slow_stream_is_ended_and_never_blocks_the_publisher(self, vault: Vault) -> None:
        """More changes than a queue holds: publish returns; the stream ends (it resumes by id)."""
        store_key(vault, REF)
        hub = Watchers(vault)

        async def run() -> list[bytes]:
            stream = hub.stream(REF, None)
            frames = await take(stream, 2)
            flood = [Change(10_000 + i, REF, Status.ACTIVE, "t") for i in range(MAX_QUEUED + 5)]
            hub.publish(flood)  # never waits for the reader
            await asyncio.sleep(0.05)
            frames += [chunk async for chunk in stream]
            return frames

        frames = asyncio.run(asyncio.wait_for(run(), BOUND))
        assert [e.event for e in events_of(frames)] == ["status"]


# -- end to end ----------------------------------------------------------------------------


@dataclass
class Follower:
    """Iterates a Watch in a thread and keeps every event but heartbeats."""

    watch: Watch
    events: list[WatchEvent] = field(default_factory=list)
    heartbeats: int = 0
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.watch:
                with self.lock:
                    if event.event == "heartbeat":
                        self.heartbeats += 1
                    else:
                        self.events.append(event)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def names(self) -> list[str]:
        with self.lock:
            return [e.event for e in self.events]

    def saw(self, name: str) -> Callable[[], bool]:
        return lambda: name in self.names()

    def stop(self) -> None:
        self.watch.close()
        self.thread.join(BOUND)
        assert not self.thread.is_alive()


def daemon_for(vault_settings: VaultSettings, **kwargs: object) -> Daemon:
    settings = Settings(vault_settings, BrokerSettings(), CheckSettings())
    return Daemon(settings, feed_interval_s=0.05, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def served(vault_settings: VaultSettings) -> Iterator[str]:
    daemon = daemon_for(vault_settings, watch_heartbeat_s=0.2)
    with daemon, ServerThread(daemon.app) as server:
        yield server.url


@pytest.fixture
def client(served: str, dev_vault: DevVault) -> Iterator[BrokerClient]:
    with BrokerClient(served, vault_addr=dev_vault.addr, token=dev_vault.root_token) as broker:
        yield broker


class TestWatchRoute:
    def test_retire_and_revoke_arrive_with_their_ids(
        self, client: BrokerClient, vault: Vault
    ) -> None:
        """status first; then revoked, active (reinstated), retired, each with its feed seq."""
        store_key(vault, REF)
        follower = Follower(client.watch(REF))
        try:
            wait_until(follower.saw("status"), BOUND)
            vault.set_status(REF, Status.REVOKED, now=now_iso(), reason="leaked")
            vault.set_status(REF, Status.ACTIVE, now=now_iso(), reason="reinstated")
            vault.set_status(REF, Status.RETIRED, now=now_iso())
            wait_until(follower.saw("retired"), BOUND)
        finally:
            follower.stop()
        events = follower.events
        assert [e.event for e in events] == ["status", "revoked", "active", "retired"]
        seq = vault.read_changes().seq
        assert [e.id for e in events[1:]] == [str(seq - 2), str(seq - 1), str(seq)]
        assert events[-1].data == {
            "key": "main/bot-a",
            "status": "retired",
            "seq": seq,
            "at": events[-1].data["at"],
        }
        assert follower.watch.last_event_id == str(seq)
        assert follower.error is None

    def test_the_stream_sends_heartbeats(
        self, served: str, dev_vault: DevVault, vault: Vault
    ) -> None:
        """Plain HTTP: text/event-stream, a status frame, then heartbeats while nothing changes."""
        store_key(vault, REF)
        headers = {"X-Vault-Token": dev_vault.root_token.reveal()}
        frames: list[str] = []
        with httpx.stream("GET", f"{served}/v1/keys/{REF}/watch", headers=headers) as answer:
            assert answer.headers["content-type"].startswith("text/event-stream")
            for line in answer.iter_lines():
                frames.append(line)
                if frames.count("event: heartbeat") == 2:
                    break
        events = list(parse_sse([*frames, ""]))
        assert [e.event for e in events] == ["status", "heartbeat", "heartbeat"]

    def test_the_stream_needs_a_grant(self, vault: Vault, served: str, dev_vault: DevVault) -> None:
        """The same grant as info: a token with no grant on the key is refused (403)."""
        store_key(vault, REF)
        token = Provisioner(vault).create_token(["default"])
        with BrokerClient(served, vault_addr=dev_vault.addr, token=token) as stranger:
            watch = stranger.watch(REF)
            with pytest.raises(AccessDenied):
                next(iter(watch))

    def test_last_event_id_resumes_after_a_disconnect(
        self, client: BrokerClient, vault: Vault
    ) -> None:
        """A watch started from an old id gets the changes since, then the status now."""
        store_key(vault, REF)
        start = vault.read_changes().seq
        vault.set_status(REF, Status.REVOKED, now=now_iso())
        follower = Follower(client.watch(REF, last_event_id=str(start)))
        try:
            wait_until(follower.saw("status"), BOUND)
        finally:
            follower.stop()
        assert follower.names() == ["revoked", "status"]
        assert follower.events[-1].status == "revoked"

    def test_the_watch_survives_a_daemon_restart(
        self, vault_settings: VaultSettings, vault: Vault, dev_vault: DevVault
    ) -> None:
        """Stop the daemon, change the key while it is down, start another on the same port:
        the client reconnects with Last-Event-ID and sees the change it missed."""
        store_key(vault, REF)
        port = free_port()
        first = daemon_for(vault_settings)
        with first:
            server = ServerThread(first.app, port=port).start()
            broker = BrokerClient(server.url, vault_addr=dev_vault.addr, token=dev_vault.root_token)
            follower = Follower(broker.watch(REF))
            wait_until(follower.saw("status"), BOUND)
            connections = follower.watch.connections
            first.watchers.close()  # as a SIGTERM drain does
            server.stop()
        vault.set_status(REF, Status.REVOKED, now=now_iso(), reason="while down")
        second = daemon_for(vault_settings)
        try:
            with second, ServerThread(second.app, port=port):
                wait_until(follower.saw("revoked"), BOUND, "the missed change")
                wait_until(lambda: follower.names().count("status") == 2, BOUND)
        finally:
            follower.stop()
            broker.close()
        assert follower.names() == ["status", "revoked", "status"]
        assert follower.events[-1].status == "revoked"
        assert follower.watch.connections > connections
        assert follower.error is None


class TestBrokerClientClose:
    def test_close_ends_a_watch_blocked_in_a_read(
        self, served: str, dev_vault: DevVault, vault: Vault
    ) -> None:
        """BrokerClient.close() wakes a thread blocked reading the stream."""
        store_key(vault, REF)
        broker = BrokerClient(served, vault_addr=dev_vault.addr, token=dev_vault.root_token)
        follower = Follower(broker.watch(REF, read_timeout_s=60))
        wait_until(follower.saw("status"), BOUND)
        broker.close()
        follower.thread.join(BOUND)
        assert not follower.thread.is_alive()
        assert json.dumps(follower.events[0].data)  # a real event came through


class TestOlderDaemons:
    def test_a_daemon_without_the_route_is_not_found(self) -> None:
        """A 404 from a daemon that serves no watch route is raised, not retried forever."""

        def old_daemon(_request: httpx.Request) -> httpx.Response:
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})

        with (
            httpx.Client(transport=httpx.MockTransport(old_daemon)) as http,
            BrokerClient("http://daemon", vault_addr="http://vault", token="s.x", http=http) as c,
            pytest.raises(NotFound, match="no watch stream"),
        ):
            next(iter(c.watch(REF)))
