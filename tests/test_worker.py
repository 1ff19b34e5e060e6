"""The bot's client: copies and signatures from a running daemon, its httpx.Auth, its errors.

The daemon runs in-thread against the session's OpenBao dev server and serves
real loopback HTTP; Backpack is a small fake behind ``httpx.MockTransport`` that
verifies every signature exactly as the exchange does, or, where a verdict
matters, the sandbox exchange on loopback checked by the daemon itself.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import signing_string, verify
from backpack_vault.client.broker import (
    AccessDenied,
    BrokerClient,
    BrokerUnavailable,
    CopyUnavailable,
    KeyPending,
    KeyRetired,
    KeyRevoked,
    is_rejection,
)
from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyPair, KeyRef, Status
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault, free_port
from backpack_vault.errors import (
    InvalidInput,
    KeyNotUsable,
    NotAuthenticated,
    NotPermitted,
    UnknownKey,
    UpstreamError,
)
from backpack_vault.testing import NOW, FakeClock, store_key, wait_until
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.vault.client import Provisioner, Vault


@dataclass
class FakeBackpack:
    """Verifies signatures like Backpack; answers 401 UNAUTHORIZED for revoked keys."""

    revoked: set[str] = field(default_factory=set)
    accepted: list[tuple[str, Any]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        endpoint = lookup(request.method, request.url.path)
        params = json.loads(request.content) if request.content else dict(request.url.params)
        api_key = request.headers["X-API-Key"]
        if api_key in self.revoked:
            return httpx.Response(401, json={"code": "UNAUTHORIZED", "message": "Unauthorized"})
        message = signing_string(
            endpoint.instruction,
            params or None,
            int(request.headers["X-Timestamp"]),
            int(request.headers["X-Window"]),
        )
        if not verify(api_key, message, request.headers["X-Signature"]):
            return httpx.Response(
                400, json={"code": "INVALID_CLIENT_REQUEST", "message": "Invalid signature"}
            )
        self.accepted.append((endpoint.instruction, params))
        return httpx.Response(200, json={})


@dataclass
class Env:
    url: str
    vault_addr: str
    root: Secret
    vault: Vault
    daemon: Daemon
    reports: list[tuple[str, str]]
    broker_calls: list[str]
    http: httpx.Client
    clients: list[BrokerClient] = field(default_factory=list)

    def client(self, token: Secret | None = None, **kwargs: Any) -> BrokerClient:
        client = BrokerClient(
            self.url,
            vault_addr=self.vault_addr,
            token=token or self.root,
            http=self.http,
            **kwargs,
        )
        self.clients.append(client)  # closed at the end: their watcher threads end
        return client

    def calls(self, suffix: str, key: str = "main/bot-a") -> int:
        return self.broker_calls.count(f"/v1/keys/{key}{suffix}")


@pytest.fixture
def env(vault: Vault, vault_settings: VaultSettings, dev_vault: DevVault) -> Iterator[Env]:
    reports: list[tuple[str, str]] = []
    calls: list[str] = []
    settings = Settings(vault=vault_settings, broker=BrokerSettings(), checks=CheckSettings())
    daemon = Daemon(
        settings,
        vault=vault,
        report=lambda ref, reason: reports.append((str(ref), reason)),
        report_interval_s=0.01,
        feed_interval_s=0.05,
    )

    def count(request: httpx.Request) -> None:
        calls.append(request.url.path)

    with (
        daemon,
        ServerThread(daemon.app) as server,
        httpx.Client(event_hooks={"request": [count]}) as http,
    ):
        env = Env(
            server.url, dev_vault.addr, dev_vault.root_token, vault, daemon, reports, calls, http
        )
        yield env
        for client in env.clients:
            client.close()


@pytest.fixture
def pair(vault: Vault) -> KeyPair:
    return store_key(vault, KeyRef("main", "bot-a"))


ROUTES = [
    ("GET", "/api/v1/capital", {}, None),
    ("GET", "/api/v1/orders", {"symbol": "SOL_USDC"}, None),
    ("POST", "/api/v1/order", {}, {"symbol": "SOL_USDC", "side": "Bid", "price": "141.5",
                                   "quantity": "1", "orderType": "Limit", "postOnly": True}),
    ("POST", "/api/v1/orders", {}, [{"symbol": "SOL_USDC", "side": "Bid", "quantity": "1"},
                                    {"symbol": "SOL_USDC", "side": "Ask", "quantity": "2"}]),
    ("DELETE", "/api/v1/order", {}, {"symbol": "SOL_USDC", "orderId": "28"}),
]  # fmt: skip
ROUTE_IDS = ["capital-no-params", "orders-query", "order-json-body", "batch-orders", "cancel-body"]


class TestAuth:
    @pytest.mark.parametrize("mode", ["copy", "sign"], ids=str)
    @pytest.mark.parametrize(("method", "path", "query", "body"), ROUTES, ids=ROUTE_IDS)
    @pytest.mark.usefixtures("pair")
    def test_requests_are_signed_as_backpack_expects(
        self,
        env: Env,
        mode: str,
        method: str,
        path: str,
        query: dict[str, str],
        body: Any,
    ) -> None:
        """The instruction comes from method + path, params from the query or JSON body."""
        exchange = FakeBackpack()
        auth = env.client().auth("main/bot-a", mode=mode)  # type: ignore[arg-type]
        with httpx.Client(
            base_url="https://api.backpack.exchange",
            transport=httpx.MockTransport(exchange),
            auth=auth,
        ) as backpack:
            answer = backpack.request(method, path, params=query, json=body)
        assert answer.status_code == 200
        assert exchange.accepted == [(lookup(method, path).instruction, body or query)]

    @pytest.mark.usefixtures("pair")
    def test_copy_mode_reuses_a_copy_until_two_thirds_of_its_life(self, env: Env) -> None:
        """One copy serves many requests; at about 2/3 of copy_ttl a fresh one is fetched."""
        clock = FakeClock()
        exchange = FakeBackpack()
        auth = env.client(clock=clock).auth("main/bot-a")
        with httpx.Client(transport=httpx.MockTransport(exchange), auth=auth) as backpack:
            for _ in range(3):
                backpack.get("https://api.backpack.exchange/api/v1/capital")
            clock.advance(900 * 0.6)
            backpack.get("https://api.backpack.exchange/api/v1/capital")
            copies_before_refresh = env.broker_calls.count("/v1/keys/main/bot-a/copy")
            clock.advance(900 * 0.1)
            backpack.get("https://api.backpack.exchange/api/v1/capital")
        assert copies_before_refresh == 1
        assert env.broker_calls.count("/v1/keys/main/bot-a/copy") == 2
        assert len(exchange.accepted) == 5

    @pytest.mark.parametrize("mode", ["copy", "sign"], ids=str)
    def test_a_rejection_is_reported_to_the_daemon_once(
        self, env: Env, pair: KeyPair, mode: str
    ) -> None:
        """A 401 from Backpack reaches the daemon's report hook; repeats are not re-sent."""
        exchange = FakeBackpack(revoked={pair.api_key})
        # This daemon only records reports: no verdict comes, so the wait for one is short.
        auth = env.client().auth("main/bot-a", mode=mode, confirm_s=0.2)  # type: ignore[arg-type]
        with httpx.Client(transport=httpx.MockTransport(exchange), auth=auth) as backpack:
            first = backpack.get("https://api.backpack.exchange/api/v1/account")
            backpack.get("https://api.backpack.exchange/api/v1/account")
        assert first.status_code == 401
        assert env.reports == [("main/bot-a", "Backpack answered 401 UNAUTHORIZED Unauthorized")]

    @pytest.mark.usefixtures("pair")
    def test_an_unknown_route_cannot_be_signed(self, env: Env) -> None:
        """A path the instruction table does not know raises InvalidInput before sending."""
        exchange = FakeBackpack()
        auth = env.client().auth("main/bot-a")
        with (
            httpx.Client(transport=httpx.MockTransport(exchange), auth=auth) as backpack,
            pytest.raises(InvalidInput, match="not a signed Backpack endpoint"),
        ):
            backpack.get("https://api.backpack.exchange/api/v1/nothing")

    @pytest.mark.parametrize("mode", ["copy", "sign"], ids=str)
    def test_a_read_only_key_refuses_order_execute(self, env: Env, vault: Vault, mode: str) -> None:
        """In both modes a read-only key raises AccessDenied for a state-changing request."""
        store_key(vault, KeyRef("main", "viewer"), read_only=True)
        auth = env.client().auth("main/viewer", mode=mode)  # type: ignore[arg-type]
        with (
            httpx.Client(transport=httpx.MockTransport(FakeBackpack()), auth=auth) as backpack,
            pytest.raises(AccessDenied, match="read-only"),
        ):
            backpack.post("https://api.backpack.exchange/api/v1/order", json={"symbol": "X"})


