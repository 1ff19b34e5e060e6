"""The copy keeper: one copy of a key, fetched, kept while the daemon is away, refetched
when its wrapping token was revoked, dropped on a rotation, cut off in time.

A daemon serves loopback HTTP over the session's OpenBao dev server; Backpack is a
verifier behind ``httpx.MockTransport`` that checks each signature against the
``X-API-Key`` it came with and notes that key, so a test sees which key signed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import signing_string, verify
from backpack_vault.cli import cli
from backpack_vault.client.aio import AsyncBrokerClient
from backpack_vault.client.broker import BrokerClient
from backpack_vault.client.copies import CopyKeeper
from backpack_vault.client.watch import WatchEvent, parse_sse
from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyPair, KeyRef, Status, generate_pair
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread, free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import BrokerUnavailable, CopyUnavailable, KeyRetired, KeyRevoked
from backpack_vault.integrations.handle import KeyHandle
from backpack_vault.testing import FakeClock, now_iso, rotate_now, store_key, wait_until
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.vault.client import Vault
from backpack_vault.watch import frame

REF = KeyRef("main", "bot-a")
BACKPACK = "https://api.backpack.exchange"
BOUND = 10.0


@dataclass
class Signed:
    """Backpack's side: which API key signed each accepted request."""

    keys: list[str] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        params = json.loads(request.content) if request.content else dict(request.url.params)
        message = signing_string(
            lookup(request.method, request.url.path).instruction,
            params or None,
            int(request.headers["X-Timestamp"]),
            int(request.headers["X-Window"]),
        )
        api_key = request.headers["X-API-Key"]
        if not verify(api_key, message, request.headers["X-Signature"]):
            return httpx.Response(400, json={"code": "INVALID_CLIENT_REQUEST", "message": "sig"})
        self.keys.append(api_key)
        return httpx.Response(200, json={})


@dataclass
class Desk:
    url: str
    vault_addr: str
    root: Secret
    vault: Vault
    daemon: Daemon
    calls: list[str]
    hooks: list[Callable[[httpx.Response], None]]
    http: httpx.Client
    clients: list[BrokerClient] = field(default_factory=list)

    def broker(self, **kwargs: Any) -> BrokerClient:
        client = BrokerClient(
            self.url, vault_addr=self.vault_addr, token=self.root, http=self.http, **kwargs
        )
        self.clients.append(client)
        return client

    def count(self, suffix: str) -> int:
        return self.calls.count(f"/v1/keys/{REF}{suffix}")


@pytest.fixture
def desk(vault: Vault, vault_settings: VaultSettings, dev_vault: DevVault) -> Iterator[Desk]:
    calls: list[str] = []
    hooks: list[Callable[[httpx.Response], None]] = []
    daemon = Daemon(
        Settings(vault_settings, BrokerSettings(), CheckSettings()),
        vault=vault,
        feed_interval_s=0.05,
        watch_heartbeat_s=0.2,
    )

    def on_response(response: httpx.Response) -> None:
        for hook in list(hooks):  # noqa: PERF101 - a hook may remove itself
            hook(response)

    with (
        daemon,
        ServerThread(daemon.app) as server,
        httpx.Client(
            event_hooks={
                "request": [lambda r: calls.append(r.url.path)],
                "response": [on_response],
            }
        ) as http,
    ):
        desk = Desk(
            server.url, dev_vault.addr, dev_vault.root_token, vault, daemon, calls, hooks, http
        )
        yield desk
        for client in desk.clients:
            client.close()


def spend_wrapping_tokens(desk: Desk, *, times: int) -> list[str]:
    """The next ``times`` copies the daemon hands out are unwrapped by someone else first
    (as when the daemon revokes the unclaimed copies of a key that failed over)."""
    spent: list[str] = []

    def spend(response: httpx.Response) -> None:
        if len(spent) >= times or not response.request.url.path.endswith("/copy"):
            return
        response.read()
        wrap = response.json()["wrap_token"]
        httpx.post(
            f"{desk.vault_addr}/v1/sys/wrapping/unwrap", headers={"X-Vault-Token": wrap}
        ).raise_for_status()
        spent.append(wrap)

    desk.hooks.append(spend)
    return spent


def rotate(vault: Vault, ref: KeyRef) -> KeyPair:
    """A successor accepted and switched to, as the daemon does: ``rotated`` on the feed."""
    return rotate_now(vault, ref)


