"""The sandbox as a venue: market data, the matching engine, balances, history, and real clients.

Engine rules are specified against :class:`SandboxState` directly, at a fixed
time; shapes are checked over real HTTP on loopback, and ccxt (sync and async)
and bpx-py trade on the session sandbox with their own signing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator, Mapping
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import ccxt
import ccxt.async_support
import httpx
import pytest
from bpx.account import Account
from bpx.async_.account import Account as AsyncAccount
from bpx.async_.public import Public as AsyncPublic
from bpx.public import Public

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import sign_request
from backpack_vault.core.keys import KeyPair, generate_pair
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.testing import candles, reports
from backpack_vault.testing.answers import Answer, Refused
from backpack_vault.testing.sandbox import (
    SANDBOX_HEADER,
    SandboxAdmin,
    SandboxState,
    create_app,
    load_fixture,
)

NOW_MS = 1_750_000_000_000  # a fixed time for the engine's own tests
FROZEN_S = 1_750_000_123.456  # the frozen HTTP sandbox's clock
D = Decimal
DEMO = {"USDC": D("100000"), "SOL": D("100"), "BTC": D("1"), "ETH": D("10")}
# The house book of SOL_USDC: asks 186.42 x 25, 186.46 x 50, ...; bids 186.38 x 25, 186.34 x 50, ...
BEST_ASK, BEST_BID = "186.42", "186.38"


# -- helpers --------------------------------------------------------------------------------


class Desk:
    """One registered key trading at a SandboxState directly, at ``now_ms``."""

    def __init__(self, state: SandboxState, now_ms: int = NOW_MS) -> None:
        self.state = state
        self.now_ms = now_ms
        self.key = generate_pair().api_key
        state.register(self.key)

    def order(self, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.state.trading(
            lambda v: v.place(self.key, params, self.now_ms)
        )
        return result

    def refused(self, **params: Any) -> Answer:
        with pytest.raises(Refused) as caught:
            self.order(**params)
        return caught.value.answer

    def cancel(self, symbol: str, order_id: str) -> dict[str, Any]:
        def act(venue: Any) -> dict[str, Any]:
            found = venue.find(self.key, symbol, order_id, None)
            assert found is not None
            result: dict[str, Any] = venue.cancel(found)
            return result

        return self.state.trading(act)

    def open_orders(self, symbol: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.state.trading(
            lambda v: reports.open_orders(v, self.key, symbol, None)
        )
        return result

    def fills(self, **query: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.state.trading(
            lambda v: reports.fill_history(v, self.key, query)
        )
        return result

    def history(self, **query: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.state.trading(
            lambda v: reports.order_history(v, self.key, query)
        )
        return result

    def balance(self, asset: str) -> tuple[Decimal, Decimal]:
        """``(available, locked)``."""
        capital = self.state.balances(self.key)
        assert capital is not None
        entry = capital.get(asset, {"available": "0", "locked": "0"})
        return D(entry["available"]), D(entry["locked"])

    def positions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.state.trading(
            lambda v: v.account(self.key).open_positions(None)
        )
        return result


def limit(side: str, price: str, quantity: str, symbol: str = "SOL_USDC", **extra: Any) -> Any:
    """A limit order's JSON body."""
    order = {"symbol": symbol, "side": side, "orderType": "Limit", "price": price}
    return order | {"quantity": quantity} | extra


def market(side: str, symbol: str = "SOL_USDC", **extra: Any) -> Any:
    """A market order's JSON body: pass quantity= or quoteQuantity=."""
    return {"symbol": symbol, "side": side, "orderType": "Market"} | extra


class Trader:
    """A registered key that signs its own HTTP requests, as a Backpack client does."""

    def __init__(self, admin: SandboxAdmin, clock: Any = time.time) -> None:
        self.pair: KeyPair = generate_pair()
        self.http = admin.http
        self.clock = clock
        admin.register(self.pair.api_key)

    def call(
        self, method: str, path: str, *, query: Mapping[str, str] | None = None, body: Any = None
    ) -> httpx.Response:
        instruction = lookup(method, path).instruction
        signed = body if body is not None else dict(query or {})
        stamp = int(self.clock() * 1000)
        headers = sign_request(self.pair.api_key, self.pair.secret, instruction, signed, stamp)
        content = None if body is None else json.dumps(body)
        if content is not None:
            headers["Content-Type"] = "application/json; charset=utf-8"
        return self.http.request(method, path, params=query, content=content, headers=headers)

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def state() -> SandboxState:
    return SandboxState(seed=11)


@pytest.fixture
def desk(state: SandboxState) -> Desk:
    return Desk(state)


@pytest.fixture(scope="module")
def frozen_server() -> Iterator[tuple[ServerThread, SandboxState]]:
    """A sandbox whose clock stands still at FROZEN_S."""
    frozen_state = SandboxState(seed=3)
    with ServerThread(create_app(frozen_state, clock=lambda: FROZEN_S)) as server:
        yield server, frozen_state


@pytest.fixture
def frozen(frozen_server: tuple[ServerThread, SandboxState]) -> Iterator[SandboxAdmin]:
    server, frozen_state = frozen_server
    frozen_state.reset()
    with httpx.Client(base_url=server.url, timeout=5.0) as http:
        yield SandboxAdmin(http)


# -- the fixture ----------------------------------------------------------------------------


class TestFixture:
    def test_the_package_ships_spot_and_perp_markets(self) -> None:
        """The default fixture has a handful of spot and perp markets over four assets."""
        fixture = load_fixture()
        types = {m.market_type for m in fixture.markets.values()}
        assert types == {"SPOT", "PERP"}
        assert {"SOL_USDC", "BTC_USDC", "SOL_USDC_PERP"} <= set(fixture.markets)
        assert {a["symbol"] for a in fixture.assets} == set(DEMO)
        assert dict(fixture.demo_balances) == DEMO

    def test_every_house_order_fits_its_market(self) -> None:
        """House prices sit on the tick grid, quantities on the step grid, and never cross."""
        for m in load_fixture().markets.values():
            bids, asks = m.book.side("Bid"), m.book.side("Ask")
            assert bids[0][0] < asks[0][0], m.symbol
            for price, quantity in bids + asks:
                assert price % m.tick == 0, m.symbol
                assert quantity % m.step == 0, m.symbol

    def test_a_fixture_file_of_the_same_shape_can_replace_it(self, tmp_path: Path) -> None:
        """``load_fixture(path)`` reads a user's own markets file."""
        shipped = resources.files("backpack_vault.testing").joinpath("markets.json")
        data = json.loads(shipped.read_text(encoding="utf-8"))
        data["demoBalances"] = {"USDC": "5"}
        path = tmp_path / "markets.json"
        path.write_text(json.dumps(data))
        custom = SandboxState(fixture=load_fixture(path))
        custom.register(generate_pair().api_key)
        assert custom.keys()[0]["api_key"]
        assert custom.fixture.demo_balances == {"USDC": D("5")}