class TestClient:
    def test_copy_returns_the_unwrapped_key(self, env: Env, pair: KeyPair) -> None:
        """copy() unwraps at Vault and returns the key with its secret kept as a Secret."""
        copy = env.client().copy("main/bot-a")
        assert copy.api_key == pair.api_key
        assert copy.api_secret == pair.secret
        assert copy.version == 1
        assert not copy.read_only
        assert 890 < copy.expires_at - time.time() <= 900
        assert pair.secret.reveal() not in repr(copy)

    def test_sign_returns_the_four_headers(self, env: Env, pair: KeyPair) -> None:
        """sign() gets headers signed by the daemon, verifiable with the public key."""
        stamp = int(time.time() * 1000)
        headers = env.client().sign("main/bot-a", "orderCancel", {"orderId": "28"}, stamp, 6000)
        message = signing_string("orderCancel", {"orderId": "28"}, stamp, 6000)
        assert verify(pair.api_key, message, headers["X-Signature"])
        assert headers["X-Window"] == "6000"

    def test_info_reports_status_without_the_secret(self, env: Env, pair: KeyPair) -> None:
        """info() returns the key's metadata and this worker's grants."""
        info = env.client().info("main/bot-a")
        assert info["status"] == "active"
        assert info["grants"]["copy"] is True
        assert pair.secret.reveal() not in json.dumps(info)

    @pytest.mark.usefixtures("pair")
    def test_report_reaches_the_daemon(self, env: Env) -> None:
        """report() tells the daemon; its report hook receives key and reason."""
        env.client().report("main/bot-a", "Invalid signature")
        assert env.reports == [("main/bot-a", "Invalid signature")]

    @pytest.mark.usefixtures("pair")
    def test_the_token_file_is_read_for_every_call(self, env: Env, tmp_path: Path) -> None:
        """A token file rewritten by Vault Agent is picked up without a restart."""
        token_file = tmp_path / "token"
        token_file.write_text("s.not-valid\n")
        client = BrokerClient(
            env.url, vault_addr=env.vault_addr, token_file=token_file, http=env.http
        )
        with pytest.raises(NotAuthenticated):
            client.info("main/bot-a")
        token_file.write_text(env.root.reveal() + "\n")
        assert client.info("main/bot-a")["status"] == "active"


