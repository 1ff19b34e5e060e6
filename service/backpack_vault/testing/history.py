"""What happened: fills (per account), trades (per market), and the paging of history queries."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from backpack_vault.testing.answers import bad_request
from backpack_vault.testing.decimals import fmt, iso_ms
from backpack_vault.testing.market import Market

__all__ = ["Fill", "Page", "Trade", "query_int"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Fill:
    """One side of a trade, as its account sees it."""

    trade_id: int
    order_id: str
    client_id: int | None
    market: Market
    side: str
    price: Decimal
    quantity: Decimal
    fee: Decimal
    fee_symbol: str
    is_maker: bool
    timestamp: int

    def view(self) -> dict[str, Any]:
        """The shape of ``GET /wapi/v1/history/fills``."""
        return {
            "clientId": None if self.client_id is None else str(self.client_id),
            "fee": fmt(self.fee),
            "feeSymbol": self.fee_symbol,
            "isMaker": self.is_maker,
            "orderId": self.order_id,
            "price": self.market.price_text(self.price),
            "quantity": fmt(self.quantity),
            "side": self.side,
            "symbol": self.market.symbol,
            "systemOrderType": None,
            "timestamp": iso_ms(self.timestamp),
            "tradeId": self.trade_id,
        }


@dataclass(frozen=True, slots=True)
class Trade:
    """A trade on the public tape."""

    id: int
    market: Market
    price: Decimal
    quantity: Decimal
    buyer_is_maker: bool
    timestamp: int

    def view(self) -> dict[str, Any]:
        """The shape of ``GET /api/v1/trades``."""
        return {
            "id": self.id,
            "isBuyerMaker": self.buyer_is_maker,
            "price": self.market.price_text(self.price),
            "quantity": fmt(self.quantity),
            "quoteQuantity": fmt(self.price * self.quantity),
            "timestamp": self.timestamp,
        }


def query_int(query: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    """An integer query parameter; 400 when it is not one."""
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise bad_request(f"{name} must be an integer") from None


@dataclass(frozen=True, slots=True)
class Page:
    """``limit``, ``offset``, ``from``/``to`` (epoch ms) and ``sortDirection`` of a query."""

    limit: int = 100
    offset: int = 0
    start: int | None = None
    end: int | None = None
    descending: bool = True

    @classmethod
    def from_query(cls, query: Mapping[str, str], *, max_limit: int = 1000) -> Page:
        limit = query_int(query, "limit", 100)
        offset = query_int(query, "offset", 0)
        if limit is None or not 1 <= limit <= max_limit:
            raise bad_request(f"limit must be from 1 to {max_limit}")
        if offset is None or offset < 0:
            raise bad_request("offset must not be negative")
        direction = query.get("sortDirection", "Desc")
        if direction not in ("Asc", "Desc"):
            raise bad_request("sortDirection must be Asc or Desc")
        return cls(
            limit=limit,
            offset=offset,
            start=query_int(query, "from"),
            end=query_int(query, "to"),
            descending=direction == "Desc",
        )

    def select(self, items: Sequence[T], timestamp: Callable[[T], int]) -> list[T]:
        """``items`` (oldest first) within from/to, sorted, then the page."""
        chosen = [
            item
            for item in items
            if (self.start is None or timestamp(item) >= self.start)
            and (self.end is None or timestamp(item) <= self.end)
        ]
        if self.descending:
            chosen.reverse()
        return chosen[self.offset : self.offset + self.limit]
