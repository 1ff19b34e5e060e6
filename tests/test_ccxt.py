"""backpack_vault.ccxt: real ccxt (sync and async) trading on the sandbox through a daemon.

The daemon runs in-thread against the session's OpenBao dev server and checks
keys against the session's sandbox exchange, which verifies every signature
exactly as ``docs/backpack-api.md`` says (a wrong one is 400 "Invalid signature").
The bot holds a worker token with a real policy, rendered as ``backpack-vault
policy worker`` prints it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

import ccxt
import ccxt.async_support
import httpx
import pytest
from structlog.testing import capture_logs

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import signing_string, verify
from backpack_vault.ccxt import Backpack, async_backpack, backpack, ccxt_error
from backpack_vault.client.broker import BrokerClient
from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyPair, KeyRef, Status
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import (
    AccessDenied,
    BrokerUnavailable,
    ConfigError,
    InvalidInput,
    KeyNotUsable,
    KeyPending,
    KeyRetired,
    KeyRevoked,
    NotAuthenticated,
    RateLimited,
    ReadOnlyKey,
    ServiceError,
    UnknownKey,
)
from backpack_vault.integrations.handle import KeyHandle
from backpack_vault.integrations.params import signable, signable_batch
from backpack_vault.testing import NOW, FakeClock, store_key, wait_until
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.setup import READ_ONLY_INSTRUCTIONS, render_worker_policy

REF = KeyRef("main", "bot-a")
TRADING = ("orderExecute", "orderCancel", "orderCancelAll")
MODES = ["sign", "copy"]
CUTOFF_S = 1.0  # the bot raises within this long of the daemon learning of a cut-off
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ccxt_sign_mode.py"


# -- a daemon, a key at the sandbox, a worker -----------------------------------------------


@dataclass
class Desk:
    """A daemon that checks keys against the sandbox, one stored key, and a worker's token."""

    url: str
    vault_addr: str
    vault: Vault
    settings: VaultSettings
    sandbox: SandboxAdmin
    pair: KeyPair
    token: Secret
    root: Secret
    http: httpx.Client
    calls: list[str]
    clients: list[BrokerClient] = field(default_factory=list)

    def worker(self, *instructions: str, copy: bool = True) -> Secret:
        """A token whose policy grants copies (``copy``) and these signatures of REF."""
        hcl = render_worker_policy(
            self.settings.grant_prefix, REF.subaccount, REF.name, instructions, copy=copy
        )
        name = f"{self.settings.kv_prefix}-w{len(self.clients)}-{int(copy)}-{len(instructions)}"
        provisioner = Provisioner(self.vault)
        provisioner.ensure_policy(name, hcl)
        return provisioner.create_token([name])

    def broker(self, token: Secret | None = None, **kwargs: Any) -> BrokerClient:
        client = BrokerClient(
            self.url,
            vault_addr=self.vault_addr,
            token=token or self.token,
            http=self.http,
            **kwargs,
        )
        self.clients.append(client)
        return client

    def config(self) -> dict[str, Any]:
        return {
            "enableRateLimit": False,
            "urls": {"api": {"public": self.sandbox.url, "private": self.sandbox.url}},
        }

    def exchange(self, mode: str, token: Secret | None = None, **kwargs: Any) -> Any:
        return backpack(self.config(), broker=self.broker(token), key=REF, mode=mode, **kwargs)  # type: ignore[arg-type]

    def calls_to(self, suffix: str) -> int:
        return self.calls.count(f"/v1/keys/{REF}{suffix}")


@pytest.fixture
def desk(
    vault: Vault, vault_settings: VaultSettings, dev_vault: DevVault, sandbox: SandboxAdmin
) -> Iterator[Desk]:
    calls: list[str] = []
    daemon = Daemon(
        Settings(vault_settings, BrokerSettings(), CheckSettings(backpack_url=sandbox.url)),
        vault=vault,
        confirm_delay_s=0,
        feed_interval_s=0.05,
    )
    pair = store_key(vault, REF, exchange=sandbox.url)
    sandbox.register(pair.api_key)
    with (
        daemon,
        ServerThread(daemon.app) as server,
        httpx.Client(event_hooks={"request": [lambda r: calls.append(r.url.path)]}) as http,
    ):
        desk = Desk(
            server.url,
            dev_vault.addr,
            vault,
            vault_settings,
            sandbox,
            pair,
            Secret(""),
            dev_vault.root_token,
            http,
            calls,
        )
        desk.token = desk.worker(*READ_ONLY_INSTRUCTIONS, *TRADING)
        yield desk
        for client in desk.clients:
            client.close()


