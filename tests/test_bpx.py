"""backpack_vault.bpx: real bpx-py trading on the sandbox through a daemon, in both modes.

The daemon runs in-thread against the session's OpenBao dev server and checks
keys against the session's sandbox exchange, which verifies every signature
exactly (a wrong one is 400 "Invalid signature"). The bot holds a worker token
with a real policy, rendered as ``backpack-vault policy worker`` prints it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest

from backpack_vault.bpx import Account
from backpack_vault.client.broker import BrokerClient
from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyPair, KeyRef, Status
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import (
    AccessDenied,
    ExchangeUnavailable,
    KeyNotUsable,
    KeyRejected,
    KeyRetired,
    KeyRevoked,
)
from backpack_vault.testing import NOW, store_key, wait_until
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.setup import READ_ONLY_INSTRUCTIONS, render_worker_policy

REF = KeyRef("main", "bot-a")
TRADING = ("orderExecute", "orderCancel", "orderCancelAll")
MODES = ["sign", "copy"]
CUTOFF_S = 1.0  # the bot raises within this long of the daemon learning of a cut-off
BEST_BID = "186.38"


@dataclass
class Desk:
    """A daemon that checks keys against the sandbox, one stored key, and a worker's token."""

    url: str
    vault_addr: str
    vault: Vault
    settings: VaultSettings
    sandbox: SandboxAdmin
    pair: KeyPair
    http: httpx.Client
    calls: list[str]
    token: Secret | None = None
    accounts: list[Account] = field(default_factory=list)

    def worker(self, *instructions: str, copy: bool = True) -> Secret:
        """A token whose policy grants copies (``copy``) and these signatures of REF."""
        hcl = render_worker_policy(
            self.settings.grant_prefix, REF.subaccount, REF.name, instructions, copy=copy
        )
        name = f"{self.settings.kv_prefix}-worker-{int(copy)}-{len(instructions)}"
        provisioner = Provisioner(self.vault)
        provisioner.ensure_policy(name, hcl)
        return provisioner.create_token([name])

    def account(self, mode: str, token: Secret | None = None, **kwargs: Any) -> Account:
        broker = BrokerClient(
            self.url, vault_addr=self.vault_addr, token=token or self.token, http=self.http
        )
        account = Account(
            broker=broker,
            key=kwargs.pop("key", REF),
            mode=mode,  # type: ignore[arg-type]
            base_url=self.sandbox.url,
            **kwargs,
        )
        self.accounts.append(account)
        return account

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
        desk = Desk(server.url, dev_vault.addr, vault, vault_settings, sandbox, pair, http, calls)
        desk.token = desk.worker(*READ_ONLY_INSTRUCTIONS, *TRADING)
        yield desk
        for account in desk.accounts:
            account.close()


class TestAccount:
    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_an_account_trades_through_the_daemon(self, desk: Desk, mode: str) -> None:
        """Balances, limit (a float price), market and IOC orders, open orders, cancels, fills."""
        account = desk.account(mode)
        assert account.get_balances()["USDC"]["available"] == "100000"
        resting = account.execute_order(
            "SOL_USDC", "Bid", "Limit", time_in_force="GTC", quantity="1", price=180.5, client_id=9
        )
        assert (resting["status"], resting["price"]) == ("New", "180.5")
        assert account.get_open_order("SOL_USDC", client_id=9)["id"] == resting["id"]
        assert [o["id"] for o in account.get_open_orders(symbol="SOL_USDC")] == [resting["id"]]
        sold = account.execute_order("SOL_USDC", "Ask", "Market", quantity="1.5")
        assert (sold["status"], sold["executedQuoteQuantity"]) == ("Filled", "279.57")
        ioc = account.execute_order(
            "SOL_USDC", "Bid", "Limit", time_in_force="IOC", quantity="1", price="150"
        )
        assert (ioc["status"], ioc["expiryReason"]) == ("Expired", "ImmediateOrCancel")
        assert account.cancel_order("SOL_USDC", order_id=resting["id"])["status"] == "Cancelled"
        account.execute_order("SOL_USDC", "Ask", "Limit", quantity="1", price="200", post_only=True)
        assert [o["status"] for o in account.cancel_all_orders("SOL_USDC")] == ["Cancelled"]
        [fill] = account.get_fill_history(symbol="SOL_USDC", limit=10, offset=0)
        assert (fill["side"], fill["price"], fill["fee"]) == ("Ask", BEST_BID, "0.27957")
        statuses = [o["status"] for o in account.get_order_history(limit=10, offset=0)]
        assert statuses == ["Cancelled", "Expired", "Filled", "Cancelled"]
        balances = account.get_balances()
        assert balances["USDC"]["available"] == str(
            Decimal(100000) + Decimal("279.57") * 999 / 1000
        )
        assert account.public_key == desk.pair.api_key
        assert not hasattr(account, "private_key")
        assert desk.calls_to("/copy") == (1 if mode == "copy" else 0)
        signed = sum(desk.sandbox.stats()["keys"][desk.pair.api_key].values())
        assert desk.calls_to("/sign") == (signed if mode == "sign" else 0)

    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_an_error_answer_comes_back_as_bpx_returns_it(self, desk: Desk, mode: str) -> None:
        """Order refusals are not key refusals: the JSON error is returned, nothing reported."""
        answer = desk.account(mode).execute_order(
            "SOL_USDC", "Bid", "Limit", quantity="1000", price="180"
        )
        assert answer["code"] == "INSUFFICIENT_FUNDS"
        assert desk.calls_to("/report") == 0

    def test_the_account_holds_no_secret_in_sign_mode(self, desk: Desk) -> None:
        """No attribute of the account, nor anything it refers to, holds the secret."""
        account = desk.account("sign")
        account.get_balances()
        secret = desk.pair.secret.reveal()
        assert secret not in repr(vars(account))
        assert secret not in repr(vars(account.key_handle)) + repr(vars(account.http_client))

    def test_an_unreachable_exchange_is_exchange_unavailable(self, desk: Desk) -> None:
        account = desk.account("sign")
        account.BPX_API_URL = "http://127.0.0.1:9/"
        with pytest.raises(ExchangeUnavailable, match="unreachable"):
            account.get_balances()


