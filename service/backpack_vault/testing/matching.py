"""The matching engine: price-time priority books and the walk of an incoming order.

Pure: no locks, no clock, no balances. :func:`plan` says what an incoming order
would do against a book, :meth:`Book.take` carries a plan out. The venue
decides whether to carry it out (fill-or-kill, funds) and settles the fills.

Rules: a buyer takes the lowest asks first, a seller the highest bids; at one
price the older order first; every fill is at the resting (maker) order's
price. A limit order takes only prices at or better than its limit. An order
never trades with another order of its own account unless its
``selfTradePrevention`` is ``Allow``: ``RejectTaker`` stops the incoming order,
``RejectMaker`` cancels the resting one and walks on, ``RejectBoth`` does both.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from backpack_vault.testing.decimals import ZERO, floor_to

__all__ = ["SIDES", "STP_MODES", "Book", "Match", "Plan", "Resting", "Taker", "opposite", "plan"]

SIDES: Final = ("Bid", "Ask")
STP_MODES: Final = ("RejectTaker", "RejectMaker", "RejectBoth", "Allow")


def opposite(side: str) -> str:
    return "Ask" if side == "Bid" else "Bid"


@dataclass(slots=True)
class Resting:
    """An order on the book; ``owner`` is an API key, or None for the house."""

    order_id: str
    owner: str | None
    side: str
    price: Decimal
    remaining: Decimal
    seq: int


def _priority(order: Resting) -> tuple[Decimal, int]:
    return (-order.price if order.side == "Bid" else order.price, order.seq)


@dataclass(frozen=True, slots=True)
class Taker:
    """An incoming order: a limit (or None for market) and a quantity or a quote budget."""

    owner: str
    side: str
    limit: Decimal | None
    quantity: Decimal | None
    budget: Decimal | None
    step: Decimal
    stp: str = "RejectTaker"

    def reaches(self, price: Decimal) -> bool:
        if self.limit is None:
            return True
        return price <= self.limit if self.side == "Bid" else price >= self.limit


@dataclass(frozen=True, slots=True)
class Match:
    maker: Resting
    quantity: Decimal
    price: Decimal


@dataclass(slots=True)
class Plan:
    """What an incoming order would do: fills, makers cancelled by self-trade prevention,
    and whether self-trade prevention stopped the incoming order itself."""

    matches: list[Match] = field(default_factory=list)
    cancelled: list[Resting] = field(default_factory=list)
    stopped: bool = False

    @property
    def filled(self) -> Decimal:
        return sum((m.quantity for m in self.matches), ZERO)

    @property
    def cost(self) -> Decimal:
        return sum((m.quantity * m.price for m in self.matches), ZERO)


class Book:
    """One market's resting orders, each side kept best first."""

    def __init__(self) -> None:
        self._sides: dict[str, list[Resting]] = {side: [] for side in SIDES}
        self._seq = itertools.count()
        self.update_id = 0

    def add(
        self, order_id: str, owner: str | None, side: str, price: Decimal, qty: Decimal
    ) -> None:
        order = Resting(order_id, owner, side, price, qty, next(self._seq))
        bisect.insort(self._sides[side], order, key=_priority)
        self.update_id += 1

    def remove(self, order_id: str) -> Resting | None:
        for orders in self._sides.values():
            for i, order in enumerate(orders):
                if order.order_id == order_id:
                    del orders[i]
                    self.update_id += 1
                    return order
        return None

    def resting(self, side: str) -> tuple[Resting, ...]:
        return tuple(self._sides[side])

    def best(self, side: str) -> Decimal | None:
        orders = self._sides[side]
        return orders[0].price if orders else None

    def crosses(self, side: str, price: Decimal) -> bool:
        """Whether a limit order at ``price`` would take liquidity at once."""
        best = self.best(opposite(side))
        if best is None:
            return False
        return best <= price if side == "Bid" else best >= price

    def levels(self, side: str) -> list[tuple[Decimal, Decimal]]:
        """``(price, total quantity)`` per price, best first."""
        totals: dict[Decimal, Decimal] = {}
        for order in self._sides[side]:
            totals[order.price] = totals.get(order.price, ZERO) + order.remaining
        return list(totals.items())

    def take(self, plan: Plan) -> None:
        """Carry out a plan: shrink or remove the makers it filled or cancelled."""
        for match in plan.matches:
            match.maker.remaining -= match.quantity
        gone = {m.maker.order_id for m in plan.matches if m.maker.remaining <= 0}
        gone |= {order.order_id for order in plan.cancelled}
        for side, orders in self._sides.items():
            self._sides[side] = [o for o in orders if o.order_id not in gone]
        self.update_id += 1


def _prevent(result: Plan, maker: Resting, stp: str) -> bool:
    """Self-trade prevention against one of the taker's own orders; True: stop the taker."""
    if stp in ("RejectMaker", "RejectBoth"):
        result.cancelled.append(maker)
    result.stopped = stp in ("RejectTaker", "RejectBoth")
    return result.stopped


def _size(
    maker: Resting, left_qty: Decimal | None, left_budget: Decimal | None, step: Decimal
) -> Decimal:
    qty = maker.remaining if left_qty is None else min(maker.remaining, left_qty)
    if left_budget is not None:
        qty = min(qty, floor_to(left_budget / maker.price, step))
    return qty


def plan(book: Book, taker: Taker) -> Plan:
    """Walk the opposite side of ``book`` for ``taker``; change nothing."""
    result = Plan()
    left_qty, left_budget = taker.quantity, taker.budget
    for maker in book.resting(opposite(taker.side)):
        if not taker.reaches(maker.price):
            break
        if maker.owner == taker.owner and taker.stp != "Allow":
            if _prevent(result, maker, taker.stp):
                break
            continue
        qty = _size(maker, left_qty, left_budget, taker.step)
        if qty <= 0:
            break
        result.matches.append(Match(maker, qty, maker.price))
        left_qty = None if left_qty is None else left_qty - qty
        left_budget = None if left_budget is None else left_budget - qty * maker.price
        if left_qty == 0:
            break
    return result
