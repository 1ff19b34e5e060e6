"""The trading venue: books, accounts, orders and history of one sandbox.

Not thread-safe: :class:`~backpack_vault.testing.state.SandboxState` holds its
lock around every call. Rules, in the order an incoming order meets them:

1. The request is checked against its market (:func:`~.orders.parse_order`).
2. ``postOnly`` that would take liquidity is refused (400 ``INVALID_ORDER``).
3. ``reduceOnly`` that would not reduce the perp position expires
   (``ReduceOnlyNotReduced``).
4. The matching engine plans the fills (:mod:`~.matching`). ``FOK`` that cannot
   fill in full expires (``FillOrKill``) and changes nothing.
5. Funds are locked: a spot buy locks quote (limit price x quantity, or the
   planned cost of a market order), a spot sell locks the base quantity, a perp
   order locks the notional divided by the account's ``leverageLimit``.
   Short: 400 ``INSUFFICIENT_FUNDS`` (``INSUFFICIENT_MARGIN`` for perps).
6. The fills settle at the makers' prices, with maker or taker fees
   (basis points from the account settings; in the asset received on spot, in
   the quote asset on perps).
7. The rest of a GTC limit order rests on the book (``New`` or
   ``PartiallyFilled``); the rest of anything else expires
   (``ImmediateOrCancel``, ``InsufficientLiquidity``, ``SelfTradePrevention``)
   and its locked funds come back.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final

from backpack_vault.testing.answers import Refused, bad_order
from backpack_vault.testing.history import Fill, Trade
from backpack_vault.testing.ledger import Account, Position
from backpack_vault.testing.market import Fixture, Market
from backpack_vault.testing.matching import SIDES, Book, Match, Plan, Taker
from backpack_vault.testing.matching import plan as plan_fills
from backpack_vault.testing.orders import Order, OrderRequest, parse_order

__all__ = ["Venue"]

_KEPT: Final = 10_000  # orders and fills kept per account, trades per market
_BPS: Final = Decimal(10_000)
_FIRST_ORDER_ID: Final = 111_000_001


def _house_book(market: Market) -> Book:
    book = Book()
    for side in SIDES:
        for i, (price, quantity) in enumerate(market.book.side(side)):
            book.add(f"house-{side}-{i}", None, side, price, quantity)
    return book


class Venue:
    def __init__(self, fixture: Fixture) -> None:
        self.fixture = fixture
        self.books = {symbol: _house_book(m) for symbol, m in fixture.markets.items()}
        self.trades: dict[str, deque[Trade]] = {s: deque(maxlen=_KEPT) for s in fixture.markets}
        self.accounts: dict[str, Account] = {}
        self.open: dict[str, Order] = {}
        self.orders: dict[str, deque[Order]] = {}
        self.fills: dict[str, deque[Fill]] = {}
        self._order_ids = itertools.count(_FIRST_ORDER_ID)
        self._trade_ids = itertools.count(1)
        self._user_ids = itertools.count(1)
        self._leverage = Decimal(fixture.account["leverageLimit"])

    def account(self, owner: str) -> Account:
        """The key's account, opened with the demo balances on first use."""
        if owner not in self.accounts:
            self.accounts[owner] = Account.opened(next(self._user_ids), self.fixture.demo_balances)
            self.orders[owner] = deque(maxlen=_KEPT)
            self.fills[owner] = deque(maxlen=_KEPT)
        return self.accounts[owner]

    # -- placing ------------------------------------------------------------------------

    def place(self, owner: str, params: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
        return self._execute(owner, parse_order(params, self.fixture), now_ms).view()

    def place_batch(
        self, owner: str, batch: list[Mapping[str, Any]], now_ms: int
    ) -> list[dict[str, Any]]:
        """Every order is checked before any executes; one refused while executing answers
        its error object in its place and the others go ahead."""
        requests = [parse_order(params, self.fixture) for params in batch]
        answers: list[dict[str, Any]] = []
        for request in requests:
            try:
                answers.append(self._execute(owner, request, now_ms).view())
            except Refused as exc:
                answers.append({"code": exc.answer.code, "message": exc.answer.message})
        return answers

    def _execute(self, owner: str, request: OrderRequest, now_ms: int) -> Order:
        book = self.books[request.market.symbol]
        account = self.account(owner)
        if (
            request.post_only
            and request.price is not None
            and book.crosses(request.side, request.price)
        ):
            raise bad_order("INVALID_ORDER", "Order would immediately match and take")
        order = Order(str(next(self._order_ids)), owner, request, now_ms)
        if request.reduce_only and not _reduces(account, request):
            return self._expire(self._record(order), "ReduceOnlyNotReduced")
        taker = Taker(
            owner,
            request.side,
            request.price,
            request.quantity,
            request.quote_quantity,
            request.market.step,
            request.stp,
        )
        plan = plan_fills(book, taker)
        if request.time_in_force == "FOK" and request.quantity not in (None, plan.filled):
            return self._expire(self._record(order), "FillOrKill")
        self._lock(account, order, plan)  # refuses before anything is recorded
        self._record(order)
        book.take(plan)
        for match in plan.matches:
            self._settle(order, match, now_ms)
        for maker in plan.cancelled:
            self._expire(self.open[maker.order_id], "SelfTradePrevention")
        return self._finish(order, plan, book)

    def _record(self, order: Order) -> Order:
        self.orders[order.owner].append(order)
        self.open[order.id] = order
        return order

    def _unit(self, request: OrderRequest, price: Decimal) -> Decimal:
        """What one unit of base costs the order, in the asset it locks."""
        if request.market.perp:
            return price / self._leverage
        return price if request.side == "Bid" else Decimal(1)

    def _lock(self, account: Account, order: Order, plan: Plan) -> None:
        request, market = order.request, order.request.market
        asset = market.base if request.side == "Ask" and not market.perp else market.quote
        unit: Decimal | None = None
        if request.price is not None and request.quantity is not None:
            unit = self._unit(request, request.price)
            amount = unit * request.quantity
        else:
            amount = sum(
                (self._unit(request, m.price) * m.quantity for m in plan.matches), Decimal(0)
            )
        if not account.lock(asset, amount):
            code = "INSUFFICIENT_MARGIN" if market.perp else "INSUFFICIENT_FUNDS"
            raise bad_order(code, f"Insufficient {asset}: the order needs {amount}")
        order.lock_asset, order.locked, order.lock_unit = asset, amount, unit

    # -- settling -----------------------------------------------------------------------

    def _settle(self, order: Order, match: Match, now_ms: int) -> None:
        market = order.request.market
        trade = Trade(
            next(self._trade_ids),
            market,
            match.price,
            match.quantity,
            buyer_is_maker=order.request.side == "Ask",
            timestamp=now_ms,
        )
        self.trades[market.symbol].append(trade)
        self._leg(order, trade, is_maker=False)
        maker = self.open.get(match.maker.order_id)
        if maker is not None:
            self._leg(maker, trade, is_maker=True)
            if maker.remaining == 0:
                maker.status = "Filled"
                self.open.pop(maker.id)
            else:
                maker.status = "PartiallyFilled"

    def _fee_rate(self, market: Market, *, is_maker: bool) -> Decimal:
        kind = ("futures" if market.perp else "spot") + ("MakerFee" if is_maker else "TakerFee")
        return Decimal(self.fixture.account[kind]) / _BPS

    def _leg(self, order: Order, trade: Trade, *, is_maker: bool) -> None:
        """Settle one side of a trade: locked funds out, proceeds and fee in."""
        request, market = order.request, order.request.market
        account = self.accounts[order.owner]
        qty, price, cost = trade.quantity, trade.price, trade.quantity * trade.price
        unit = order.lock_unit if order.lock_unit is not None else self._unit(request, price)
        held = unit * qty
        order.locked -= held
        account.spend_locked(order.lock_asset, held)
        rate = self._fee_rate(market, is_maker=is_maker)
        if market.perp:
            pnl = self._position(account, market).trade(
                qty if request.side == "Bid" else -qty, price
            )
            fee, fee_symbol = cost * rate, market.quote
            account.credit(market.quote, held + pnl - fee)
        elif request.side == "Bid":
            fee, fee_symbol = qty * rate, market.base
            account.credit(market.quote, held - cost)  # a limit buy's price improvement
            account.credit(market.base, qty - fee)
        else:
            fee, fee_symbol = cost * rate, market.quote
            account.credit(market.quote, cost - fee)
        order.executed += qty
        order.executed_quote += cost
        self.fills[order.owner].append(
            Fill(
                trade.id,
                order.id,
                request.client_id,
                market,
                request.side,
                price,
                qty,
                fee,
                fee_symbol,
                is_maker,
                trade.timestamp,
            )
        )

    def _position(self, account: Account, market: Market) -> Position:
        if market.symbol not in account.positions:
            position_id = f"{account.user_id}{len(account.positions) + 1:04d}"
            account.positions[market.symbol] = Position(position_id, market)
        return account.positions[market.symbol]

    def _finish(self, order: Order, plan: Plan, book: Book) -> Order:
        """Filled, resting (GTC limit) or expired, once the fills have settled."""
        request = order.request
        if order.executed and (request.quantity is None or order.remaining == 0):
            order.status = "Filled"
            return self._close(order)
        if request.price is not None and request.time_in_force == "GTC" and not plan.stopped:
            book.add(order.id, order.owner, request.side, request.price, order.remaining)
            order.status = "PartiallyFilled" if order.executed else "New"
            return order
        if plan.stopped:
            return self._expire(order, "SelfTradePrevention")
        return self._expire(
            order, "ImmediateOrCancel" if request.limit else "InsufficientLiquidity"
        )

    def _close(self, order: Order) -> Order:
        """Take a finished order off the book and give back what it still locks."""
        self.books[order.request.market.symbol].remove(order.id)
        if order.locked:
            self.accounts[order.owner].release(order.lock_asset, order.locked)
            order.locked = Decimal(0)
        self.open.pop(order.id, None)
        return order

    def _expire(self, order: Order, reason: str) -> Order:
        order.status, order.expiry_reason = "Expired", reason
        return self._close(order)

    # -- finding and cancelling ---------------------------------------------------------

    def find(
        self, owner: str, symbol: str, order_id: str | None, client_id: str | None
    ) -> Order | None:
        """An open order of ``owner`` on ``symbol`` by id or client id."""
        for order in self.open.values():
            if order.owner != owner or order.request.market.symbol != symbol:
                continue
            if (order_id is not None and order.id == order_id) or (
                client_id is not None and str(order.request.client_id) == client_id
            ):
                return order
        return None

    def cancel(self, order: Order) -> dict[str, Any]:
        order.status = "Cancelled"
        return self._close(order).view()

    def cancel_all(self, owner: str, symbol: str) -> list[dict[str, Any]]:
        mine = [
            o for o in self.open.values() if o.owner == owner and o.request.market.symbol == symbol
        ]
        return [self.cancel(o) for o in mine]

    def set_balances(self, owner: str, balances: Mapping[str, Decimal]) -> dict[str, Any]:
        account = self.account(owner)
        for asset, amount in balances.items():
            account.balance(asset).available = amount
        return account.capital()


def _reduces(account: Account, request: OrderRequest) -> bool:
    position = account.positions.get(request.market.symbol)
    net = position.net if position is not None else Decimal(0)
    if net == 0 or (net > 0) == (request.side == "Bid"):
        return False
    return request.quantity is None or request.quantity <= abs(net)
