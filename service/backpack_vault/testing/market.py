"""The market fixture: assets, markets, and the figures every sandbox starts from.

``markets.json`` ships inside the package; :func:`load_fixture` reads it (or a
file of the same shape that a user's tests pass) into frozen records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

__all__ = ["Fixture", "HouseBook", "Market", "load_fixture"]

# Keys of a fixture market that describe the sandbox's own figures, not Backpack's object.
_SANDBOX_KEYS: Final = frozenset({"book", "ticker", "perp"})
# What Backpack answers for a spot market where a perp has figures.
_SPOT_DEFAULTS: Final[Mapping[str, Any]] = {
    "fundingInterval": None,
    "fundingRateLowerBound": None,
    "fundingRateUpperBound": None,
    "imfFunction": None,
    "mmfFunction": None,
    "openInterestLimit": "0",
}


@dataclass(frozen=True, slots=True)
class HouseBook:
    """The resting orders of the house: ``levels`` prices a ``level_step`` apart on each side,
    ``quantity`` at the best price, twice that at the next, and so on."""

    best_bid: Decimal
    best_ask: Decimal
    level_step: Decimal
    levels: int
    quantity: Decimal

    def side(self, side: str) -> list[tuple[Decimal, Decimal]]:
        """``(price, quantity)`` of one side, best first."""
        best, direction = (self.best_bid, -1) if side == "Bid" else (self.best_ask, 1)
        return [
            (best + direction * i * self.level_step, self.quantity * (i + 1))
            for i in range(self.levels)
        ]


@dataclass(frozen=True, slots=True)
class Market:
    symbol: str
    base: str
    quote: str
    market_type: str  # "SPOT" or "PERP"
    tick: Decimal
    step: Decimal
    min_price: Decimal
    max_price: Decimal | None
    min_quantity: Decimal
    max_quantity: Decimal | None
    book: HouseBook
    ticker: Mapping[str, str]
    perp_figures: Mapping[str, str]
    info: Mapping[str, Any]  # the /api/v1/markets object

    @property
    def perp(self) -> bool:
        return self.market_type == "PERP"

    def price_text(self, price: Decimal) -> str:
        """A price as the book shows it: as many decimals as the tick size."""
        return str(price.quantize(self.tick))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Market:
        filters = data["filters"]
        price, quantity = filters["price"], filters["quantity"]
        book = data["book"]
        info = {k: v for k, v in data.items() if k not in _SANDBOX_KEYS}
        if data["marketType"] != "PERP":
            info = dict(_SPOT_DEFAULTS) | info
        return cls(
            symbol=data["symbol"],
            base=data["baseSymbol"],
            quote=data["quoteSymbol"],
            market_type=data["marketType"],
            tick=Decimal(price["tickSize"]),
            step=Decimal(quantity["stepSize"]),
            min_price=Decimal(price["minPrice"]),
            max_price=_optional(price.get("maxPrice")),
            min_quantity=Decimal(quantity["minQuantity"]),
            max_quantity=_optional(quantity.get("maxQuantity")),
            book=HouseBook(
                best_bid=Decimal(book["bestBid"]),
                best_ask=Decimal(book["bestAsk"]),
                level_step=Decimal(book["levelStep"]),
                levels=int(book["levels"]),
                quantity=Decimal(book["quantity"]),
            ),
            ticker=MappingProxyType(dict(data["ticker"])),
            perp_figures=MappingProxyType(dict(data.get("perp", {}))),
            info=MappingProxyType(info),
        )


def _optional(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


@dataclass(frozen=True, slots=True)
class Fixture:
    """Everything a fresh sandbox knows before anyone trades."""

    account: Mapping[str, Any]
    demo_balances: Mapping[str, Decimal]
    assets: tuple[Mapping[str, Any], ...]
    markets: Mapping[str, Market]

    def market(self, symbol: object) -> Market | None:
        return self.markets.get(symbol) if isinstance(symbol, str) else None

    def blockchains(self) -> frozenset[str]:
        return frozenset(t["blockchain"] for a in self.assets for t in a["tokens"])

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fixture:
        markets = [Market.from_json(m) for m in data["markets"]]
        return cls(
            account=MappingProxyType(dict(data["account"])),
            demo_balances=MappingProxyType(
                {k: Decimal(v) for k, v in data["demoBalances"].items()}
            ),
            assets=tuple(MappingProxyType(dict(a)) for a in data["assets"]),
            markets=MappingProxyType({m.symbol: m for m in markets}),
        )


def load_fixture(path: Path | None = None) -> Fixture:
    """The shipped ``markets.json``, or a file of the same shape."""
    if path is None:
        text = resources.files("backpack_vault.testing").joinpath("markets.json").read_text("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return Fixture.from_json(json.loads(text))
