"""Made-up price history: klines and funding rates, the same for the same seed and clock.

No wall clock and no floats: a price at second ``t`` is the fixture's last
price moved by a daily triangle wave (+-1%) and a per-minute wobble (+-0.2%)
drawn from a hash of the seed, the symbol and the minute. A candle opens at
the price of its start and closes at the price of its end (or of now), so
neighbouring candles join up whatever range is asked for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from backpack_vault.testing.answers import bad_request
from backpack_vault.testing.decimals import floor_to, fmt, iso_s, kline_time
from backpack_vault.testing.history import query_int
from backpack_vault.testing.market import Market

__all__ = ["INTERVALS", "funding_rates", "klines"]

_DAY: Final = 86_400
INTERVALS: Final[Mapping[str, int]] = {
    "1m": 60,
    "3m": 180,
    "5m": 300,
    "15m": 900,
    "30m": 1800,
    "1h": 3600,
    "2h": 7200,
    "4h": 14_400,
    "6h": 21_600,
    "8h": 28_800,
    "12h": 43_200,
    "1d": _DAY,
    "3d": 3 * _DAY,
    "1w": 7 * _DAY,
    "1month": 30 * _DAY,  # nominal: months follow the calendar
}
_MONDAY: Final = 4 * _DAY  # 1970-01-05, the first Monday after the epoch
_MAX_CANDLES: Final = 1000
_WAVE: Final = Decimal("0.01")
_WOBBLE: Final = Decimal("0.002")
_WICK: Final = Decimal("0.0005")


def _draw(*parts: object) -> Decimal:
    """A number in [-1, 1], the same for the same parts."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return Decimal(int.from_bytes(digest[:4], "big") % 20_001 - 10_000) / 10_000


def _price(market: Market, seed: int, t: int) -> Decimal:
    phase = Decimal(t % _DAY) / _DAY
    wave = 4 * abs(phase - Decimal("0.5")) - 1
    wobble = _draw(seed, market.symbol, t // 60)
    return Decimal(market.ticker["lastPrice"]) * (1 + _WAVE * wave + _WOBBLE * wobble)


def _starts(interval: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """``(open, close)`` seconds of each candle that overlaps [start, end)."""
    if interval == "1month":
        moment = datetime.fromtimestamp(start, tz=UTC).replace(day=1, hour=0, minute=0, second=0)
        while int(moment.timestamp()) < end:
            following = moment.replace(
                year=moment.year + moment.month // 12, month=moment.month % 12 + 1
            )
            yield int(moment.timestamp()), int(following.timestamp())
            moment = following
        return
    width = INTERVALS[interval]
    anchor = _MONDAY if interval == "1w" else 0
    t = (start - anchor) // width * width + anchor
    while t < end:
        yield t, t + width
        t += width


def _candle(
    market: Market, seed: int, interval: str, span: tuple[int, int], now: int
) -> dict[str, Any]:
    start, end = span
    first, last = _price(market, seed, start), _price(market, seed, min(end, now))
    high = max(first, last) * (1 + _WICK * (1 + _draw(seed, market.symbol, interval, start, "h")))
    low = min(first, last) * (1 - _WICK * (1 + _draw(seed, market.symbol, interval, start, "l")))
    minutes = Decimal(max(1, (min(end, now) - start) // 60))
    busy = 1 + _draw(seed, market.symbol, interval, start, "v") / 2
    volume = floor_to(Decimal(market.ticker["volume"]) / 1440 * minutes * busy, market.step)
    return {
        "close": market.price_text(last),
        "end": kline_time(end),
        "high": market.price_text(high),
        "low": market.price_text(low),
        "open": market.price_text(first),
        "quoteVolume": fmt((volume * (first + last) / 2).quantize(Decimal("0.01"))),
        "start": kline_time(start),
        "trades": str(int(minutes * 20 * busy)),
        "volume": fmt(volume),
    }


def klines(
    market: Market, query: Mapping[str, str], now_ms: int, seed: int
) -> list[dict[str, Any]]:
    """``GET /api/v1/klines``: ``interval`` and ``startTime`` (epoch seconds) are required;
    ``endTime`` defaults to now; at most the first 1000 candles from ``startTime``."""
    interval = query.get("interval")
    if interval is None or interval not in INTERVALS:
        raise bad_request(f"interval must be one of {', '.join(INTERVALS)}")
    start = query_int(query, "startTime")
    if start is None or start < 0:
        raise bad_request("startTime (epoch seconds) is required")
    now = now_ms // 1000
    end = min(query_int(query, "endTime", now) or now, now + 1)
    candles = []
    for span in _starts(interval, start, end):
        candles.append(_candle(market, seed, interval, span, now))
        if len(candles) == _MAX_CANDLES:
            break
    return candles


def funding_rates(
    market: Market, query: Mapping[str, str], now_ms: int, seed: int
) -> list[dict[str, Any]]:
    """``GET /api/v1/fundingRates``: past intervals, newest first (``limit``, ``offset``)."""
    limit = query_int(query, "limit", 100) or 100
    offset = query_int(query, "offset", 0) or 0
    if not 1 <= limit <= _MAX_CANDLES or offset < 0:
        raise bad_request("limit must be from 1 to 1000 and offset not negative")
    width = int(market.info["fundingInterval"])
    base = Decimal(market.perp_figures["fundingRate"])
    latest = now_ms // width * width
    rates = []
    for i in range(offset, offset + limit):
        end = latest - i * width
        rate = base * (1 + _draw(seed, market.symbol, "funding", end) / 2)
        rates.append(
            {
                "fundingRate": fmt(rate.quantize(Decimal("1E-10"))),
                "intervalEndTimestamp": iso_s(end),
                "symbol": market.symbol,
            }
        )
    return rates