def cause(error: BaseException) -> BaseException | None:
    return error.__cause__


# -- the unified calls ----------------------------------------------------------------------


class TestUnifiedCalls:
    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_a_bot_trades_through_the_daemon(self, desk: Desk, mode: str) -> None:
        """Markets, balance, ticker, book, limit/market/IOC orders, open orders, cancels, fills."""
        exchange = desk.exchange(mode)
        markets = exchange.load_markets()
        assert markets["SOL/USDC"]["precision"]["price"] == 0.01
        assert exchange.fetch_ticker("SOL/USDC")["last"] == 186.4
        assert exchange.fetch_order_book("SOL/USDC")["asks"][0] == [186.42, 25.0]
        assert exchange.fetch_balance()["USDC"]["free"] == 100000.0
        resting = exchange.create_order("SOL/USDC", "limit", "buy", 2, 180.5)
        assert (resting["status"], resting["price"]) == ("open", 180.5)
        assert [o["id"] for o in exchange.fetch_open_orders("SOL/USDC")] == [resting["id"]]
        assert exchange.cancel_order(resting["id"], "SOL/USDC")["status"] == "canceled"
        bought = exchange.create_order("SOL/USDC", "market", "buy", 2)
        assert (bought["status"], bought["filled"]) == ("closed", 2.0)
        ioc = exchange.create_order("SOL/USDC", "limit", "buy", 1, 150, {"timeInForce": "IOC"})
        assert (ioc["status"], ioc["filled"]) == ("canceled", 0.0)
        exchange.create_order("SOL/USDC", "limit", "sell", 1, 200)
        exchange.create_order("SOL/USDC", "limit", "sell", 1.5, 201.25)
        assert [o["status"] for o in exchange.cancel_all_orders("SOL/USDC")] == ["canceled"] * 2
        [trade] = exchange.fetch_my_trades("SOL/USDC")
        assert (trade["side"], trade["price"], trade["order"]) == ("buy", 186.42, bought["id"])
        assert exchange.fetch_open_orders() == []
        assert exchange.apiKey == desk.pair.api_key
        if mode == "sign":
            assert exchange.secret == ""
            assert desk.calls_to("/copy") == 0
            signed = sum(desk.sandbox.stats()["keys"][desk.pair.api_key].values())
            assert desk.calls_to("/sign") == signed  # one daemon signature per private request
        else:
            assert exchange.secret == desk.pair.secret.reveal()
            assert desk.calls_to("/copy") == 1
            assert desk.calls_to("/sign") == 0

    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_batch_orders_are_signed_as_one_list(self, desk: Desk, mode: str) -> None:
        """create_orders sends POST /api/v1/orders with a list; the daemon signs that list."""
        exchange = desk.exchange(mode)
        exchange.load_markets()
        placed = exchange.create_orders(
            [
                {"symbol": "SOL/USDC", "type": "limit", "side": "buy", "amount": 1, "price": 170},
                {
                    "symbol": "SOL/USDC",
                    "type": "limit",
                    "side": "sell",
                    "amount": 2,
                    "price": 199.5,
                },
            ]
        )
        assert [(o["side"], o["status"]) for o in placed] == [("buy", "open"), ("sell", "open")]
        assert len(exchange.fetch_open_orders("SOL/USDC")) == 2

    def test_sign_mode_needs_no_secret(self, desk: Desk) -> None:
        """check_required_credentials asks only for the public API key, from broker.info."""
        exchange = desk.exchange("sign")
        assert (exchange.apiKey, exchange.secret) == (desk.pair.api_key, "")
        assert exchange.check_required_credentials() is True
        assert exchange.key_handle.mode == "sign"

    def test_a_secret_in_the_config_is_refused(self, desk: Desk) -> None:
        with pytest.raises(ConfigError, match="pass no secret"):
            backpack({"secret": "x"}, broker=desk.broker(), key=REF)