def as_streamed(name: str, data: dict[str, Any]) -> WatchEvent:
    """One event as the daemon frames it and the client's parser reads it back."""
    (event,) = parse_sse(frame(name, data, event_id=9).decode().split("\n"))
    return event


class TestFetching:
    def test_while_the_daemon_is_unreachable_the_copy_held_serves_until_it_expires(
        self, desk: Desk, vault: Vault
    ) -> None:
        store_key(vault, REF)
        clock = FakeClock()
        broker = desk.broker(clock=clock)
        keeper = CopyKeeper(broker, REF, watch=False, clock=clock)
        first = keeper.current()
        broker.url = f"http://127.0.0.1:{free_port()}"  # the daemon is gone
        clock.advance(900 * 0.7)  # a refresh is due, and cannot be had
        assert keeper.current() is first
        clock.advance(900 * 0.3)  # now the copy has expired
        with pytest.raises(BrokerUnavailable):
            keeper.current()

    def test_a_copy_whose_wrapping_token_was_revoked_is_fetched_once_more(
        self, desk: Desk, vault: Vault
    ) -> None:
        """The key is active, so a copy that does not unwrap is asked for again, once."""
        pair = store_key(vault, REF)
        spent = spend_wrapping_tokens(desk, times=1)
        keeper = CopyKeeper(desk.broker(), REF, watch=False)
        assert keeper.current().api_key == pair.api_key
        assert len(spent) == 1
        assert (desk.count("/copy"), desk.count("")) == (2, 1)

    def test_recheck_asks_the_daemon_what_the_watch_would_have_said(
        self, desk: Desk, vault: Vault
    ) -> None:
        """With no watch: a revoke learned by asking cuts the key off; asked again after
        a reinstatement, the key is usable again."""
        pair = store_key(vault, REF)
        keeper = CopyKeeper(desk.broker(), REF, watch=False)
        assert keeper.current().api_key == pair.api_key
        vault.set_status(REF, Status.REVOKED, now=now_iso(), reason="leaked")
        assert keeper.recheck() == "revoked"
        with pytest.raises(KeyRevoked):
            keeper.current()
        vault.set_status(REF, Status.ACTIVE, now=now_iso(), reason="reinstated")
        assert keeper.recheck() is None
        assert keeper.current().api_key == pair.api_key

    def test_a_copy_that_never_unwraps_is_copy_unavailable_after_one_more_try(
        self, desk: Desk, vault: Vault
    ) -> None:
        store_key(vault, REF)
        spend_wrapping_tokens(desk, times=10)
        keeper = CopyKeeper(desk.broker(), REF, watch=False)
        with pytest.raises(CopyUnavailable):
            keeper.current()
        assert desk.count("/copy") == 2  # never a loop

    def test_a_copy_that_does_not_unwrap_because_the_key_was_retired_is_key_retired(
        self, desk: Desk, vault: Vault
    ) -> None:
        """The daemon revoked the copy as the key was retired: the keeper says which, and
        asks no more."""
        store_key(vault, REF)

        def retire(response: httpx.Response) -> None:
            if response.request.url.path.endswith("/copy"):
                desk.hooks.remove(retire)
                vault.set_status(REF, Status.RETIRED, now=now_iso())
                desk.daemon.key_status_changed(REF, Status.RETIRED)  # its copies are revoked

        desk.hooks.append(retire)
        keeper = CopyKeeper(desk.broker(), REF, watch=False)
        for _ in range(2):
            with pytest.raises(KeyRetired):
                keeper.current()
        assert keeper.cut_off == "retired"
        assert desk.count("/copy") == 1