# -- the matching engine --------------------------------------------------------------------


class TestLimitOrders:
    def test_a_bid_below_the_best_ask_rests_and_locks_quote(self, desk: Desk) -> None:
        """A resting bid is New, open, and locks price x quantity of the quote asset."""
        order = desk.order(**limit("Bid", "180.00", "2"))
        assert (order["status"], order["executedQuantity"], order["price"]) == (
            "New",
            "0",
            "180.00",
        )
        assert [o["id"] for o in desk.open_orders()] == [order["id"]]
        assert desk.balance("USDC") == (D("99640"), D("360"))

    def test_cancelling_gives_the_locked_funds_back(self, desk: Desk) -> None:
        """A cancelled order is Cancelled, gone from the open orders, and locks nothing."""
        order = desk.order(**limit("Ask", "190", "3"))
        assert desk.balance("SOL") == (D("97"), D("3"))
        assert desk.cancel("SOL_USDC", order["id"])["status"] == "Cancelled"
        assert desk.open_orders() == []
        assert desk.balance("SOL") == (D("100"), D("0"))

    def test_a_crossing_bid_fills_at_the_makers_prices_and_rests_the_rest(self, desk: Desk) -> None:
        """It takes 25 @ 186.42 and 50 @ 186.46, then rests 5 at its limit."""
        order = desk.order(**limit("Bid", "186.46", "80"))
        assert order["status"] == "PartiallyFilled"
        assert (order["executedQuantity"], order["executedQuoteQuantity"]) == ("75", "13983.5")
        # Locked: the resting 5 at 186.46; the fills' price improvement came back.
        assert desk.balance("USDC") == (D("100000") - D("13983.5") - D("932.3"), D("932.3"))
        assert desk.balance("SOL") == (D("100") + D("75") - D("0.075"), D("0"))  # taker 10 bps
        assert [
            (f["price"], f["quantity"], f["isMaker"]) for f in desk.fills(sortDirection="Asc")
        ] == [
            ("186.42", "25", False),
            ("186.46", "50", False),
        ]

    def test_a_resting_order_that_is_taken_becomes_filled(self, state: SandboxState) -> None:
        """Another account's market order fills a resting ask (maker fee) before the house's."""
        alice, bob = Desk(state), Desk(state)
        ask = alice.order(**limit("Ask", "186.40", "1"))
        taken = bob.order(**market("Bid", quantity="1"))
        assert (taken["status"], taken["executedQuoteQuantity"]) == ("Filled", "186.4")
        assert alice.open_orders() == []
        assert [(o["id"], o["status"]) for o in alice.history()] == [(ask["id"], "Filled")]
        assert alice.balance("USDC") == (D("100186.4") - D("0.14912"), D("0"))  # maker 8 bps
        assert bob.balance("SOL") == (D("100.999"), D("0"))
        assert (alice.fills()[0]["isMaker"], bob.fills()[0]["isMaker"]) == (True, False)

    @pytest.mark.parametrize(
        ("change", "code", "message"),
        [
            ({"price": "186.421"}, "INVALID_PRICE", "Price decimal too long"),
            ({"quantity": "0.001"}, "INVALID_QUANTITY", "Quantity decimal too long"),
            (
                {"symbol": "BTC_USDT"},
                "INVALID_SYMBOL",
                "Market BTC_USDT does not exist in the sandbox",
            ),
            ({"timeInForce": "GTD"}, "INVALID_ORDER", "timeInForce must be GTC, IOC or FOK"),
        ],
        ids=["tick", "step", "unknown-market", "time-in-force"],
    )
    def test_orders_off_the_markets_filters_are_refused(
        self, desk: Desk, change: dict[str, str], code: str, message: str
    ) -> None:
        """Tick size, step size and the market list are checked, with Backpack's codes."""
        assert desk.refused(**limit("Bid", "180", "1") | change) == Answer(400, code, message)

    def test_trigger_orders_are_not_implemented(self, desk: Desk) -> None:
        """An order with a trigger is verified, then refused with 501."""
        answer = desk.refused(**limit("Bid", "180", "1", triggerPrice="170"))
        assert (answer.status, answer.code) == (501, "NOT_IMPLEMENTED")


class TestMarketOrders:
    def test_a_market_order_by_quantity_walks_the_book(self, desk: Desk) -> None:
        """30 SOL take the 25 at the best ask and 5 at the next level."""
        order = desk.order(**market("Bid", quantity="30"))
        assert (order["status"], order["executedQuantity"]) == ("Filled", "30")
        assert D(order["executedQuoteQuantity"]) == D("25") * D("186.42") + D("5") * D("186.46")
        assert desk.balance("USDC") == (D("100000") - D("5592.8"), D("0"))

    def test_a_market_order_by_quote_quantity_spends_at_most_its_budget(self, desk: Desk) -> None:
        """1000 USDC buy as many whole steps as they can: 5.36 SOL at 186.42."""
        order = desk.order(**market("Bid", quoteQuantity="1000"))
        assert (order["status"], order["executedQuantity"]) == ("Filled", "5.36")
        assert D(order["executedQuoteQuantity"]) == D("5.36") * D(BEST_ASK) <= D(1000)

    def test_a_market_sell_by_quote_quantity(self, desk: Desk) -> None:
        """Selling for 500 USDC sells whole steps at the best bid."""
        order = desk.order(**market("Ask", quoteQuantity="500"))
        assert order["executedQuantity"] == "2.68"
        assert desk.balance("SOL") == (D("97.32"), D("0"))

    def test_a_market_order_larger_than_the_book_expires_with_what_it_got(
        self, desk: Desk, state: SandboxState
    ) -> None:
        """When the book runs out, the rest expires (InsufficientLiquidity)."""
        state.set_balances(desk.key, {"SOL": "100000"})
        order = desk.order(**market("Ask", quantity="5000"))
        assert (order["status"], order["expiryReason"]) == ("Expired", "InsufficientLiquidity")
        assert order["executedQuantity"] == "1375"  # 25 x (1 + 2 + ... + 10)
        assert desk.balance("SOL") == (D("100000") - D("1375"), D("0"))