# -- exactly the request ccxt sends ---------------------------------------------------------


def sent(exchange: Any) -> list[dict[str, Any]]:
    """Record every request the exchange sends (an instance attribute shadows ccxt's fetch)."""
    requests: list[dict[str, Any]] = []
    original = exchange.fetch

    def fetch(url: str, method: str = "GET", headers: Any = None, body: Any = None) -> Any:
        answer = original(url, method, headers, body)
        requests.append({"url": url, "method": method, "headers": dict(headers), "body": body})
        return answer

    exchange.fetch = fetch
    return requests


def verifies(request: dict[str, Any]) -> bool:
    """Whether the signature of one request as sent verifies, by docs/backpack-api.md's rules."""
    headers, parts = request["headers"], urlsplit(request["url"])
    params: Any = json.loads(request["body"]) if request["body"] else dict(parse_qsl(parts.query))
    message = signing_string(
        lookup(request["method"], parts.path).instruction,
        params or None,
        int(headers["X-Timestamp"]),
        int(headers["X-Window"]),
    )
    return verify(headers["X-API-Key"], message, headers["X-Signature"])


class TestSignatures:
    def test_every_request_ccxt_sends_carries_a_signature_that_verifies(self, desk: Desk) -> None:
        """Implicit API calls with floats, booleans, integers, None and a batch: the daemon's
        signature verifies against the body or query as sent, and the sandbox accepts each."""
        exchange = desk.exchange("sign")
        requests = sent(exchange)
        order = {"symbol": "SOL_USDC", "side": "Bid", "orderType": "Limit", "quantity": 1.25}
        exchange.privatePostApiV1Order(order | {"price": 180.5, "postOnly": True, "clientId": 7})
        exchange.privatePostApiV1Order(order | {"price": 181.0, "timeInForce": None})
        exchange.privatePostApiV1Orders([order | {"price": 170.25}, order | {"price": "170"}])
        exchange.privateGetApiV1Orders({"symbol": "SOL_USDC"})
        exchange.privateGetWapiV1HistoryOrders({"limit": 5, "offset": 0})
        exchange.privateGetApiV1Capital()
        exchange.privateDeleteApiV1Orders({"symbol": "SOL_USDC"})
        signed = [r for r in requests if "X-Signature" in r["headers"]]
        assert len(signed) == 7
        assert all(verifies(r) for r in signed)
        assert all(r["headers"]["X-Broker-Id"] == "1400" for r in signed)  # ccxt's own, kept
        bodies = [json.loads(r["body"]) for r in signed[:2]]
        assert (bodies[0]["price"], bodies[0]["quantity"], bodies[0]["postOnly"]) == (
            "180.5",
            "1.25",
            True,
        )
        assert bodies[1]["price"] == "181"
        assert "timeInForce" not in bodies[1]
        assert [o["price"] for o in json.loads(signed[2]["body"])] == ["170.25", "170"]

    def test_the_instruction_is_ccxts_and_the_daemon_knows_it(self) -> None:
        """Every route ccxt signs maps to the same instruction in the package's table (so a
        policy written for the daemon's grants covers what ccxt sends), but one: ccxt lists
        pnlHistoryQueryAll, which Backpack's OpenAPI spec does not."""
        unknown = []
        for path, methods in ccxt.backpack().options["instructions"].items():
            for method, instruction in methods.items():
                try:
                    assert lookup(method, f"/{path}").instruction == instruction, (method, path)
                except InvalidInput:
                    unknown.append(instruction)
        assert unknown == ["pnlHistoryQueryAll"]

    @pytest.mark.parametrize(
        ("given", "expected"),
        [
            ({"price": 180.5}, {"price": "180.5"}),
            ({"price": 1e-05}, {"price": "0.00001"}),
            ({"price": 100.0}, {"price": "100"}),
            ({"quantity": 0.1 + 0.2}, {"quantity": "0.30000000000000004"}),
            ({"postOnly": True, "clientId": 7, "x": None}, {"postOnly": True, "clientId": 7}),
            ({"symbol": "SOL_USDC"}, {"symbol": "SOL_USDC"}),
        ],
        ids=["float", "tiny", "whole", "binary", "bool-int-none", "string"],
    )
    def test_params_are_sent_as_they_are_signed(
        self, given: dict[str, Any], expected: dict[str, Any]
    ) -> None:
        """A float is its shortest decimal string, on the wire and in the signature."""
        assert signable(given) == expected
        assert signable_batch([given]) == [expected]

    @pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
    def test_a_number_backpack_cannot_take_is_refused(self, value: float) -> None:
        with pytest.raises(InvalidInput, match="not a number"):
            signable({"price": value})