class TestErrors:
    @pytest.mark.parametrize(
        ("status", "error"),
        [(Status.PENDING, KeyPending), (Status.REVOKED, KeyRevoked), (Status.RETIRED, KeyRetired)],
        ids=["pending", "revoked", "retired"],
    )
    @pytest.mark.parametrize("call", ["copy", "sign"], ids=str)
    def test_each_unusable_status_has_its_own_exception(
        self, env: Env, vault: Vault, status: Status, error: type[KeyNotUsable], call: str
    ) -> None:
        """KeyPending, KeyRevoked and KeyRetired are distinct KeyNotUsable subclasses."""
        store_key(vault, KeyRef("main", "old"), status=status)
        client = env.client()
        attempt: Callable[[], object] = {
            "copy": lambda: client.copy("main/old"),
            "sign": lambda: client.sign("main/old", "accountQuery"),
        }[call]
        with pytest.raises(error, match=status.value) as caught:
            attempt()
        assert isinstance(caught.value, KeyNotUsable)
        assert caught.value.status == status.value

    @pytest.mark.usefixtures("pair")
    def test_no_grant_is_access_denied(self, env: Env, vault: Vault) -> None:
        """A worker whose policy has no grant gets AccessDenied (a NotPermitted)."""
        token = Provisioner(vault).create_token(["default"])
        with pytest.raises(AccessDenied, match="no grant") as caught:
            env.client(token).copy("main/bot-a")
        assert isinstance(caught.value, NotPermitted)

    @pytest.mark.usefixtures("pair")
    def test_an_unknown_token_is_not_authenticated(self, env: Env) -> None:
        """A token Vault does not know raises NotAuthenticated."""
        with pytest.raises(NotAuthenticated):
            env.client(Secret("s.unknown")).sign("main/bot-a", "accountQuery")

    def test_an_unknown_key_is_unknown(self, env: Env) -> None:
        """A key that is not stored raises UnknownKey."""
        with pytest.raises(UnknownKey):
            env.client().copy("main/nothing")

    def test_an_unreachable_daemon_is_broker_unavailable(self, dev_vault: DevVault) -> None:
        """Connection failures raise BrokerUnavailable (an UpstreamError), never httpx errors."""
        client = BrokerClient(
            f"http://127.0.0.1:{free_port()}", vault_addr=dev_vault.addr, token="s.x"
        )
        with client, pytest.raises(BrokerUnavailable, match="unreachable") as caught:
            client.copy("main/bot-a")
        assert isinstance(caught.value, UpstreamError)

    @pytest.mark.usefixtures("pair")
    def test_a_copy_revoked_before_unwrapping_is_copy_unavailable(
        self, env: Env, vault: Vault
    ) -> None:
        """A key retired between handout and unwrap leaves a wrapping token that cannot unwrap."""
        ref = KeyRef("main", "bot-a")

        def retire(response: httpx.Response) -> None:
            if response.request.url.path.endswith("/copy"):
                vault.set_status(ref, Status.RETIRED, now=NOW)
                env.daemon.key_status_changed(ref, Status.RETIRED)

        with httpx.Client(event_hooks={"response": [retire]}) as http:
            client = BrokerClient(env.url, vault_addr=env.vault_addr, token=env.root, http=http)
            with pytest.raises(CopyUnavailable, match="could not be unwrapped"):
                client.copy(ref)
            with pytest.raises(KeyRetired):
                client.copy(ref)