class TestTimeInForce:
    def test_ioc_fills_what_it_can_and_expires_the_rest(self, desk: Desk) -> None:
        """IOC never rests: the unfilled rest expires and its lock comes back."""
        order = desk.order(**limit("Bid", BEST_ASK, "30", timeInForce="IOC"))
        assert (order["status"], order["expiryReason"]) == ("Expired", "ImmediateOrCancel")
        assert order["executedQuantity"] == "25"
        assert desk.open_orders() == []
        assert desk.balance("USDC")[1] == 0

    def test_ioc_that_cannot_fill_expires_untouched(self, desk: Desk) -> None:
        """An IOC priced away from the book fills nothing and never rests."""
        order = desk.order(**limit("Bid", "150", "1", timeInForce="IOC"))
        assert (order["status"], order["executedQuantity"]) == ("Expired", "0")
        assert desk.balance("USDC") == (D("100000"), D("0"))

    def test_fok_that_cannot_fill_in_full_changes_nothing(
        self, desk: Desk, state: SandboxState
    ) -> None:
        """FOK for more than the limit reaches expires with no fill and no book change."""
        before = state.trading(lambda v: v.books["SOL_USDC"].levels("Ask"))
        order = desk.order(**limit("Bid", BEST_ASK, "30", timeInForce="FOK"))
        assert (order["status"], order["expiryReason"]) == ("Expired", "FillOrKill")
        assert order["executedQuantity"] == "0"
        assert state.trading(lambda v: v.books["SOL_USDC"].levels("Ask")) == before
        assert desk.balance("USDC") == (D("100000"), D("0"))
        assert desk.fills() == []

    def test_fok_that_can_fill_fills(self, desk: Desk) -> None:
        order = desk.order(**limit("Bid", BEST_ASK, "25", timeInForce="FOK"))
        assert (order["status"], order["executedQuantity"]) == ("Filled", "25")

    def test_post_only_that_would_take_is_refused(self, desk: Desk) -> None:
        """postOnly is honoured: an order that would cross is refused, nothing is recorded."""
        answer = desk.refused(**limit("Bid", BEST_ASK, "1", postOnly=True))
        assert answer == Answer(400, "INVALID_ORDER", "Order would immediately match and take")
        assert desk.history() == []

    def test_post_only_that_rests_is_accepted(self, desk: Desk) -> None:
        order = desk.order(**limit("Bid", "186.39", "1", postOnly=True))
        assert (order["status"], order["postOnly"]) == ("New", True)


