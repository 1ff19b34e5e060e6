"""Public routes, no signature: time, status, ping and market data."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from backpack_vault.testing import candles, marketdata
from backpack_vault.testing.answers import MAINTENANCE_ANSWER, Refused
from backpack_vault.testing.gateway import Gateway
from backpack_vault.testing.market import Market

__all__ = ["PublicRoutes"]

# A market data view: the raw query and the server's time in ms -> a JSON body.
View = Callable[[Mapping[str, str], int], Any]


class PublicRoutes:
    def __init__(self, gate: Gateway) -> None:
        self.gate = gate

    async def time(self, request: Request) -> Response:
        faults, fault = await self.gate.enter(request, None)
        now = str(self.gate.server_ms(faults) + faults.time_skew_ms)
        return self.gate.done(request, fault or PlainTextResponse(now))

    async def status(self, request: Request) -> Response:
        faults, fault = await self.gate.enter(request, None)
        if fault is None:
            body = (
                {"status": "Maintenance", "message": MAINTENANCE_ANSWER.message}
                if faults.maintenance
                else {"status": "Ok", "message": None}
            )
            fault = JSONResponse(body)
        return self.gate.done(request, fault)

    async def ping(self, request: Request) -> Response:
        _, fault = await self.gate.enter(request, None)
        return self.gate.done(request, fault or PlainTextResponse("pong"))

    def data(self, view: View) -> Callable[[Request], Awaitable[Response]]:
        """A market data route: faults first, then ``view``'s body or its refusal."""

        async def endpoint(request: Request) -> Response:
            faults, response = await self.gate.enter(request, None)
            if response is None:
                try:
                    body = view(dict(request.query_params), self.gate.server_ms(faults))
                    response = JSONResponse(body)
                except Refused as exc:
                    response = exc.answer.response()
            return self.gate.done(request, response)

        return endpoint

    # -- market data views: (query, now_ms) -> body ------------------------------------

    def _market(self, query: Mapping[str, str]) -> Market:
        return marketdata.require_market(self.gate.state.fixture, query)

    def assets(self, _query: Mapping[str, str], _now: int) -> Any:
        return marketdata.assets(self.gate.state.fixture)

    def markets(self, _query: Mapping[str, str], _now: int) -> Any:
        return marketdata.markets(self.gate.state.fixture)

    def market(self, query: Mapping[str, str], _now: int) -> Any:
        return marketdata.market(self.gate.state.fixture, query)

    def ticker(self, query: Mapping[str, str], now: int) -> Any:
        chosen = self._market(query)
        return self.gate.state.trading(lambda v: marketdata.ticker(v, chosen, now))

    def tickers(self, _query: Mapping[str, str], now: int) -> Any:
        return self.gate.state.trading(lambda v: marketdata.tickers(v, now))

    def depth(self, query: Mapping[str, str], now: int) -> Any:
        chosen = self._market(query)
        return self.gate.state.trading(lambda v: marketdata.depth(v, chosen, query, now))

    def klines(self, query: Mapping[str, str], now: int) -> Any:
        return candles.klines(self._market(query), query, now, self.gate.state.seed)

    def trades(self, query: Mapping[str, str], _now: int) -> Any:
        chosen = self._market(query)
        return self.gate.state.trading(lambda v: marketdata.trades(v, chosen, query))

    def mark_prices(self, query: Mapping[str, str], now: int) -> Any:
        return self.gate.state.trading(lambda v: marketdata.mark_prices(v, query, now))

    def funding_rates(self, query: Mapping[str, str], now: int) -> Any:
        chosen = self._market(query)
        if not chosen.perp:
            return []
        return candles.funding_rates(chosen, query, now, self.gate.state.seed)

    def open_interest(self, query: Mapping[str, str], now: int) -> Any:
        return self.gate.state.trading(lambda v: marketdata.open_interest(v, query, now))

    def views(self) -> dict[str, View]:
        return {
            "/api/v1/assets": self.assets,
            "/api/v1/markets": self.markets,
            "/api/v1/market": self.market,
            "/api/v1/ticker": self.ticker,
            "/api/v1/tickers": self.tickers,
            "/api/v1/depth": self.depth,
            "/api/v1/klines": self.klines,
            "/api/v1/trades": self.trades,
            "/api/v1/trades/history": self.trades,
            "/api/v1/markPrices": self.mark_prices,
            "/api/v1/fundingRates": self.funding_rates,
            "/api/v1/openInterest": self.open_interest,
        }

    def routes(self) -> list[Route]:
        return [
            Route("/api/v1/time", self.time, methods=["GET"]),
            Route("/api/v1/status", self.status, methods=["GET"]),
            Route("/api/v1/ping", self.ping, methods=["GET"]),
        ] + [Route(path, self.data(view), methods=["GET"]) for path, view in self.views().items()]