class TestRejections:
    @pytest.mark.parametrize(
        ("status", "body", "expected"),
        [
            (401, {"code": "UNAUTHORIZED", "message": "x"}, True),
            (400, {"code": "INVALID_CLIENT_REQUEST", "message": "Invalid signature"}, True),
            (403, {}, True),
            (401, {"code": "INVALID_CLIENT_REQUEST", "message": "Request has expired"}, False),
            (400, {"code": "INVALID_ORDER", "message": "Invalid order"}, False),
            (429, {"code": "TOO_MANY_REQUESTS", "message": "slow down"}, False),
            (200, {}, False),
        ],
        ids=["unauthorized", "invalid-signature", "bare-403", "expired", "bad-order", "429", "ok"],
    )
    def test_only_key_rejections_count(
        self, status: int, body: dict[str, str], expected: bool
    ) -> None:
        """Clock, order and rate-limit errors are not reported as a rejected key."""
        assert is_rejection(httpx.Response(status, json=body)) is expected


BACKPACK = "https://api.backpack.exchange"


class TestWatching:
    @pytest.mark.parametrize(
        ("status", "error"),
        [(Status.RETIRED, KeyRetired), (Status.REVOKED, KeyRevoked)],
        ids=["retired", "revoked"],
    )
    def test_copy_mode_drops_its_copy_when_the_key_is_cut_off(
        self, env: Env, vault: Vault, pair: KeyPair, status: Status, error: type[KeyNotUsable]
    ) -> None:
        """The watch tells the auth; the next request raises without asking anyone."""
        exchange = FakeBackpack()
        auth = env.client().auth("main/bot-a")
        with httpx.Client(transport=httpx.MockTransport(exchange), auth=auth) as backpack:
            assert backpack.get(f"{BACKPACK}/api/v1/capital").status_code == 200
            wait_until(lambda: auth.watching, 10, "the watch connects")
            vault.set_status(KeyRef("main", "bot-a"), status, now=NOW)  # keys retire / revoke
            wait_until(lambda: auth.unusable == status.value, 10, "the watch tells the auth")
            for _ in range(2):
                with pytest.raises(error):
                    backpack.get(f"{BACKPACK}/api/v1/capital")
        assert len(exchange.accepted) == 1
        assert env.calls("/copy") == 1  # never a fresh copy of a cut-off key
        assert pair.secret.reveal() not in repr(auth.__dict__)

    @pytest.mark.usefixtures("pair")
    def test_a_reinstated_key_is_usable_again(self, env: Env, vault: Vault) -> None:
        """revoked -> active (keys reinstate): the watch lifts the mark."""
        ref = KeyRef("main", "bot-a")
        auth = env.client().auth(ref)
        with httpx.Client(transport=httpx.MockTransport(FakeBackpack()), auth=auth) as backpack:
            backpack.get(f"{BACKPACK}/api/v1/capital")
            wait_until(lambda: auth.watching, 10)
            vault.set_status(ref, Status.REVOKED, now=NOW)
            wait_until(lambda: auth.unusable == "revoked", 10)
            vault.set_status(ref, Status.ACTIVE, now=NOW, reason="reinstated")
            wait_until(lambda: auth.unusable is None, 10)
            assert backpack.get(f"{BACKPACK}/api/v1/capital").status_code == 200
        assert env.calls("/copy") == 2

    @pytest.mark.usefixtures("pair")
    def test_sign_mode_is_refused_once_the_daemon_learns_of_a_retire(
        self, env: Env, vault: Vault
    ) -> None:
        """The daemon refuses signatures of a retired key (409): the client raises KeyRetired."""
        ref = KeyRef("main", "bot-a")
        client = env.client()
        client.sign(ref, "accountQuery")  # the daemon now holds the key in its cache
        vault.set_status(ref, Status.RETIRED, now=NOW)

        def refused() -> bool:
            try:
                client.sign(ref, "accountQuery")
            except KeyRetired:
                return True
            return False

        wait_until(refused, 10, "KeyRetired")

    def test_close_ends_the_watcher_thread(self, env: Env, pair: KeyPair) -> None:
        """BrokerClient.close() stops the watch of every auth it made."""
        del pair
        client = env.client()
        auth = client.auth("main/bot-a")
        auth.current_copy()
        wait_until(lambda: auth.watching, 10)
        threads = [t for t in threading.enumerate() if t.name == "backpack-vault-watch:main/bot-a"]
        assert threads
        client.close()
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive()