class TestFunds:
    def test_an_order_beyond_the_available_funds_is_refused(
        self, desk: Desk, state: SandboxState
    ) -> None:
        """400 INSUFFICIENT_FUNDS, and neither balances nor history change."""
        state.set_balances(desk.key, {"USDC": "100"})
        answer = desk.refused(**limit("Bid", "180", "1"))
        assert (answer.status, answer.code) == (400, "INSUFFICIENT_FUNDS")
        assert desk.balance("USDC") == (D("100"), D("0"))
        assert desk.history() == []
        assert desk.refused(**market("Ask", quantity="101")).code == "INSUFFICIENT_FUNDS"

    def test_open_orders_lock_funds_that_later_orders_cannot_use(self, desk: Desk) -> None:
        """Funds locked by a resting order are not available to the next one."""
        desk.order(**limit("Ask", "200", "60"))
        assert desk.refused(**limit("Ask", "200", "41")).code == "INSUFFICIENT_FUNDS"
        assert desk.order(**limit("Ask", "200", "40"))["status"] == "New"

    def test_money_is_conserved_between_accounts(self, state: SandboxState) -> None:
        """Trading between two accounts only moves money: totals minus fees stay the same."""
        alice, bob = Desk(state), Desk(state)
        for i in range(20):
            price = str(D("186.39") + D(i % 3) / 100)  # inside the house spread: no house fills
            maker, taker = (alice, bob) if i % 2 else (bob, alice)
            maker.order(**limit("Bid", price, "1.5"))
            taker.order(**limit("Ask", price, "1.5"))
        fees: dict[str, Decimal] = {}
        for desk in (alice, bob):
            for fill in desk.fills(limit="1000"):
                fees[fill["feeSymbol"]] = fees.get(fill["feeSymbol"], D(0)) + D(fill["fee"])
        for asset in ("USDC", "SOL"):
            total = sum((sum(d.balance(asset)) for d in (alice, bob)), D(0))
            assert total + fees[asset] == 2 * DEMO[asset], asset

    def test_concurrent_orders_keep_the_books_straight(self, state: SandboxState) -> None:
        """Threads placing and cancelling at once leave every lock released."""
        desks = [Desk(state) for _ in range(6)]

        def churn(desk: Desk) -> None:
            for i in range(40):
                order = desk.order(**limit("Bid", str(D("170") + D(i) / 100), "1"))
                desk.cancel("SOL_USDC", order["id"])

        threads = [threading.Thread(target=churn, args=(d,)) for d in desks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        for desk in desks:
            assert desk.balance("USDC") == (D("100000"), D("0"))
            assert len(desk.history(limit="1000")) == 40


class TestSelfTrade:
    def test_reject_taker_stops_the_incoming_order(self, desk: Desk) -> None:
        """By default an order that would meet its own account's order expires instead."""
        resting = desk.order(**limit("Bid", "186.40", "1"))
        order = desk.order(**market("Ask", quantity="1"))
        assert (order["status"], order["expiryReason"]) == ("Expired", "SelfTradePrevention")
        assert [o["id"] for o in desk.open_orders()] == [resting["id"]]

    def test_reject_maker_cancels_the_resting_order_and_walks_on(self, desk: Desk) -> None:
        desk.order(**limit("Bid", "186.40", "1"))
        order = desk.order(**market("Ask", quantity="1", selfTradePrevention="RejectMaker"))
        assert (order["status"], desk.fills()[0]["price"]) == ("Filled", BEST_BID)
        assert desk.open_orders() == []
        assert desk.history()[1]["expiryReason"] == "SelfTradePrevention"

    def test_allow_trades_with_itself(self, desk: Desk) -> None:
        desk.order(**limit("Bid", "186.40", "1"))
        order = desk.order(**market("Ask", quantity="1", selfTradePrevention="Allow"))
        assert [f["isMaker"] for f in desk.fills()] == [True, False]
        assert order["executedQuoteQuantity"] == "186.4"


class TestPerps:
    def test_a_perp_fill_opens_a_position_and_moves_only_fees(self, desk: Desk) -> None:
        """Buying a perp opens a long; the base asset balance never moves."""
        desk.order(**market("Bid", "SOL_USDC_PERP", quantity="2"))
        [position] = desk.positions()
        assert (position["netQuantity"], position["entryPrice"]) == ("2", "186.49")
        assert desk.balance("SOL") == (D("100"), D("0"))
        assert desk.balance("USDC") == (D("100000") - D("0.18649"), D("0"))  # taker 5 bps

    def test_reducing_realizes_pnl_and_closing_removes_the_position(self, desk: Desk) -> None:
        desk.order(**market("Bid", "SOL_USDC_PERP", quantity="2"))
        desk.order(**market("Ask", "SOL_USDC_PERP", quantity="1"))  # at 186.45: -0.04
        [position] = desk.positions()
        assert (position["netQuantity"], position["pnlRealized"]) == ("1", "-0.04")
        closed = desk.order(**market("Ask", "SOL_USDC_PERP", quantity="1", reduceOnly=True))
        assert closed["status"] == "Filled"
        assert desk.positions() == []

    def test_reduce_only_that_would_grow_the_position_expires(self, desk: Desk) -> None:
        desk.order(**market("Bid", "SOL_USDC_PERP", quantity="1"))
        order = desk.order(**market("Bid", "SOL_USDC_PERP", quantity="1", reduceOnly=True))
        assert (order["status"], order["expiryReason"]) == ("Expired", "ReduceOnlyNotReduced")

    def test_a_resting_perp_order_locks_margin(self, desk: Desk) -> None:
        """Margin is the notional over the account's leverage limit (10)."""
        desk.order(**limit("Bid", "150", "10", "SOL_USDC_PERP"))
        assert desk.balance("USDC") == (D("99850"), D("150"))

    def test_short_positions_are_negative(self, desk: Desk) -> None:
        desk.order(**market("Ask", "SOL_USDC_PERP", quantity="2"))
        [position] = desk.positions()
        assert (position["netQuantity"], position["netCost"]) == ("-2", "-372.9")
        assert position["pnlUnrealized"] == "-0.04"  # mark 186.47, entry 186.45


class TestBatchesAndCancelAll:
    def test_a_batch_answers_each_orders_result_in_place(
        self, desk: Desk, state: SandboxState
    ) -> None:
        """An order refused while the batch executes answers its error; the others go ahead."""
        state.set_balances(desk.key, {"USDC": "200"})
        batch = [limit("Bid", "180", "1"), limit("Bid", "181", "1")]
        answers = state.trading(lambda v: v.place_batch(desk.key, batch, NOW_MS))
        assert answers[0]["status"] == "New"
        assert answers[1] == {"code": "INSUFFICIENT_FUNDS", "message": answers[1]["message"]}

    def test_a_malformed_order_refuses_the_whole_batch(
        self, desk: Desk, state: SandboxState
    ) -> None:
        batch = [limit("Bid", "180", "1"), limit("Bid", "-1", "1")]
        with pytest.raises(Refused):
            state.trading(lambda v: v.place_batch(desk.key, batch, NOW_MS))
        assert desk.history() == []

    def test_cancel_all_cancels_one_market_and_releases_its_locks(
        self, desk: Desk, state: SandboxState
    ) -> None:
        desk.order(**limit("Bid", "180", "1"))
        desk.order(**limit("Ask", "190", "1"))
        kept = desk.order(**limit("Bid", "90000", "0.1", "BTC_USDC"))
        cancelled = state.trading(lambda v: v.cancel_all(desk.key, "SOL_USDC"))
        assert [o["status"] for o in cancelled] == ["Cancelled", "Cancelled"]
        assert [o["id"] for o in desk.open_orders()] == [kept["id"]]
        assert desk.balance("SOL") == (D("100"), D("0"))
        assert desk.balance("USDC")[1] == D("9000")


class TestHistory:
    def test_fills_page_newest_first(self, desk: Desk) -> None:
        for _ in range(3):
            desk.order(**market("Bid", quantity="1"))
        ids = [f["tradeId"] for f in desk.fills()]
        assert ids == sorted(ids, reverse=True)
        assert [f["tradeId"] for f in desk.fills(limit="1", offset="1")] == [ids[1]]
        assert [f["tradeId"] for f in desk.fills(sortDirection="Asc")] == ids[::-1]
        assert desk.fills(fillType="Liquidation") == []

    def test_order_history_has_every_order_with_iso_times(self, desk: Desk) -> None:
        desk.order(**limit("Bid", "180", "1"))
        desk.order(**market("Bid", quantity="1"))
        history = desk.history()
        assert [o["status"] for o in history] == ["Filled", "New"]
        assert history[0]["createdAt"] == "2025-06-15T15:06:40.000"
        assert desk.history(symbol="BTC_USDC") == []

    @pytest.mark.parametrize(
        "query", [{"limit": "0"}, {"offset": "-1"}, {"sortDirection": "Up"}, {"limit": "x"}]
    )
    def test_bad_paging_is_a_client_error(self, desk: Desk, query: dict[str, str]) -> None:
        with pytest.raises(Refused) as caught:
            desk.fills(**query)
        assert caught.value.answer.code == "INVALID_CLIENT_REQUEST"


class TestPriceHistory:
    def test_the_same_seed_and_clock_give_the_same_history(self) -> None:
        """Klines and funding rates depend only on the seed and the clock."""
        sol = load_fixture().markets["SOL_USDC_PERP"]
        query = {"interval": "1h", "startTime": str(NOW_MS // 1000 - 36_000)}
        first = candles.klines(sol, query, NOW_MS, 5)
        assert first == candles.klines(sol, query, NOW_MS, 5)
        assert first != candles.klines(sol, query, NOW_MS, 6)
        rates = candles.funding_rates(sol, {"limit": "3"}, NOW_MS, 5)
        assert rates == candles.funding_rates(sol, {"limit": "3"}, NOW_MS, 5)

    @pytest.mark.parametrize("interval", ["1m", "15m", "1h", "1d", "1w", "1month"])
    def test_candles_join_up(self, interval: str) -> None:
        """Each candle opens where the one before closed; high and low bound both."""
        sol = load_fixture().markets["SOL_USDC"]
        start = NOW_MS // 1000 - 30 * candles.INTERVALS[interval]
        query = {"interval": interval, "startTime": str(start)}
        series = candles.klines(sol, query, NOW_MS, 1)
        assert len(series) >= 29
        for before, after in itertools.pairwise(series):
            assert after["open"] == before["close"]
            assert before["end"] == after["start"]
        for candle in series:
            assert D(candle["low"]) <= min(D(candle["open"]), D(candle["close"]))
            assert D(candle["high"]) >= max(D(candle["open"]), D(candle["close"]))


# -- shapes over HTTP -----------------------------------------------------------------------


class TestPublicRoutes:
    def test_markets_carry_every_field_clients_read(self, frozen: SandboxAdmin) -> None:
        """Filters, market type and book state, for spot and perp alike."""
        markets = frozen.http.get("/api/v1/markets").json()
        for m in markets:
            assert m["filters"]["price"]["tickSize"]
            assert m["filters"]["quantity"]["stepSize"]
            assert m["filters"]["quantity"]["minQuantity"]
            assert m["marketType"] in ("SPOT", "PERP")
            assert m["orderBookState"] == "Open"
            assert "book" not in m
        perp = next(m for m in markets if m["symbol"] == "SOL_USDC_PERP")
        assert perp["fundingInterval"] == 3_600_000
        one = frozen.http.get("/api/v1/market", params={"symbol": "SOL_USDC_PERP"}).json()
        assert one == perp

    def test_depth_lists_both_sides_ascending(self, frozen: SandboxAdmin) -> None:
        depth = frozen.http.get("/api/v1/depth", params={"symbol": "SOL_USDC"}).json()
        assert depth["asks"][0] == [BEST_ASK, "25"]
        assert depth["bids"][-1] == [BEST_BID, "25"]
        assert [D(p) for p, _ in depth["bids"]] == sorted(D(p) for p, _ in depth["bids"])
        assert depth["timestamp"] == int(FROZEN_S * 1000) * 1000

    def test_a_resting_order_shows_in_the_depth(self, frozen: SandboxAdmin) -> None:
        trader = Trader(frozen, clock=lambda: FROZEN_S)
        before = frozen.http.get("/api/v1/depth", params={"symbol": "SOL_USDC"}).json()
        trader.json("POST", "/api/v1/order", body=limit("Bid", "186.40", "2"))
        after = frozen.http.get("/api/v1/depth", params={"symbol": "SOL_USDC"}).json()
        assert after["bids"][-1] == ["186.40", "2"]
        assert int(after["lastUpdateId"]) > int(before["lastUpdateId"])
        limited = frozen.http.get("/api/v1/depth", params={"symbol": "SOL_USDC", "limit": "2"})
        assert len(limited.json()["bids"]) == 2

    def test_a_trade_moves_the_ticker_and_the_tape(self, frozen: SandboxAdmin) -> None:
        trader = Trader(frozen, clock=lambda: FROZEN_S)
        ticker = frozen.http.get("/api/v1/ticker", params={"symbol": "SOL_USDC"}).json()
        assert (ticker["lastPrice"], ticker["trades"]) == ("186.40", "48211")
        trader.json("POST", "/api/v1/order", body=market("Bid", quantity="1"))
        moved = frozen.http.get("/api/v1/ticker", params={"symbol": "SOL_USDC"}).json()
        assert (moved["lastPrice"], moved["trades"]) == (BEST_ASK, "48212")
        [trade] = frozen.http.get("/api/v1/trades", params={"symbol": "SOL_USDC"}).json()
        assert trade | {"id": 0} == {
            "id": 0,
            "isBuyerMaker": False,
            "price": BEST_ASK,
            "quantity": "1",
            "quoteQuantity": BEST_ASK,
            "timestamp": int(FROZEN_S * 1000),
        }
        assert len(frozen.http.get("/api/v1/tickers").json()) == 5

    def test_perp_figures(self, frozen: SandboxAdmin) -> None:
        """Mark prices, funding rates and open interest exist for perps only."""
        marks = frozen.http.get("/api/v1/markPrices").json()
        assert {m["symbol"] for m in marks} == {"SOL_USDC_PERP", "BTC_USDC_PERP"}
        assert (
            marks[0]["nextFundingTimestamp"] == (int(FROZEN_S * 1000) // 3_600_000 + 1) * 3_600_000
        )
        rates = frozen.http.get(
            "/api/v1/fundingRates", params={"symbol": "SOL_USDC_PERP", "limit": "2"}
        ).json()
        assert [r["intervalEndTimestamp"] for r in rates] == [
            "2025-06-15T15:00:00",
            "2025-06-15T14:00:00",
        ]
        assert frozen.http.get("/api/v1/fundingRates", params={"symbol": "SOL_USDC"}).json() == []
        interest = frozen.http.get("/api/v1/openInterest", params={"symbol": "BTC_USDC_PERP"})
        assert interest.json()[0]["openInterest"] == "517.3342"

    def test_klines_answer_backpacks_shape(self, frozen: SandboxAdmin) -> None:
        start = int(FROZEN_S) - 3 * 3600
        answer = frozen.http.get(
            "/api/v1/klines",
            params={"symbol": "SOL_USDC", "interval": "1h", "startTime": str(start)},
        ).json()
        assert len(answer) == 4  # three whole hours and the current one
        assert set(answer[0]) == {
            "open", "high", "low", "close", "volume", "quoteVolume", "trades", "start", "end"
        }  # fmt: skip
        assert answer[-1]["start"] == "2025-06-15 15:00:00"

    def test_assets_list_their_networks(self, frozen: SandboxAdmin) -> None:
        assets = {a["symbol"]: a for a in frozen.http.get("/api/v1/assets").json()}
        assert {t["blockchain"] for t in assets["USDC"]["tokens"]} == {"Solana", "Ethereum"}

    @pytest.mark.parametrize(
        ("query", "status", "code"),
        [({}, 400, "INVALID_CLIENT_REQUEST"), ({"symbol": "DOGE_USDC"}, 400, "INVALID_SYMBOL")],
        ids=["missing", "unknown"],
    )
    def test_a_market_must_be_named_and_known(
        self, frozen: SandboxAdmin, query: dict[str, str], status: int, code: str
    ) -> None:
        response = frozen.http.get("/api/v1/ticker", params=query)
        assert (response.status_code, response.json()["code"]) == (status, code)

    @pytest.mark.parametrize(
        ("method", "path", "status", "code"),
        [
            ("GET", "/api/v1/nowhere", 404, "RESOURCE_NOT_FOUND"),
            ("GET", "/api/v1/time/", 404, "RESOURCE_NOT_FOUND"),
            ("PUT", "/api/v1/order", 405, "INVALID_CLIENT_REQUEST"),
        ],
        ids=["unknown", "trailing-slash", "method"],
    )
    def test_unknown_routes_get_backpacks_error_shape(
        self, frozen: SandboxAdmin, method: str, path: str, status: int, code: str
    ) -> None:
        """Unknown paths and methods answer JSON {code, message}, marked as the sandbox's."""
        response = frozen.http.request(method, path)
        assert (response.status_code, response.json()["code"]) == (status, code)
        assert response.json()["message"]
        assert response.headers[SANDBOX_HEADER] == "true"

    def test_market_data_is_faulted_like_every_public_route(self, frozen: SandboxAdmin) -> None:
        frozen.set_faults(status=429)
        response = frozen.http.get("/api/v1/markets")
        assert (response.status_code, response.json()["code"]) == (429, "TOO_MANY_REQUESTS")


class TestSignedRoutes:
    def test_cancel_all_fills_and_history_over_http(self, frozen: SandboxAdmin) -> None:
        trader = Trader(frozen, clock=lambda: FROZEN_S)
        trader.json("POST", "/api/v1/order", body=limit("Bid", "180", "1"))
        trader.json("POST", "/api/v1/order", body=market("Bid", quantity="1", clientId=5))
        cancelled = trader.json("DELETE", "/api/v1/orders", body={"symbol": "SOL_USDC"})
        assert [o["status"] for o in cancelled] == ["Cancelled"]
        [fill] = trader.json("GET", "/wapi/v1/history/fills", query={"symbol": "SOL_USDC"})
        assert fill | {"tradeId": 0, "orderId": "x"} == {
            "clientId": "5",
            "fee": "0.001",
            "feeSymbol": "SOL",
            "isMaker": False,
            "orderId": "x",
            "price": BEST_ASK,
            "quantity": "1",
            "side": "Bid",
            "symbol": "SOL_USDC",
            "systemOrderType": None,
            "timestamp": "2025-06-15T15:08:43.456",
            "tradeId": 0,
        }
        history = trader.json("GET", "/wapi/v1/history/orders", query={"limit": "5"})
        assert [o["status"] for o in history] == ["Filled", "Cancelled"]

    def test_deposit_addresses_are_stable_and_chain_shaped(self, frozen: SandboxAdmin) -> None:
        trader = Trader(frozen, clock=lambda: FROZEN_S)

        def address(chain: str) -> str:
            answer = trader.json(
                "GET", "/wapi/v1/capital/deposit/address", query={"blockchain": chain}
            )
            return str(answer["address"])

        assert address("Ethereum").startswith("0x")
        assert len(address("Ethereum")) == 42
        assert address("Bitcoin").startswith("bc1q")
        assert address("Solana") == address("Solana")
        refused = trader.call(
            "GET", "/wapi/v1/capital/deposit/address", query={"blockchain": "Narnia"}
        )
        assert refused.status_code == 400

    def test_positions_over_http(self, frozen: SandboxAdmin) -> None:
        trader = Trader(frozen, clock=lambda: FROZEN_S)
        assert trader.json("GET", "/api/v1/position") == []
        trader.json("POST", "/api/v1/order", body=market("Ask", "BTC_USDC_PERP", quantity="0.01"))
        [position] = trader.json("GET", "/api/v1/position")
        assert (position["symbol"], position["netQuantity"]) == ("BTC_USDC_PERP", "-0.01")

    def test_open_orders_filter_by_market_type(self, frozen: SandboxAdmin) -> None:
        trader = Trader(frozen, clock=lambda: FROZEN_S)
        trader.json("POST", "/api/v1/order", body=limit("Bid", "180", "1"))
        trader.json("POST", "/api/v1/order", body=limit("Bid", "180", "1", "SOL_USDC_PERP"))
        perps = trader.json("GET", "/api/v1/orders", query={"marketType": "PERP"})
        assert [o["symbol"] for o in perps] == ["SOL_USDC_PERP"]


class TestAdminBalances:
    def test_balances_are_set_and_read(self, frozen: SandboxAdmin) -> None:
        trader = Trader(frozen, clock=lambda: FROZEN_S)
        key = trader.pair.api_key
        assert frozen.balances(key)["USDC"] == {"available": "100000", "locked": "0", "staked": "0"}
        frozen.set_balances(key, {"USDC": "12.5", "ETH": "0"})
        capital = trader.json("GET", "/api/v1/capital")
        assert (capital["USDC"]["available"], capital["ETH"]["available"]) == ("12.5", "0")

    @pytest.mark.parametrize(
        ("whose", "balances", "status"),
        [
            (None, {"USDC": "1"}, 400),
            ("mine", {"DOGE": "1"}, 400),
            ("mine", {"USDC": "-1"}, 400),
            ("mine", {"USDC": 1.5}, 400),
            ("stranger", {"USDC": "1"}, 404),
        ],
        ids=["no-key", "unknown-asset", "negative", "float", "unregistered"],
    )
    def test_bad_balance_requests_are_refused(
        self, frozen: SandboxAdmin, whose: str | None, balances: dict[str, Any], status: int
    ) -> None:
        """Only registered keys, known assets and non-negative decimal strings."""
        keys = {"mine": Trader(frozen).pair.api_key, "stranger": generate_pair().api_key}
        body: dict[str, Any] = {"balances": balances}
        if whose is not None:
            body["api_key"] = keys[whose]
        assert frozen.http.post("/_sandbox/balances", json=body).status_code == status

    def test_reset_forgets_everything(self, frozen: SandboxAdmin) -> None:
        trader = Trader(frozen, clock=lambda: FROZEN_S)
        trader.json("POST", "/api/v1/order", body=market("Bid", quantity="1"))
        frozen.reset()
        assert frozen.http.get("/_sandbox/keys").json() == []
        assert frozen.http.get("/api/v1/trades", params={"symbol": "SOL_USDC"}).json() == []


# -- real clients ---------------------------------------------------------------------------


@pytest.fixture
def trader_pair(sandbox: SandboxAdmin) -> KeyPair:
    pair = generate_pair()
    sandbox.register(pair.api_key)
    return pair


def _ccxt_config(pair: KeyPair) -> dict[str, Any]:
    return {"apiKey": pair.api_key, "secret": pair.secret.reveal(), "enableRateLimit": False}


@pytest.fixture
def exchange(sandbox: SandboxAdmin, trader_pair: KeyPair) -> Any:
    """ccxt's backpack class, signing itself, with its URLs pointed at the sandbox."""
    client = ccxt.backpack(_ccxt_config(trader_pair))
    client.urls["api"] = {"public": sandbox.url, "private": sandbox.url}
    return client


class TestCcxt:
    def test_load_markets_reads_precision_limits_and_networks(self, exchange: Any) -> None:
        markets = exchange.load_markets()
        sol, perp = markets["SOL/USDC"], markets["SOL/USDC:USDC"]
        assert (sol["type"], sol["precision"]["price"], sol["precision"]["amount"]) == (
            "spot",
            0.01,
            0.01,
        )
        assert sol["limits"]["amount"]["min"] == 0.01
        assert (perp["type"], perp["settle"], perp["linear"]) == ("swap", "USDC", True)
        assert set(exchange.currencies["USDC"]["networks"]) == {"SOL", "ERC20"}

    def test_public_market_data(self, exchange: Any) -> None:
        ticker = exchange.fetch_ticker("SOL/USDC")
        assert (ticker["last"], ticker["high"], ticker["low"]) == (186.4, 188.9, 180.72)
        book = exchange.fetch_order_book("SOL/USDC")
        assert (book["bids"][0], book["asks"][0]) == ([186.38, 25.0], [186.42, 25.0])
        assert book["nonce"] > 0
        candles_ = exchange.fetch_ohlcv("SOL/USDC", "1h", limit=3)
        assert len(candles_) >= 3
        assert all(len(c) == 6 for c in candles_)
        assert exchange.fetch_funding_rate("SOL/USDC:USDC")["fundingRate"] == 0.0000125
        assert exchange.fetch_open_interest("BTC/USDC:USDC")["openInterestValue"] == 517.3342
        assert set(exchange.fetch_tickers()) >= {"SOL/USDC", "BTC/USDC:USDC"}

    def test_a_resting_limit_order_is_open_until_cancelled(self, exchange: Any) -> None:
        """create_order (limit) rests; fetch_open_orders shows it; cancel_order cancels it."""
        order = exchange.create_order("SOL/USDC", "limit", "buy", 2, 180.5)
        assert (order["status"], order["price"], order["amount"]) == ("open", 180.5, 2.0)
        assert [o["id"] for o in exchange.fetch_open_orders("SOL/USDC")] == [order["id"]]
        assert exchange.fetch_balance()["USDC"]["used"] == 361.0
        cancelled = exchange.cancel_order(order["id"], "SOL/USDC")
        assert cancelled["status"] == "canceled"
        assert exchange.fetch_open_orders("SOL/USDC") == []
        assert exchange.fetch_balance()["USDC"] == {
            "free": 100000.0,
            "used": 0.0,
            "total": 100000.0,
        }

    def test_a_market_order_fills_and_moves_the_balance(self, exchange: Any) -> None:
        before = exchange.fetch_balance()
        order = exchange.create_order("SOL/USDC", "market", "buy", 2)
        assert (order["status"], order["filled"], order["cost"]) == ("closed", 2.0, 372.84)
        after = exchange.fetch_balance()
        assert after["SOL"]["free"] == pytest.approx(before["SOL"]["free"] + 2 - 0.002)
        assert after["USDC"]["free"] == pytest.approx(before["USDC"]["free"] - 372.84)
        [trade] = exchange.fetch_my_trades("SOL/USDC")
        assert (trade["side"], trade["price"], trade["amount"]) == ("buy", 186.42, 2.0)
        assert (trade["takerOrMaker"], trade["order"]) == ("taker", order["id"])
        assert trade["fee"] == {"cost": 0.002, "currency": "SOL"}
        assert abs(trade["timestamp"] - time.time() * 1000) < 60_000
        assert exchange.fetch_trades("SOL/USDC")[-1]["price"] == 186.42

    def test_an_ioc_that_cannot_fill_is_cancelled(self, exchange: Any) -> None:
        order = exchange.create_order("SOL/USDC", "limit", "buy", 1, 150, {"timeInForce": "IOC"})
        assert (order["status"], order["filled"]) == ("canceled", 0.0)
        assert order["info"]["expiryReason"] == "ImmediateOrCancel"
        assert exchange.fetch_open_orders("SOL/USDC") == []

    def test_cancel_all_orders(self, exchange: Any) -> None:
        exchange.create_order("SOL/USDC", "limit", "sell", 1, 200)
        exchange.create_order("SOL/USDC", "limit", "sell", 1, 201)
        cancelled = exchange.cancel_all_orders("SOL/USDC")
        assert [o["status"] for o in cancelled] == ["canceled", "canceled"]
        assert exchange.fetch_open_orders() == []
        assert [o["status"] for o in exchange.fetch_orders("SOL/USDC")] == ["canceled"] * 2

    def test_perp_positions_and_deposit_address(self, exchange: Any) -> None:
        exchange.create_order("SOL/USDC:USDC", "market", "buy", 3)
        [position] = exchange.fetch_positions()
        assert (position["symbol"], position["side"]) == ("SOL/USDC:USDC", "long")
        assert float(position["contracts"]) == 3.0  # ccxt leaves this one a string
        address = exchange.fetch_deposit_address("USDC", {"network": "ERC20"})
        assert address["address"].startswith("0x")

    def test_refusals_raise_ccxts_own_errors(
        self, exchange: Any, sandbox: SandboxAdmin, trader_pair: KeyPair
    ) -> None:
        with pytest.raises(ccxt.InsufficientFunds):
            exchange.create_order("SOL/USDC", "limit", "buy", 1000, 180)
        with pytest.raises(ccxt.InvalidOrder):
            exchange.create_order("SOL/USDC", "limit", "buy", 1, 187, {"postOnly": True})
        sandbox.revoke(trader_pair.api_key)
        with pytest.raises(ccxt.AuthenticationError):
            exchange.fetch_balance()


class TestCcxtAsync:
    def test_the_unified_calls_work_async(
        self, sandbox: SandboxAdmin, trader_pair: KeyPair
    ) -> None:
        """ccxt.async_support: markets, balance, ticker, book, orders, cancels and trades."""

        async def session() -> dict[str, Any]:
            client = ccxt.async_support.backpack(_ccxt_config(trader_pair))
            client.urls["api"] = {"public": sandbox.url, "private": sandbox.url}
            try:
                seen: dict[str, Any] = {"markets": await client.load_markets()}
                seen["ticker"] = await client.fetch_ticker("BTC/USDC")
                seen["book"] = await client.fetch_order_book("BTC/USDC")
                resting = await client.create_order("BTC/USDC", "limit", "buy", 0.01, 90000)
                seen["open"] = await client.fetch_open_orders("BTC/USDC")
                seen["cancelled"] = await client.cancel_order(resting["id"], "BTC/USDC")
                seen["market"] = await client.create_order("BTC/USDC", "market", "sell", 0.1)
                seen["ioc"] = await client.create_order(
                    "BTC/USDC", "limit", "sell", 0.1, 99000, {"timeInForce": "IOC"}
                )
                await client.create_order("BTC/USDC", "limit", "sell", 0.01, 99000)
                seen["all"] = await client.cancel_all_orders("BTC/USDC")
                seen["trades"] = await client.fetch_my_trades("BTC/USDC")
                seen["balance"] = await client.fetch_balance()
                seen["resting"] = resting
            finally:
                await client.close()
            return seen

        seen = asyncio.run(session())
        assert "BTC/USDC:USDC" in seen["markets"]
        assert seen["ticker"]["last"] == 97015.0
        assert seen["book"]["asks"][0] == [97018.6, 0.2]
        assert [o["id"] for o in seen["open"]] == [seen["resting"]["id"]]
        assert seen["cancelled"]["status"] == "canceled"
        assert (seen["market"]["status"], seen["market"]["filled"]) == ("closed", 0.1)
        assert seen["ioc"]["status"] == "canceled"
        assert [o["status"] for o in seen["all"]] == ["canceled"]
        assert [(t["side"], t["price"]) for t in seen["trades"]] == [("sell", 97012.4)]
        assert seen["balance"]["BTC"]["free"] == 0.9
        assert seen["balance"]["USDC"]["free"] == pytest.approx(100000 + 9701.24 * 0.999)


class TestBpxPy:
    @pytest.fixture
    def account(self, sandbox: SandboxAdmin, trader_pair: KeyPair) -> Account:
        client = Account(public_key=trader_pair.api_key, secret_key=trader_pair.secret.reveal())
        client.BPX_API_URL = f"{sandbox.url}/"
        return client

    @pytest.fixture
    def public(self, sandbox: SandboxAdmin) -> Public:
        client = Public()
        client.BASE_URL = f"{sandbox.url}/"
        return client

    def test_public_market_data(self, public: Public) -> None:
        assert len(public.get_markets()) == 5
        assert {a["symbol"] for a in public.get_assets()} == set(DEMO)
        assert public.get_ticker("SOL_USDC")["lastPrice"] == "186.40"
        assert len(public.get_tickers()) == 5
        assert public.get_depth("SOL_USDC")["asks"][0] == [BEST_ASK, "25"]
        klines = public.get_klines("SOL_USDC", "1h", int(time.time()) - 7200)
        assert len(klines) >= 2
        assert public.get_recent_trades("SOL_USDC") == []
        assert public.get_open_interest("SOL_USDC_PERP")[0]["symbol"] == "SOL_USDC_PERP"
        assert len(public.get_funding_interval_rates("SOL_USDC_PERP", limit=2)) == 2
        assert public.get_status()["status"] == "Ok"

    def test_async_public_mark_prices(self, sandbox: SandboxAdmin) -> None:
        async def marks() -> Any:
            client = AsyncPublic()
            client.BASE_URL = f"{sandbox.url}/"
            return await client.get_all_mark_prices("SOL_USDC_PERP")

        [mark] = asyncio.run(marks())
        assert (mark["markPrice"], mark["fundingRate"]) == ("186.47", "0.0000125")

    def test_an_account_trades_and_reads_its_history(self, account: Account) -> None:
        assert account.get_balances()["USDC"]["available"] == "100000"
        resting = account.execute_order(
            "SOL_USDC",
            "Bid",
            "Limit",
            time_in_force="GTC",
            quantity="1",
            price="180.50",
            client_id=9,
        )
        assert resting["status"] == "New"
        assert account.get_open_order("SOL_USDC", client_id=9)["id"] == resting["id"]
        assert [o["id"] for o in account.get_open_orders(symbol="SOL_USDC")] == [resting["id"]]
        sold = account.execute_order("SOL_USDC", "Ask", "Market", quantity="1.5")
        assert (sold["status"], sold["executedQuoteQuantity"]) == ("Filled", "279.57")
        ioc = account.execute_order(
            "SOL_USDC", "Bid", "Limit", time_in_force="IOC", quantity="1", price="150"
        )
        assert (ioc["status"], ioc["expiryReason"]) == ("Expired", "ImmediateOrCancel")
        assert account.cancel_order("SOL_USDC", order_id=resting["id"])["status"] == "Cancelled"
        account.execute_order("SOL_USDC", "Ask", "Limit", quantity="1", price="200")
        assert [o["status"] for o in account.cancel_all_orders("SOL_USDC")] == ["Cancelled"]
        [fill] = account.get_fill_history(symbol="SOL_USDC", limit=10, offset=0)
        assert (fill["side"], fill["price"], fill["fee"]) == ("Ask", BEST_BID, "0.27957")
        statuses = [o["status"] for o in account.get_order_history(limit=10, offset=0)]
        assert statuses == ["Cancelled", "Expired", "Filled", "Cancelled"]
        balances = account.get_balances()
        assert balances["SOL"] == {"available": "98.5", "locked": "0", "staked": "0"}
        assert balances["USDC"]["available"] == str(D("100000") + D("279.57") - D("0.27957"))

    def test_positions_and_deposit_address(self, account: Account) -> None:
        account.execute_order("SOL_USDC_PERP", "Ask", "Market", quantity="2")
        [position] = account.get_open_positions()
        assert (position["netQuantity"], position["entryPrice"]) == ("-2", "186.45")
        assert account.get_deposit_address("Solana")["address"]

    def test_async_account_reads_balances(
        self, sandbox: SandboxAdmin, trader_pair: KeyPair
    ) -> None:
        async def balances() -> Any:
            client = AsyncAccount(trader_pair.api_key, trader_pair.secret.reveal())
            client.BPX_API_URL = f"{sandbox.url}/"
            return await client.get_balances()

        assert asyncio.run(balances())["BTC"]["available"] == "1"
