"""Orders: a request checked against its market, and the order record with Backpack's shape."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from backpack_vault.testing.answers import Answer, Refused, bad_order, bad_request
from backpack_vault.testing.decimals import ZERO, fmt, iso_ms
from backpack_vault.testing.market import Fixture, Market
from backpack_vault.testing.matching import SIDES, STP_MODES

__all__ = ["OPEN", "Order", "OrderRequest", "parse_order"]

OPEN: Final = frozenset({"New", "PartiallyFilled"})
_TIME_IN_FORCE: Final = ("GTC", "IOC", "FOK")
_MAX_CLIENT_ID: Final = 2**32 - 1
# Order features the sandbox verifies the signature of, then refuses with 501.
_UNSUPPORTED: Final = (
    "triggerPrice",
    "triggerQuantity",
    "stopLossTriggerPrice",
    "stopLossLimitPrice",
    "takeProfitTriggerPrice",
    "takeProfitLimitPrice",
)
# Fields Backpack's order objects carry that the sandbox never sets.
_ALWAYS_NULL: Final = {
    "relatedOrderId": None,
    "stopLossLimitPrice": None,
    "stopLossTriggerBy": None,
    "stopLossTriggerPrice": None,
    "strategyId": None,
    "takeProfitLimitPrice": None,
    "takeProfitTriggerBy": None,
    "takeProfitTriggerPrice": None,
    "triggerBy": None,
    "triggerPrice": None,
    "triggerQuantity": None,
    "triggeredAt": None,
}


@dataclass(frozen=True, slots=True)
class OrderRequest:
    """An order as sent, checked. ``*_text`` keep the caller's own spelling for echoes."""

    market: Market
    side: str
    order_type: str
    price: Decimal | None
    quantity: Decimal | None
    quote_quantity: Decimal | None
    price_text: str | None
    quantity_text: str | None
    quote_text: str | None
    client_id: int | None
    time_in_force: str
    post_only: bool
    reduce_only: bool | None
    stp: str

    @property
    def limit(self) -> bool:
        return self.order_type == "Limit"


def parse_order(params: Mapping[str, Any], fixture: Fixture) -> OrderRequest:
    """Check one order's fields against its market; raise Refused with Backpack's code."""
    market = _market(params.get("symbol"), fixture)
    side, order_type = params.get("side"), params.get("orderType")
    if side not in SIDES:
        raise bad_order("INVALID_ORDER", "side must be Bid or Ask")
    if order_type not in ("Limit", "Market"):
        raise bad_order("INVALID_ORDER", "orderType must be Limit or Market")
    if any(params.get(name) is not None for name in _UNSUPPORTED):
        raise Refused(Answer(501, "NOT_IMPLEMENTED", "The sandbox has no trigger orders"))
    limit = order_type == "Limit"
    quantity = _decimal(params, "quantity", required=limit)
    quote_quantity = _decimal(params, "quoteQuantity", required=False)
    price = _decimal(params, "price", required=limit)
    if not limit and (quantity is None) == (quote_quantity is None):
        raise bad_order("INVALID_ORDER", "a market order needs quantity or quoteQuantity")
    _check_filters(market, price, quantity)
    return OrderRequest(
        market=market,
        side=str(side),
        order_type=str(order_type),
        price=price if limit else None,
        quantity=quantity,
        quote_quantity=None if limit else quote_quantity,
        price_text=params["price"] if limit else None,
        quantity_text=params.get("quantity"),
        quote_text=None if limit else params.get("quoteQuantity"),
        client_id=_client_id(params.get("clientId")),
        **_options(params, market, limit=limit),
    )


def _market(symbol: object, fixture: Fixture) -> Market:
    if not isinstance(symbol, str) or "_" not in symbol or symbol.upper() != symbol:
        raise bad_order("INVALID_SYMBOL", "symbol must look like SOL_USDC")
    market = fixture.market(symbol)
    if market is None:
        raise bad_order("INVALID_SYMBOL", f"Market {symbol} does not exist in the sandbox")
    return market


def _decimal(params: Mapping[str, Any], name: str, *, required: bool) -> Decimal | None:
    value = params.get(name)
    if value is None:
        if required:
            raise bad_order("INVALID_ORDER", f"{name} is required")
        return None
    code = "INVALID_PRICE" if "rice" in name else "INVALID_QUANTITY"
    if not isinstance(value, str):
        raise bad_order(code, f"{name} must be a decimal string")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise bad_order(code, f"{name} is not a decimal") from None
    if not number.is_finite() or number <= 0:
        raise bad_order(code, f"{name} must be positive")
    return number