class TestRotation:
    @pytest.mark.parametrize("mode", ["copy", "sign"], ids=str)
    def test_after_a_rotation_requests_are_signed_by_the_successor(
        self, desk: Desk, vault: Vault, mode: str
    ) -> None:
        """Copy mode: the watch drops the copy, the next request fetches the successor's.
        Sign mode needs nothing: the daemon signs with whatever key the name holds."""
        first = store_key(vault, REF)
        signed = Signed()
        auth = desk.broker().auth(REF, mode=mode)  # type: ignore[arg-type]
        with httpx.Client(transport=httpx.MockTransport(signed), auth=auth) as backpack:
            assert backpack.get(f"{BACKPACK}/api/v1/capital").status_code == 200
            if mode == "copy":
                wait_until(lambda: auth.watching, BOUND, "the watch connects")
            second = rotate(vault, REF)

            def signed_by_the_successor() -> bool:
                assert backpack.get(f"{BACKPACK}/api/v1/capital").status_code == 200
                return signed.keys[-1] == second.api_key

            wait_until(signed_by_the_successor, BOUND, "the successor signs")
        assert signed.keys[0] == first.api_key
        assert set(signed.keys) == {first.api_key, second.api_key}
        if mode == "copy":
            assert desk.count("/copy") == 2
            assert auth.unusable is None

    def test_an_integrations_handle_follows_a_rotation(self, desk: Desk, vault: Vault) -> None:
        """ccxt's and bpx-py's copy mode keep their copy in the same keeper."""
        store_key(vault, REF)
        handle = KeyHandle(desk.broker(), REF, "copy")
        assert handle.copies is not None
        copies = handle.copies
        handle.copy()
        wait_until(lambda: copies.watching, BOUND, "the watch connects")
        second = rotate(vault, REF)
        wait_until(lambda: not copies.held, BOUND, "the watch drops the copy")
        assert handle.copy().api_key == second.api_key
        handle.close()

    @pytest.mark.parametrize(
        ("facts", "kept"),
        [
            ({"api_key": "successor", "version": 2}, False),
            ({"version": 2}, False),
            ({}, False),
            ("own", True),
        ],
        ids=["another-key", "another-version", "unnamed", "the-copys-own-key"],
    )
    def test_a_rotated_event_drops_the_copy_unless_it_names_the_copys_key(
        self, desk: Desk, vault: Vault, facts: dict[str, Any] | str, kept: bool
    ) -> None:
        """The daemon's ``rotated`` frame (status active, the new api_key and version),
        read back by the client's parser: a copy of that very key is kept (a replay after
        a reconnect, say)."""
        store_key(vault, REF)
        keeper = CopyKeeper(desk.broker(), REF, watch=False)
        copy = keeper.current()
        named = {"api_key": copy.api_key, "version": copy.version} if facts == "own" else facts
        data = {"key": str(REF), "status": "active", "seq": 9, "at": now_iso(), **dict(named)}
        assert keeper.on_watch_event(as_streamed("rotated", data)) is True
        assert keeper.held is kept
        assert (keeper.current() is copy) is kept
        assert keeper.cut_off is None

    def test_a_status_frame_or_a_heartbeat_keeps_the_copy(self, desk: Desk, vault: Vault) -> None:
        store_key(vault, REF)
        keeper = CopyKeeper(desk.broker(), REF, watch=False)
        copy = keeper.current()
        keeper.on_watch_event(as_streamed("status", {"key": str(REF), "status": "active"}))
        keeper.on_watch_event(as_streamed("heartbeat", {}))
        assert keeper.current() is copy
        assert desk.count("/copy") == 1


class TestVerdict:
    def test_without_a_watch_the_verdict_is_asked_of_info(self, desk: Desk, vault: Vault) -> None:
        store_key(vault, REF)
        keeper = CopyKeeper(desk.broker(), REF, watch=False)
        keeper.current()
        vault.set_status(REF, Status.REVOKED, now=now_iso())
        assert keeper.verdict(BOUND) == "revoked"
        with pytest.raises(KeyRevoked):
            keeper.current()

    def test_no_verdict_within_confirm_s_leaves_the_key_usable(
        self, desk: Desk, vault: Vault
    ) -> None:
        store_key(vault, REF)
        keeper = CopyKeeper(desk.broker(), REF, watch=False)
        copy = keeper.current()
        started = time.monotonic()
        assert keeper.verdict(0.6) is None
        assert time.monotonic() - started >= 0.6
        assert desk.count("") >= 2  # no watch: info is asked again meanwhile
        assert keeper.current() is copy

    def test_the_watch_ends_the_wait_at_once(self, desk: Desk, vault: Vault) -> None:
        store_key(vault, REF)
        keeper = CopyKeeper(desk.broker(), REF)
        keeper.current()
        wait_until(lambda: keeper.watching, BOUND, "the watch connects")
        verdicts: list[str | None] = []
        waiting = threading.Thread(target=lambda: verdicts.append(keeper.verdict(BOUND)))
        waiting.start()
        # The wait asks the daemon once ("active"), then only the watch can end it early.
        wait_until(lambda: desk.count("") == 1, BOUND, "the verdict's one question")
        started = time.monotonic()
        vault.set_status(REF, Status.RETIRED, now=now_iso())
        waiting.join(BOUND)
        assert verdicts == ["retired"]
        assert time.monotonic() - started < BOUND / 2
        assert desk.count("") == 1  # asked once: the watch brought the verdict
        keeper.close()