# -- errors ---------------------------------------------------------------------------------


class TestErrors:
    @pytest.mark.parametrize(
        ("ours", "theirs"),
        [
            (KeyRevoked("k", "revoked"), ccxt.AuthenticationError),
            (KeyRetired("k", "retired"), ccxt.AuthenticationError),
            (KeyPending("k", "pending"), ccxt.AuthenticationError),
            (UnknownKey("k"), ccxt.AuthenticationError),
            (NotAuthenticated("no token"), ccxt.AuthenticationError),
            (AccessDenied("k", "no grant"), ccxt.PermissionDenied),
            (ReadOnlyKey("k", "orderExecute"), ccxt.PermissionDenied),
            (RateLimited("slow down"), ccxt.RateLimitExceeded),
            (InvalidInput("bad"), ccxt.BadRequest),
            (BrokerUnavailable("down"), ccxt.ExchangeNotAvailable),
            (ServiceError("odd"), ccxt.ExchangeError),
        ],
        ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v.__name__,
    )
    def test_our_errors_become_ccxts_with_ours_as_cause(
        self, ours: ServiceError, theirs: type[Exception]
    ) -> None:
        error = ccxt_error(ours)
        assert type(error) is theirs
        assert error.__cause__ is ours

    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_a_policy_denial_is_permission_denied(self, desk: Desk, mode: str) -> None:
        """A worker granted only read-only signatures (and no copy) may read, not trade."""
        reader = desk.worker(copy=False)
        exchange = desk.exchange(mode, reader)
        exchange.load_markets()
        if mode == "sign":
            assert exchange.fetch_balance()["USDC"]["free"] == 100000.0
        with pytest.raises(ccxt.PermissionDenied) as caught:
            exchange.create_order("SOL/USDC", "limit", "buy", 1, 180)
        assert isinstance(cause(caught.value), AccessDenied)
        assert desk.sandbox.count("POST /api/v1/order") == 0

    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_a_read_only_key_never_trades(self, desk: Desk, mode: str) -> None:
        """Whatever the policy grants, a read-only key is not signed for orderExecute."""
        viewer = KeyRef("main", "viewer")
        pair = store_key(desk.vault, viewer, read_only=True, exchange=desk.sandbox.url)
        desk.sandbox.register(pair.api_key, read_only=True)
        exchange = backpack(desk.config(), broker=desk.broker(desk.root), key=viewer, mode=mode)  # type: ignore[arg-type]
        exchange.load_markets()
        assert exchange.fetch_balance()["USDC"]["free"] == 100000.0
        with pytest.raises(ccxt.PermissionDenied, match="read-only") as caught:
            exchange.create_order("SOL/USDC", "limit", "buy", 1, 180)
        assert isinstance(cause(caught.value), AccessDenied | ReadOnlyKey)

    def test_an_unreachable_daemon_is_exchange_not_available(self, desk: Desk) -> None:
        exchange = desk.exchange("sign")
        exchange.load_markets()
        exchange.key_handle.broker.url = "http://127.0.0.1:9"
        with pytest.raises(ccxt.ExchangeNotAvailable) as caught:
            exchange.fetch_balance()
        assert isinstance(cause(caught.value), BrokerUnavailable)


# -- copy mode ------------------------------------------------------------------------------