@pytest.fixture
def checked(
    vault: Vault, vault_settings: VaultSettings, dev_vault: DevVault, sandbox: SandboxAdmin
) -> Iterator[Env]:
    """A daemon that checks reported keys against the sandbox, as `serve` does."""
    calls: list[str] = []
    checks = CheckSettings(backpack_url=sandbox.url)
    daemon = Daemon(
        Settings(vault=vault_settings, broker=BrokerSettings(), checks=checks),
        vault=vault,
        confirm_delay_s=0,
        feed_interval_s=0.05,
    )
    with (
        daemon,
        ServerThread(daemon.app) as server,
        httpx.Client(event_hooks={"request": [lambda r: calls.append(r.url.path)]}) as http,
    ):
        env = Env(server.url, dev_vault.addr, dev_vault.root_token, vault, daemon, [], calls, http)
        yield env
        for client in env.clients:
            client.close()


class TestRejectionInCopyMode:
    def test_one_report_one_confirmation_then_key_revoked(
        self, checked: Env, vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """Revoked at the exchange: the bot's request is reported once, the daemon's verdict
        awaited once, and KeyRevoked raised; later requests raise without a round trip."""
        ref = KeyRef("main", "bot-a")
        pair = store_key(vault, ref, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        auth = checked.client().auth(ref, confirm_s=15)  # generous: the verdict comes in < 1 s
        with httpx.Client(base_url=sandbox.url, auth=auth) as bot:
            assert bot.get("/api/v1/capital").status_code == 200
            sandbox.revoke(pair.api_key)
            with pytest.raises(KeyRevoked):
                bot.get("/api/v1/capital")
            with pytest.raises(KeyRevoked):
                bot.get("/api/v1/capital")
        assert sandbox.count("GET /api/v1/capital", pair.api_key) == 2
        reports = checked.daemon.metrics.reports.labels(key=str(ref), outcome="ok")
        assert reports._value.get() == 1
        assert checked.calls("/report") == 1
        assert checked.calls("/copy") == 1
        assert checked.calls("") <= 1  # at most one info: the watch brought the verdict
        assert vault.read_record(ref).status is Status.REVOKED