class TestErrors:
    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_a_policy_denial_is_access_denied(self, desk: Desk, mode: str) -> None:
        """A worker granted only read-only signatures (and no copy) may read, not trade."""
        account = desk.account(mode, desk.worker(copy=False))
        if mode == "sign":
            assert account.get_balances()["USDC"]["available"] == "100000"
        with pytest.raises(AccessDenied):
            account.execute_order("SOL_USDC", "Bid", "Limit", quantity="1", price="180")
        assert desk.sandbox.count("POST /api/v1/order") == 0

    @pytest.mark.parametrize(
        ("status", "error"),
        [(Status.REVOKED, KeyRevoked), (Status.RETIRED, KeyRetired)],
        ids=["revoked", "retired"],
    )
    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_an_operators_cut_off_reaches_the_bot_within_a_second(
        self, desk: Desk, mode: str, status: Status, error: type[KeyNotUsable]
    ) -> None:
        """Mid-run, the bot's next call raises KeyRevoked / KeyRetired within 1 s of the
        Vault write; copy mode learns by its watch, without a round trip."""
        account = desk.account(mode)
        account.get_balances()
        if mode == "copy":
            copies = account.key_handle.copies
            assert copies is not None
            wait_until(lambda: copies.watching, 10, "the watch connects")
        failed: list[tuple[float, BaseException]] = []

        def bot() -> None:
            while True:
                try:
                    account.execute_order("SOL_USDC", "Bid", "Limit", quantity="0.01", price="150")
                except Exception as exc:
                    failed.append((time.monotonic(), exc))
                    return
                time.sleep(0.01)

        thread = threading.Thread(target=bot, daemon=True)
        thread.start()
        time.sleep(0.1)
        desk.vault.set_status(REF, status, now=NOW)
        written = time.monotonic()
        thread.join(10)
        [(failed_at, failure)] = failed
        assert isinstance(failure, error)
        assert failed_at - written < CUTOFF_S
        if mode == "copy":
            assert desk.calls_to("/copy") == 1

    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_a_key_revoked_at_the_exchange_raises_key_rejected_then_key_revoked(
        self, desk: Desk, mode: str
    ) -> None:
        """Backpack's 401 raises KeyRejected and is reported once; once the daemon has
        confirmed, KeyRevoked within 1 s."""
        account = desk.account(mode)
        account.get_balances()
        desk.sandbox.revoke(desk.pair.api_key)
        with pytest.raises(KeyRejected, match="401 UNAUTHORIZED"):
            account.get_balances()
        wait_until(lambda: desk.vault.read_record(REF).status is Status.REVOKED, 10, "revoked")
        learned = time.monotonic()
        while True:
            try:
                account.get_balances()
            except KeyRevoked:
                break
            except KeyRejected:
                pass
            assert time.monotonic() - learned < CUTOFF_S
            time.sleep(0.01)
        assert time.monotonic() - learned < CUTOFF_S
        assert desk.calls_to("/report") == 1

    @pytest.mark.parametrize("mode", MODES, ids=str)
    def test_a_read_only_key_never_trades(self, desk: Desk, mode: str, root_token: Secret) -> None:
        viewer = KeyRef("main", "viewer")
        pair = store_key(desk.vault, viewer, read_only=True, exchange=desk.sandbox.url)
        desk.sandbox.register(pair.api_key, read_only=True)
        account = desk.account(mode, root_token, key=viewer)
        assert account.get_balances()["USDC"]["available"] == "100000"
        with pytest.raises(AccessDenied, match="read-only"):
            account.execute_order("SOL_USDC", "Bid", "Limit", quantity="1", price="180")