def _check_filters(market: Market, price: Decimal | None, quantity: Decimal | None) -> None:
    """The market's filters, with the messages Backpack's own client documents."""
    if price is not None:
        if price % market.tick:
            raise bad_order("INVALID_PRICE", "Price decimal too long")
        if price < market.min_price or (market.max_price is not None and price > market.max_price):
            raise bad_order("INVALID_PRICE", "Price is out of bounds")
    if quantity is not None:
        if quantity % market.step:
            raise bad_order("INVALID_QUANTITY", "Quantity decimal too long")
        if quantity < market.min_quantity:
            raise bad_order("INVALID_QUANTITY", "Quantity is below the minimum allowed value")
        if market.max_quantity is not None and quantity > market.max_quantity:
            raise bad_order("INVALID_QUANTITY", "Quantity is above the maximum allowed value")


def _client_id(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_CLIENT_ID:
        raise bad_request("clientId must be an unsigned 32-bit integer")
    return value


def _flag(params: Mapping[str, Any], name: str) -> bool | None:
    value: object = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise bad_request(f"{name} must be true or false")


def _options(params: Mapping[str, Any], market: Market, *, limit: bool) -> dict[str, Any]:
    time_in_force = params.get("timeInForce", "GTC")
    if time_in_force not in _TIME_IN_FORCE:
        raise bad_order("INVALID_ORDER", "timeInForce must be GTC, IOC or FOK")
    stp = params.get("selfTradePrevention", "RejectTaker")
    if stp not in STP_MODES:
        raise bad_order(
            "INVALID_ORDER", f"selfTradePrevention must be one of {', '.join(STP_MODES)}"
        )
    post_only = bool(_flag(params, "postOnly"))
    if post_only and (not limit or time_in_force != "GTC"):
        raise bad_order("INVALID_ORDER", "postOnly needs a GTC limit order")
    reduce_only = _flag(params, "reduceOnly")
    if reduce_only and not market.perp:
        raise bad_order("INVALID_ORDER", "reduceOnly is for perpetual markets")
    return {
        "time_in_force": str(time_in_force),
        "post_only": post_only,
        "reduce_only": reduce_only,
        "stp": str(stp),
    }


@dataclass(slots=True)
class Order:
    """An order's life: what was asked, what happened, and the funds it still holds."""

    id: str
    owner: str
    request: OrderRequest
    created_at: int
    status: str = "New"
    executed: Decimal = ZERO
    executed_quote: Decimal = ZERO
    expiry_reason: str | None = None
    lock_asset: str = ""
    locked: Decimal = ZERO
    # What one unit of base locks (limit orders), or None: each fill's own cost (market orders).
    lock_unit: Decimal | None = None

    @property
    def is_open(self) -> bool:
        return self.status in OPEN

    @property
    def remaining(self) -> Decimal:
        quantity = self.request.quantity
        return ZERO if quantity is None else quantity - self.executed

    def view(self) -> dict[str, Any]:
        """The shape of ``POST /api/v1/order`` and ``GET /api/v1/orders``."""
        r = self.request
        body: dict[str, Any] = {
            "clientId": r.client_id,
            "createdAt": self.created_at,
            "executedQuantity": fmt(self.executed),
            "executedQuoteQuantity": fmt(self.executed_quote),
            "expiryReason": self.expiry_reason,
            "id": self.id,
            "orderType": r.order_type,
            "price": r.price_text,
            "quantity": r.quantity_text,
            "quoteQuantity": r.quote_text,
            "reduceOnly": r.reduce_only,
            "selfTradePrevention": r.stp,
            "side": r.side,
            "status": self.status,
            "symbol": r.market.symbol,
            "timeInForce": r.time_in_force,
        }
        if r.limit:
            body["postOnly"] = r.post_only
        return dict(sorted((body | _ALWAYS_NULL).items()))

    def history_view(self) -> dict[str, Any]:
        """The shape of ``GET /wapi/v1/history/orders``: an ISO ``createdAt``."""
        return self.view() | {"createdAt": iso_ms(self.created_at), "systemOrderType": None}
