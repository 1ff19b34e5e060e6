"""Sandbox accounts: balances (available and locked) and perpetual positions.

A spot fill moves the base and quote assets; a perp fill moves the position
and settles its realized PnL and fee in the quote asset at once (Backpack's
``autoRealizePnl``). There is no margin held by positions, no funding, no
interest and no liquidation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from backpack_vault.testing.decimals import ZERO, fmt
from backpack_vault.testing.market import Market

__all__ = ["Account", "Balance", "Position"]


@dataclass(slots=True)
class Balance:
    available: Decimal = ZERO
    locked: Decimal = ZERO


@dataclass(slots=True)
class Position:
    """A perp position: ``net`` is signed (long > 0), ``entry`` its average price."""

    position_id: str
    market: Market
    net: Decimal = ZERO
    entry: Decimal = ZERO
    realized: Decimal = ZERO

    def trade(self, signed_qty: Decimal, price: Decimal) -> Decimal:
        """Apply one fill; return the PnL it realizes."""
        if self.net == 0 or (self.net > 0) == (signed_qty > 0):
            total = self.net + signed_qty
            self.entry = (self.entry * abs(self.net) + price * abs(signed_qty)) / abs(total)
            self.net = total
            return ZERO
        direction = 1 if self.net > 0 else -1
        pnl = min(abs(signed_qty), abs(self.net)) * (price - self.entry) * direction
        self.realized += pnl
        self.net += signed_qty
        if self.net == 0:
            self.entry = ZERO
        elif (self.net > 0) != (direction > 0):
            self.entry = price  # flipped: the rest opened at this fill's price
        return pnl

    def view(self, user_id: int) -> dict[str, Any]:
        """The shape of ``GET /api/v1/position``."""
        market = self.market
        mark = Decimal(market.perp_figures["markPrice"])
        imf, mmf = market.info["imfFunction"], market.info["mmfFunction"]
        return {
            "breakEvenPrice": fmt(self.entry),
            "cumulativeFundingPayment": "0",
            "cumulativeInterest": "0",
            "entryPrice": fmt(self.entry),
            "estLiquidationPrice": "0",
            "imf": imf["base"],
            "imfFunction": dict(imf),
            "markPrice": market.perp_figures["markPrice"],
            "mmf": mmf["base"],
            "mmfFunction": dict(mmf),
            "netCost": fmt(self.entry * self.net),
            "netExposureNotional": fmt(abs(self.net) * mark),
            "netExposureQuantity": fmt(abs(self.net)),
            "netQuantity": fmt(self.net),
            "pnlRealized": fmt(self.realized),
            "pnlUnrealized": fmt((mark - self.entry) * self.net),
            "positionId": self.position_id,
            "subaccountId": None,
            "symbol": market.symbol,
            "userId": user_id,
        }


@dataclass(slots=True)
class Account:
    """One API key's money. Amounts only ever move between ``available`` and ``locked``,
    or in and out through fills."""

    user_id: int
    balances: dict[str, Balance] = field(default_factory=dict)
    positions: dict[str, Position] = field(default_factory=dict)

    @classmethod
    def opened(cls, user_id: int, demo: Mapping[str, Decimal]) -> Account:
        return cls(user_id, {asset: Balance(amount) for asset, amount in demo.items()})

    def balance(self, asset: str) -> Balance:
        return self.balances.setdefault(asset, Balance())

    def lock(self, asset: str, amount: Decimal) -> bool:
        """Move ``amount`` from available to locked; False (and no change) when short."""
        balance = self.balance(asset)
        if balance.available < amount:
            return False
        balance.available -= amount
        balance.locked += amount
        return True

    def release(self, asset: str, amount: Decimal) -> None:
        balance = self.balance(asset)
        balance.locked -= amount
        balance.available += amount

    def spend_locked(self, asset: str, amount: Decimal) -> None:
        self.balance(asset).locked -= amount

    def credit(self, asset: str, amount: Decimal) -> None:
        """Add (or, negative, take) an amount of available funds."""
        self.balance(asset).available += amount

    def position(self, market: Market, new_id: str) -> Position:
        return self.positions.setdefault(market.symbol, Position(new_id, market))

    def capital(self) -> dict[str, dict[str, str]]:
        """The shape of ``GET /api/v1/capital``."""
        return {
            asset: {"available": fmt(b.available), "locked": fmt(b.locked), "staked": "0"}
            for asset, b in sorted(self.balances.items())
        }

    def open_positions(self, symbol: str | None) -> list[dict[str, Any]]:
        return [
            p.view(self.user_id)
            for p in self.positions.values()
            if p.net != 0 and symbol in (None, p.market.symbol)
        ]