class TestCopyMode:
    def test_a_copy_is_refreshed_at_two_thirds_of_its_life(self, desk: Desk) -> None:
        """One copy serves many requests; at about 2/3 of copy_ttl a fresh one is fetched."""
        clock = FakeClock()
        broker = desk.broker(clock=clock)
        handle = KeyHandle(broker, REF, "copy", clock=clock)
        exchange = Backpack(desk.config() | {"apiKey": handle.api_key()}, key_handle=handle)
        for _ in range(3):
            exchange.fetch_balance()
        clock.advance(900 * 0.6)
        exchange.fetch_balance()
        before_refresh = desk.calls_to("/copy")
        clock.advance(900 * 0.1)
        exchange.fetch_balance()
        assert (before_refresh, desk.calls_to("/copy")) == (1, 2)

    def test_close_stops_watching_and_forgets_the_copy(self, desk: Desk) -> None:
        exchange = desk.exchange("copy")
        exchange.fetch_balance()
        wait_until(lambda: exchange.key_handle.copies.watching, 10, "the watch connects")
        exchange.close()
        assert exchange.secret == ""
        assert not exchange.key_handle.copies.watching


# -- cut off mid-run ------------------------------------------------------------------------


class Bot:
    """Runs ``step`` every 10 ms in a thread until it raises; records when, and what."""

    def __init__(self, step: Callable[[], object]) -> None:
        self.step = step
        self.steps = 0
        self.failed: tuple[float, BaseException] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:
                self.failed = (time.monotonic(), exc)
                return
            self.steps += 1
            self._stop.wait(0.01)

    def __enter__(self) -> Self:
        self._thread.start()
        wait_until(lambda: self.steps >= 3, 10, "the bot trades")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def failure(self, timeout: float = 10) -> tuple[float, BaseException]:
        wait_until(lambda: self.failed is not None, timeout, "the bot fails")
        assert self.failed is not None
        return self.failed


def cut_off_in(exchange: Any, mode: str) -> None:
    """Copy mode learns by its watch: it must be connected before the cut-off."""
    if mode == "copy":
        wait_until(lambda: exchange.key_handle.copies.watching, 10, "the watch connects")


CUTS = [(Status.REVOKED, KeyRevoked), (Status.RETIRED, KeyRetired)]


class TestCutOff:
    @pytest.mark.parametrize(("status", "error"), CUTS, ids=["revoked", "retired"])
    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_an_operators_cut_off_reaches_the_bot_within_a_second(
        self, desk: Desk, mode: str, status: Status, error: type[KeyNotUsable]
    ) -> None:
        """`keys revoke` / `keys retire` mid-run: the bot's next call raises
        AuthenticationError from KeyRevoked / KeyRetired, within 1 s of the Vault write."""
        exchange = desk.exchange(mode)
        exchange.load_markets()
        exchange.fetch_balance()
        cut_off_in(exchange, mode)
        with Bot(lambda: exchange.create_order("SOL/USDC", "limit", "buy", 0.01, 150)) as bot:
            desk.vault.set_status(REF, status, now=NOW)
            written = time.monotonic()
            failed_at, failure = bot.failure()
        assert isinstance(failure, ccxt.AuthenticationError)
        assert isinstance(cause(failure), error)
        assert failed_at - written < CUTOFF_S
        with pytest.raises(ccxt.AuthenticationError) as again:
            exchange.fetch_balance()
        assert isinstance(cause(again.value), error)
        assert exchange.secret == ""
        if mode == "copy":
            assert desk.calls_to("/copy") == 1  # the watch told it: never a fresh copy

    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_a_key_revoked_at_the_exchange_is_reported_once_then_refused(
        self, desk: Desk, mode: str
    ) -> None:
        """Backpack's 401 raises ccxt's own error and is reported; once the daemon has
        confirmed, the bot gets AuthenticationError from KeyRevoked within 1 s."""
        exchange = desk.exchange(mode)
        exchange.fetch_balance()
        cut_off_in(exchange, mode)
        desk.sandbox.revoke(desk.pair.api_key)
        with pytest.raises(ccxt.AuthenticationError, match="UNAUTHORIZED") as first:
            exchange.fetch_balance()
        assert cause(first.value) is None  # Backpack's answer, as ccxt raises it
        wait_until(lambda: desk.vault.read_record(REF).status is Status.REVOKED, 10, "revoked")
        learned = time.monotonic()
        while True:
            with pytest.raises(ccxt.AuthenticationError) as later:
                exchange.fetch_balance()
            if isinstance(cause(later.value), KeyRevoked):
                break
            assert time.monotonic() - learned < CUTOFF_S
            time.sleep(0.01)
        assert time.monotonic() - learned < CUTOFF_S
        assert desk.calls_to("/report") == 1


