"""What an account reads back from the venue: open orders, order history and fills.

Each function reads a :class:`~.venue.Venue` under the state's lock and
answers fresh dicts in Backpack's shapes; ``symbol``, ``marketType`` and
``orderId`` filter, :class:`~.history.Page` pages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backpack_vault.testing.history import Page
from backpack_vault.testing.market import Market
from backpack_vault.testing.venue import Venue

__all__ = ["fill_history", "open_orders", "order_history"]


def _is(market: Market, symbol: str | None, market_type: str | None) -> bool:
    return symbol in (None, market.symbol) and market_type in (None, market.market_type)


def open_orders(
    venue: Venue, owner: str, symbol: str | None, market_type: str | None
) -> list[dict[str, Any]]:
    """``GET /api/v1/orders``: resting orders, oldest first."""
    return [
        o.view()
        for o in venue.open.values()
        if o.owner == owner and _is(o.request.market, symbol, market_type)
    ]


def order_history(venue: Venue, owner: str, query: Mapping[str, str]) -> list[dict[str, Any]]:
    """``GET /wapi/v1/history/orders``: every order, newest first unless ``sortDirection=Asc``."""
    page = Page.from_query(query)
    symbol, market_type, order_id = (
        query.get("symbol"),
        query.get("marketType"),
        query.get("orderId"),
    )
    orders = [
        o
        for o in venue.orders.get(owner, ())
        if _is(o.request.market, symbol, market_type) and order_id in (None, o.id)
    ]
    return [o.history_view() for o in page.select(orders, lambda o: o.created_at)]


def fill_history(venue: Venue, owner: str, query: Mapping[str, str]) -> list[dict[str, Any]]:
    """``GET /wapi/v1/history/fills``: newest first unless ``sortDirection=Asc``."""
    page = Page.from_query(query)
    if query.get("fillType", "User") != "User":
        return []  # no liquidations, ADL or conversions happen here
    symbol, market_type, order_id = (
        query.get("symbol"),
        query.get("marketType"),
        query.get("orderId"),
    )
    fills = [
        f
        for f in venue.fills.get(owner, ())
        if _is(f.market, symbol, market_type) and order_id in (None, f.order_id)
    ]
    return [f.view() for f in page.select(fills, lambda f: f.timestamp)]
