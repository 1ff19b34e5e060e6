"""Decimal text as Backpack writes it, and Backpack's timestamp formats.

Prices and quantities are JSON strings in Backpack's schema; the sandbox keeps
them as :class:`~decimal.Decimal` and never lets a float near them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal

__all__ = ["ZERO", "floor_to", "fmt", "iso_ms", "iso_s", "kline_time"]

ZERO = Decimal(0)


def fmt(value: Decimal) -> str:
    """``Decimal("1.50")`` -> ``"1.5"``, ``Decimal("1E+2")`` -> ``"100"``, zero -> ``"0"``."""
    if value.is_zero():
        return "0"
    return format(value.normalize(), "f")


def floor_to(value: Decimal, step: Decimal) -> Decimal:
    """The largest multiple of ``step`` not above ``value`` (``value`` >= 0)."""
    return (value / step).to_integral_value(rounding=ROUND_DOWN) * step


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms // 1000, tz=UTC) + timedelta(milliseconds=ms % 1000)


def iso_ms(ms: int) -> str:
    """Fills' and order history's ``2025-07-27T17:39:00.092`` (UTC, no zone suffix)."""
    return _utc(ms).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def iso_s(ms: int) -> str:
    """Funding's ``intervalEndTimestamp``: ``2025-07-22T00:00:00``."""
    return _utc(ms).strftime("%Y-%m-%dT%H:%M:%S")


def kline_time(seconds: int) -> str:
    """Klines' ``start``/``end``: ``2025-07-19 13:09:00``."""
    return _utc(seconds * 1000).strftime("%Y-%m-%d %H:%M:%S")