# -- a failover while Backpack refuses the key -----------------------------------------------------


@dataclass
class Checked:
    url: str
    vault_addr: str
    root: Secret
    sandbox: SandboxAdmin
    cli_env: dict[str, str]


@pytest.fixture
def checked(
    vault_settings: VaultSettings, dev_vault: DevVault, sandbox: SandboxAdmin
) -> Iterator[Checked]:
    """A daemon that checks keys (and standbys) every second against the sandbox."""
    settings = Settings(
        vault_settings,
        BrokerSettings(),
        CheckSettings(backpack_url=sandbox.url, interval=1.0, jitter=0.0, lease_ttl=5.0),
    )
    daemon = Daemon(
        settings,
        confirm_delay_s=0,
        feed_interval_s=0.1,
        key_sync_interval_s=0.3,
        watch_heartbeat_s=0.5,
    )
    env = {
        "VAULT_ADDR": vault_settings.addr,
        "VAULT_TOKEN": dev_vault.root_token.reveal(),
        "BACKPACK_VAULT_KV_PREFIX": vault_settings.kv_prefix,
        "BACKPACK_VAULT_BACKPACK_URL": sandbox.url,
        "BACKPACK_VAULT_LOG_LEVEL": "warning",
    }
    with daemon, ServerThread(daemon.app) as server:
        yield Checked(server.url, dev_vault.addr, dev_vault.root_token, sandbox, env)


def with_ready_standby(vault: Vault, checked: Checked) -> tuple[KeyPair, KeyPair]:
    """REF at the sandbox, and a standby for it (``keys add --standby``) the daemon has
    found working."""
    pair = store_key(vault, REF, exchange=checked.sandbox.url)
    checked.sandbox.register(pair.api_key)
    standby = generate_pair()
    checked.sandbox.register(standby.api_key)
    added = CliRunner().invoke(
        cli,
        ["keys", "add", str(REF), "--standby", "--api-key", standby.api_key],
        env=checked.cli_env,
        input=standby.secret.reveal(),
    )
    assert added.exit_code == 0, added.output

    def ready() -> bool:
        nxt = vault.read_record(REF).next
        return nxt is not None and nxt.state.value == "ready"

    wait_until(ready, 30, "the standby is ready")
    return pair, standby


class TestFailover:
    def test_a_request_refused_as_the_key_fails_over_is_sent_again_by_the_standby(
        self, vault: Vault, checked: Checked
    ) -> None:
        """Copy mode: Backpack refuses the key, the report makes the daemon switch the name
        to its standby, the verdict wait sees ``rotated``, and the same request goes out
        once more signed by the standby. The bot sees no error."""
        pair, standby = with_ready_standby(vault, checked)
        with BrokerClient(checked.url, vault_addr=checked.vault_addr, token=checked.root) as b:
            auth = b.auth(REF, confirm_s=30)  # generous: the switch comes within a second
            with httpx.Client(base_url=checked.sandbox.url, auth=auth) as bot:
                assert bot.get("/api/v1/capital").status_code == 200
                wait_until(lambda: auth.watching, BOUND, "the watch connects")
                checked.sandbox.revoke(pair.api_key)
                answer = bot.get("/api/v1/capital")
                later = bot.get("/api/v1/capital")
        assert (answer.status_code, later.status_code) == (200, 200)
        assert answer.request.headers["X-API-Key"] == standby.api_key
        assert checked.sandbox.count("GET /api/v1/capital", pair.api_key) == 2
        assert auth.unusable is None

    def test_the_async_auth_does_the_same(self, vault: Vault, checked: Checked) -> None:
        pair, standby = with_ready_standby(vault, checked)

        async def run() -> httpx.Response:
            async with AsyncBrokerClient(
                checked.url, vault_addr=checked.vault_addr, token=checked.root
            ) as broker:
                auth = broker.auth(REF, confirm_s=30)
                async with httpx.AsyncClient(base_url=checked.sandbox.url, auth=auth) as bot:
                    assert (await bot.get("/api/v1/capital")).status_code == 200
                    while not auth.watching:  # noqa: ASYNC110 - the watch task sets no Event
                        await asyncio.sleep(0.01)
                    checked.sandbox.revoke(pair.api_key)
                    return await bot.get("/api/v1/capital")

        answer = asyncio.run(asyncio.wait_for(run(), 60))
        assert answer.status_code == 200
        assert answer.request.headers["X-API-Key"] == standby.api_key
        assert checked.sandbox.count("GET /api/v1/capital", pair.api_key) == 2