# -- ccxt.async_support ---------------------------------------------------------------------


class Recording(BrokerClient):
    """A BrokerClient that notes the thread of every call to the daemon."""

    threads: list[tuple[str, int]]

    def sign(self, *args: Any, **kwargs: Any) -> dict[str, str]:
        self.threads.append(("sign", threading.get_ident()))
        return super().sign(*args, **kwargs)

    def copy(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(("copy", threading.get_ident()))
        return super().copy(*args, **kwargs)

    def report(self, *args: Any, **kwargs: Any) -> None:
        self.threads.append(("report", threading.get_ident()))
        super().report(*args, **kwargs)


class TestAsync:
    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_the_unified_calls_work_async(self, desk: Desk, mode: str) -> None:
        async def session() -> dict[str, Any]:
            exchange = async_backpack(desk.config(), broker=desk.broker(), key=REF, mode=mode)  # type: ignore[arg-type]
            try:
                seen: dict[str, Any] = {"markets": await exchange.load_markets()}
                seen["ticker"] = await exchange.fetch_ticker("BTC/USDC")
                seen["book"] = await exchange.fetch_order_book("BTC/USDC")
                seen["balance"] = await exchange.fetch_balance()
                resting = await exchange.create_order("BTC/USDC", "limit", "buy", 0.01, 90000.5)
                seen["open"] = await exchange.fetch_open_orders("BTC/USDC")
                seen["cancelled"] = await exchange.cancel_order(resting["id"], "BTC/USDC")
                seen["market"] = await exchange.create_order("BTC/USDC", "market", "sell", 0.1)
                seen["ioc"] = await exchange.create_order(
                    "BTC/USDC", "limit", "sell", 0.1, 99000, {"timeInForce": "IOC"}
                )
                await exchange.create_order("BTC/USDC", "limit", "sell", 0.01, 99000)
                seen["all"] = await exchange.cancel_all_orders("BTC/USDC")
                seen["trades"] = await exchange.fetch_my_trades("BTC/USDC")
                seen["resting"], seen["secret"] = resting, exchange.secret
            finally:
                await exchange.close()
            return seen

        seen = asyncio.run(session())
        assert "BTC/USDC:USDC" in seen["markets"]
        assert (seen["ticker"]["last"], seen["book"]["asks"][0]) == (97015.0, [97018.6, 0.2])
        assert seen["balance"]["BTC"]["free"] == 1.0
        assert [o["id"] for o in seen["open"]] == [seen["resting"]["id"]]
        assert seen["resting"]["price"] == 90000.5
        assert seen["cancelled"]["status"] == "canceled"
        assert (seen["market"]["status"], seen["market"]["filled"]) == ("closed", 0.1)
        assert seen["ioc"]["status"] == "canceled"
        assert [o["status"] for o in seen["all"]] == ["canceled"]
        assert [(t["side"], t["price"]) for t in seen["trades"]] == [("sell", 97012.4)]
        assert seen["secret"] == ("" if mode == "sign" else desk.pair.secret.reveal())

    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_the_daemon_is_never_asked_on_the_event_loop(self, desk: Desk, mode: str) -> None:
        """Signatures, copies and reports run in worker threads; concurrent requests of one
        exchange are each signed for exactly what they send."""
        broker = Recording(desk.url, vault_addr=desk.vault_addr, token=desk.token, http=desk.http)
        broker.threads = []
        desk.clients.append(broker)

        async def session() -> tuple[int, list[Any]]:
            exchange = async_backpack(desk.config(), broker=broker, key=REF, mode=mode)  # type: ignore[arg-type]
            try:
                await exchange.load_markets()
                orders = [
                    exchange.create_order("SOL/USDC", "limit", "buy", 0.01 * (i + 1), 150 + i)
                    for i in range(8)
                ]
                answers = await asyncio.gather(*orders, exchange.fetch_balance())
                desk.sandbox.revoke(desk.pair.api_key)
                with pytest.raises(ccxt.AuthenticationError):
                    await exchange.fetch_balance()
            finally:
                await exchange.close()
            return threading.get_ident(), answers

        loop_thread, answers = asyncio.run(session())
        assert [o["status"] for o in answers[:8]] == ["open"] * 8
        assert sorted(o["amount"] for o in answers[:8]) == [0.01 * (i + 1) for i in range(8)]
        calls = {name for name, _ in broker.threads}
        assert calls == ({"sign", "report"} if mode == "sign" else {"copy", "report"})
        assert all(thread != loop_thread for _, thread in broker.threads)
        # The report made the daemon check the key: it is revoked (and the check is over).
        wait_until(lambda: desk.vault.read_record(REF).status is Status.REVOKED, 10, "revoked")

    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_an_operators_revoke_reaches_an_async_bot_within_a_second(
        self, desk: Desk, mode: str
    ) -> None:
        exchange = async_backpack(desk.config(), broker=desk.broker(), key=REF, mode=mode)  # type: ignore[arg-type]

        async def session() -> tuple[float, BaseException]:
            try:
                await exchange.fetch_balance()
                await asyncio.to_thread(cut_off_in, exchange, mode)
                revoke = asyncio.create_task(
                    asyncio.to_thread(desk.vault.set_status, REF, Status.REVOKED, now=NOW)
                )
                while True:
                    try:
                        await exchange.fetch_balance()
                    except ccxt.BaseError as exc:
                        await revoke
                        return time.monotonic(), exc
                    await asyncio.sleep(0.01)
            finally:
                await exchange.close()

        written: list[float] = []
        original = desk.vault.set_status

        def set_status(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            written.append(time.monotonic())
            return result

        desk.vault.set_status = set_status  # type: ignore[method-assign]
        failed_at, failure = asyncio.run(session())
        assert isinstance(failure, ccxt.AuthenticationError)
        assert isinstance(cause(failure), KeyRevoked)
        assert failed_at - written[0] < CUTOFF_S


# -- sign mode never holds the secret -------------------------------------------------------


def canaries(pair: KeyPair) -> list[bytes]:
    """The secret as text (base64) and as the raw 32-byte seed."""
    return [pair.secret.reveal().encode(), pair.seed]


_OPAQUE = (type, types.ModuleType, types.FunctionType, types.CodeType, types.FrameType)


def reachable(root: object) -> Iterator[str | bytes | bytearray]:
    """Every str and bytes reachable from ``root`` through its objects' references, short of
    modules, classes and functions (whose globals would reach the whole process)."""
    module_dicts = {id(vars(m)) for m in list(sys.modules.values()) if m is not None}
    seen, todo = {id(root)}, [root]
    while todo:
        obj = todo.pop()
        if isinstance(obj, str | bytes | bytearray):
            yield obj
            continue
        for ref in gc.get_referents(obj):
            if id(ref) in seen or id(ref) in module_dicts or isinstance(ref, _OPAQUE):
                continue
            seen.add(id(ref))
            todo.append(ref)


def holds(root: object, pair: KeyPair) -> bool:
    needles = canaries(pair)
    for text in reachable(root):
        data = text.encode("latin-1", "replace") if isinstance(text, str) else bytes(text)
        if any(needle in data for needle in needles):
            return True
    return False


def memory_holds(pid: int, needles: list[bytes]) -> bool:
    """Whether any readable mapping of process ``pid`` contains one of ``needles``."""
    with Path(f"/proc/{pid}/maps").open() as maps, Path(f"/proc/{pid}/mem").open("rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue  # [vvar] and friends
            if any(needle in chunk for needle in needles):
                return True
    return False


BOT = """
import os, sys
from backpack_vault.ccxt import backpack
from backpack_vault.worker import BrokerClient

url = os.environ["SANDBOX_URL"]
broker = BrokerClient(
    os.environ["BACKPACK_VAULT_DAEMON_URL"],
    vault_addr=os.environ["VAULT_ADDR"],
    token=os.environ["VAULT_TOKEN"],
)
config = {"verbose": True, "urls": {"api": {"public": url, "private": url}}}
exchange = backpack(config, broker=broker, key="main/bot-a", mode=os.environ["BOT_MODE"])
exchange.load_markets()
exchange.fetch_balance()
order = exchange.create_order("SOL/USDC", "limit", "buy", 1, 180.5)
exchange.fetch_open_orders("SOL/USDC")
exchange.cancel_order(order["id"], "SOL/USDC")
print("traded", flush=True)
sys.stdin.read()  # the test reads this process's memory meanwhile
"""


class TestNoSecretInSignMode:
    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_nothing_reachable_from_the_exchange_holds_the_secret(
        self, desk: Desk, mode: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """After trading, no string or bytes reachable from the exchange (its ``vars``, the
        handle, the broker client, ccxt's caches), nothing logged and nothing in the
        environment holds the secret; copy mode, which does hold it, proves the search."""
        with capture_logs() as logs:
            exchange = desk.exchange(mode)
            exchange.verbose = True  # ccxt prints every request and answer
            exchange.load_markets()
            exchange.fetch_balance()
            order = exchange.create_order("SOL/USDC", "limit", "buy", 1, 180.5)
            exchange.cancel_order(order["id"], "SOL/USDC")
        printed = capsys.readouterr()
        secret = desk.pair.secret.reveal()
        assert secret not in printed.out + printed.err + repr(logs)
        assert all(secret not in value for value in os.environ.values())
        assert holds(exchange, desk.pair) is (mode == "copy")
        assert (secret in repr(vars(exchange))) is (mode == "copy")

    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_a_bot_process_never_has_the_secret_in_its_memory(self, desk: Desk, mode: str) -> None:
        """A bot in its own process trades in sign mode: no readable page of its memory, its
        output or its environment ever held the secret, as text or as the seed. The same
        bot in copy mode holds it, which proves the search."""
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ["HOME"],
            "BACKPACK_VAULT_DAEMON_URL": desk.url,
            "VAULT_ADDR": desk.vault_addr,
            "VAULT_TOKEN": desk.token.reveal(),
            "SANDBOX_URL": desk.sandbox.url,
            "BOT_MODE": mode,
        }
        bot = subprocess.Popen(
            [sys.executable, "-c", BOT],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert bot.stdout is not None
            output = [bot.stdout.readline()]
            assert output[0].strip() == "traded" or not bot.poll(), output
            try:
                found = memory_holds(bot.pid, canaries(desk.pair))
            except PermissionError:
                pytest.skip("this host does not let a process read its child's memory")
        finally:
            out, _ = bot.communicate("", timeout=30)
        assert bot.returncode == 0, out
        assert found is (mode == "copy")
        assert desk.pair.secret.reveal() not in "".join(output) + out


# -- the example ----------------------------------------------------------------------------


class TestExample:
    def test_the_sign_mode_example_trades_on_the_sandbox(self, desk: Desk) -> None:
        """examples/ccxt_sign_mode.py, run as its README says, against a daemon and the sandbox."""
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ["HOME"],
            "BACKPACK_VAULT_DAEMON_URL": desk.url,
            "VAULT_ADDR": desk.vault_addr,
            "VAULT_TOKEN": desk.token.reveal(),
            "BACKPACK_URL": desk.sandbox.url,
        }
        done = subprocess.run(
            [sys.executable, str(EXAMPLE), str(REF)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "free USDC: 100000.0"
        assert lines[1].startswith("placed ")
        assert lines[1].endswith("at 149.1 (open)")
        assert lines[-1] == "secret held by this bot: ''"
        assert desk.calls_to("/copy") == 0
        assert desk.sandbox.count("DELETE /api/v1/order", desk.pair.api_key) == 1

    def test_a_revoked_key_ends_the_example_with_a_message(self, desk: Desk) -> None:
        desk.vault.set_status(REF, Status.REVOKED, now=NOW)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ["HOME"],
            "BACKPACK_VAULT_DAEMON_URL": desk.url,
            "VAULT_ADDR": desk.vault_addr,
            "VAULT_TOKEN": desk.token.reveal(),
            "BACKPACK_URL": desk.sandbox.url,
        }
        done = subprocess.run(
            [sys.executable, str(EXAMPLE), str(REF)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1
        assert "cannot be used: key main/bot-a cannot be used: it was revoked" in done.stderr


class TestOptional:
    def test_importing_the_package_imports_neither_client(self) -> None:
        """ccxt and bpx-py are extras: only backpack_vault.ccxt / .bpx import them."""
        code = (
            "import sys, backpack_vault, backpack_vault.worker, backpack_vault.client.broker\n"
            "import backpack_vault.integrations.handle\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ccxt', 'bpx')))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == "[]"
