"""Signed routes: account, capital, orders, history, deposit address and positions.

Every route in ``instructions.json`` is served and verified; the ones the
sandbox does not simulate answer 501 ``NOT_IMPLEMENTED`` after the signature
check, so a bot can test its signing for any endpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from backpack_vault.backpack.instructions import ENDPOINTS
from backpack_vault.testing import reports
from backpack_vault.testing.answers import Answer, Refused, bad_order, bad_request, not_found
from backpack_vault.testing.auth import Call, authenticate
from backpack_vault.testing.gateway import Gateway
from backpack_vault.testing.venue import Venue

__all__ = ["SignedRoutes", "deposit_address"]

# A signed route's work: the verified call -> a JSON body; raise Refused to refuse.
Handler = Callable[[Call], Any]

_EVM: Final = frozenset({"Ethereum", "Arbitrum", "Base", "Bsc", "Optimism", "Polygon", "Avalanche"})
_BASE58: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BECH32: Final = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def deposit_address(api_key: str, blockchain: str) -> str:
    """A made-up address in the chain's usual form, the same for the same key and chain."""
    digest = hashlib.sha512(f"{api_key}:{blockchain}".encode()).digest()
    if blockchain in _EVM:
        return "0x" + digest[:20].hex()
    if blockchain == "Bitcoin":
        return "bc1q" + "".join(_BECH32[b % 32] for b in digest[:38])
    number, text = int.from_bytes(digest[:32], "big"), ""
    while number:
        number, digit = divmod(number, 58)
        text = _BASE58[digit] + text
    return text


class SignedRoutes:
    def __init__(self, gate: Gateway) -> None:
        self.gate = gate
        self.state = gate.state

    def signed(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            api_key = request.headers.get("x-api-key", "").strip()
            faults, response = await self.gate.enter(request, api_key or None)
            if response is None:
                try:
                    call = await authenticate(request, self.gate, faults, api_key)
                    response = JSONResponse(handler(call))
                except Refused as exc:
                    response = exc.answer.response()
            return self.gate.done(request, response)

        return endpoint

    # -- handlers -----------------------------------------------------------------------

    def account(self, _call: Call) -> Any:
        return dict(self.state.fixture.account)

    def capital(self, call: Call) -> Any:
        return self.state.trading(lambda v: v.account(call.api_key).capital())

    def order_execute(self, call: Call) -> Any:
        params = call.body if isinstance(call.body, dict) else call.query
        return self.state.trading(lambda v: v.place(call.api_key, params, call.now_ms))

    def orders_execute(self, call: Call) -> Any:
        return self.state.trading(lambda v: v.place_batch(call.api_key, call.body, call.now_ms))

    def order_query(self, call: Call) -> Any:
        return self._one(call, cancel=False)

    def order_cancel(self, call: Call) -> Any:
        return self._one(call, cancel=True)

    def _one(self, call: Call, *, cancel: bool) -> Any:
        params = call.params()
        symbol = params.get("symbol")
        order_id, client_id = params.get("orderId"), params.get("clientId")
        if not isinstance(symbol, str) or (order_id is None and client_id is None):
            raise bad_order("INVALID_ORDER", "symbol and orderId or clientId are required")

        def act(venue: Venue) -> Any:
            order = venue.find(
                call.api_key,
                symbol,
                None if order_id is None else str(order_id),
                None if client_id is None else str(client_id),
            )
            if order is None:
                raise not_found("Order not found")
            return venue.cancel(order) if cancel else order.view()

        return self.state.trading(act)

    def orders_query(self, call: Call) -> Any:
        symbol, market_type = call.query.get("symbol"), call.query.get("marketType")
        return self.state.trading(
            lambda v: reports.open_orders(v, call.api_key, symbol, market_type)
        )

    def orders_cancel(self, call: Call) -> Any:
        symbol = call.params().get("symbol")
        if not isinstance(symbol, str):
            raise bad_order("INVALID_ORDER", "symbol is required")
        return self.state.trading(lambda v: v.cancel_all(call.api_key, symbol))

    def fills(self, call: Call) -> Any:
        return self.state.trading(lambda v: reports.fill_history(v, call.api_key, call.query))

    def order_history(self, call: Call) -> Any:
        return self.state.trading(lambda v: reports.order_history(v, call.api_key, call.query))

    def deposit_address(self, call: Call) -> Any:
        blockchain = call.query.get("blockchain")
        chains = self.state.fixture.blockchains()
        if blockchain not in chains:
            raise bad_request(f"blockchain must be one of {', '.join(sorted(chains))}")
        return {"address": deposit_address(call.api_key, blockchain)}

    def positions(self, call: Call) -> Any:
        symbol = call.query.get("symbol")
        return self.state.trading(lambda v: v.account(call.api_key).open_positions(symbol))

    def not_implemented(self, call: Call) -> Any:
        raise Refused(
            Answer(
                501,
                "NOT_IMPLEMENTED",
                f"The sandbox verifies but does not implement {call.instruction}",
            )
        )

    def routes(self) -> list[Route]:
        table: dict[tuple[str, str], Handler] = {
            ("GET", "/api/v1/account"): self.account,
            ("GET", "/api/v1/capital"): self.capital,
            ("GET", "/api/v1/order"): self.order_query,
            ("POST", "/api/v1/order"): self.order_execute,
            ("DELETE", "/api/v1/order"): self.order_cancel,
            ("GET", "/api/v1/orders"): self.orders_query,
            ("POST", "/api/v1/orders"): self.orders_execute,
            ("DELETE", "/api/v1/orders"): self.orders_cancel,
            ("GET", "/api/v1/position"): self.positions,
            ("GET", "/wapi/v1/history/fills"): self.fills,
            ("GET", "/wapi/v1/history/orders"): self.order_history,
            ("GET", "/wapi/v1/capital/deposit/address"): self.deposit_address,
        }
        return [
            Route(
                e.path,
                self.signed(table.get((e.method, e.path), self.not_implemented)),
                methods=[e.method],
            )
            for e in ENDPOINTS
        ]
