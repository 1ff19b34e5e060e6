"""Public market data in Backpack's shapes, from the fixture and what happened in the venue.

Every function reads a :class:`~.venue.Venue` (under the state's lock) and a
query of raw strings; a bad query raises :class:`~.answers.Refused`.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final

from backpack_vault.testing.answers import bad_order, bad_request
from backpack_vault.testing.decimals import ZERO, fmt
from backpack_vault.testing.history import query_int
from backpack_vault.testing.market import Fixture, Market
from backpack_vault.testing.venue import Venue

__all__ = [
    "assets",
    "depth",
    "mark_prices",
    "market",
    "markets",
    "open_interest",
    "perps",
    "require_market",
    "ticker",
    "tickers",
    "trades",
]

_DAY_MS: Final = 86_400_000
_MAX_TRADES: Final = 1000
_PERCENT: Final = Decimal("0.000001")


def require_market(fixture: Fixture, query: Mapping[str, str]) -> Market:
    symbol = query.get("symbol")
    if not symbol:
        raise bad_request("symbol is required")
    found = fixture.market(symbol)
    if found is None:
        raise bad_order("INVALID_SYMBOL", f"Market {symbol} does not exist in the sandbox")
    return found


def perps(fixture: Fixture, query: Mapping[str, str]) -> list[Market]:
    """The perp markets, or the one ``symbol`` names (none when it names a spot market)."""
    if query.get("symbol"):
        chosen = require_market(fixture, query)
        return [chosen] if chosen.perp else []
    return [m for m in fixture.markets.values() if m.perp]


def markets(fixture: Fixture) -> list[dict[str, Any]]:
    return [dict(m.info) for m in fixture.markets.values()]


def market(fixture: Fixture, query: Mapping[str, str]) -> dict[str, Any]:
    return dict(require_market(fixture, query).info)


def assets(fixture: Fixture) -> list[dict[str, Any]]:
    return [dict(a) | {"tokens": [dict(t) for t in a["tokens"]]} for a in fixture.assets]


def ticker(venue: Venue, chosen: Market, now_ms: int) -> dict[str, Any]:
    """The fixture's 24-hour figures, moved by the sandbox's own trades of the last day."""
    figures = chosen.ticker
    first, last = Decimal(figures["firstPrice"]), Decimal(figures["lastPrice"])
    high, low = Decimal(figures["high"]), Decimal(figures["low"])
    volume, quote_volume = Decimal(figures["volume"]), Decimal(figures["quoteVolume"])
    count = int(figures["trades"])
    for trade in venue.trades[chosen.symbol]:
        if trade.timestamp < now_ms - _DAY_MS:
            continue
        last, high, low = trade.price, max(high, trade.price), min(low, trade.price)
        volume += trade.quantity
        quote_volume += trade.quantity * trade.price
        count += 1
    change = last - first
    return {
        "firstPrice": chosen.price_text(first),
        "high": chosen.price_text(high),
        "lastPrice": chosen.price_text(last),
        "low": chosen.price_text(low),
        "priceChange": chosen.price_text(change),
        "priceChangePercent": fmt((change / first).quantize(_PERCENT)),
        "quoteVolume": fmt(quote_volume),
        "symbol": chosen.symbol,
        "trades": str(count),
        "volume": fmt(volume),
    }


def tickers(venue: Venue, now_ms: int) -> list[dict[str, Any]]:
    return [ticker(venue, m, now_ms) for m in venue.fixture.markets.values()]


def depth(venue: Venue, chosen: Market, query: Mapping[str, str], now_ms: int) -> dict[str, Any]:
    """Both sides in ascending price, as Backpack lists them (the best bid last)."""
    limit = query_int(query, "limit")
    if limit is not None and limit < 1:
        raise bad_request("limit must be positive")
    book = venue.books[chosen.symbol]
    asks, bids = book.levels("Ask")[:limit], book.levels("Bid")[:limit]
    return {
        "asks": [[chosen.price_text(p), fmt(q)] for p, q in asks],
        "bids": [[chosen.price_text(p), fmt(q)] for p, q in reversed(bids)],
        "lastUpdateId": str(book.update_id),
        "timestamp": now_ms * 1000,  # microseconds
    }


def trades(venue: Venue, chosen: Market, query: Mapping[str, str]) -> list[dict[str, Any]]:
    """The sandbox's own trades, oldest first: the newest ``limit`` after skipping ``offset``."""
    limit = query_int(query, "limit", 100) or 100
    offset = query_int(query, "offset", 0) or 0
    if not 1 <= limit <= _MAX_TRADES or offset < 0:
        raise bad_request("limit must be from 1 to 1000 and offset not negative")
    tape = list(venue.trades[chosen.symbol])
    end = max(0, len(tape) - offset)
    page = tape[max(0, end - limit) : end]
    return [t.view() for t in page]


def mark_prices(venue: Venue, query: Mapping[str, str], now_ms: int) -> list[dict[str, Any]]:
    answers = []
    for chosen in perps(venue.fixture, query):
        figures, width = chosen.perp_figures, int(chosen.info["fundingInterval"])
        answers.append(
            {
                "fundingRate": figures["fundingRate"],
                "indexPrice": figures["indexPrice"],
                "markPrice": figures["markPrice"],
                "nextFundingTimestamp": (now_ms // width + 1) * width,
                "symbol": chosen.symbol,
            }
        )
    return answers


def open_interest(venue: Venue, query: Mapping[str, str], now_ms: int) -> list[dict[str, Any]]:
    """The fixture's open interest plus the long side of the sandbox's own positions."""
    answers = []
    for chosen in perps(venue.fixture, query):
        longs = sum(
            (
                p.net
                for a in venue.accounts.values()
                for p in a.positions.values()
                if p.market.symbol == chosen.symbol and p.net > 0
            ),
            ZERO,
        )
        total = Decimal(chosen.perp_figures["openInterest"]) + longs
        answers.append({"openInterest": fmt(total), "symbol": chosen.symbol, "timestamp": now_ms})
    return answers
