"""A local double of Backpack's REST API, for tests, demos and users' own bot tests.

Public routes (time, status, ping, and market data from the shipped fixture
``markets.json``) and signed routes (account, capital, orders through a simple
matching engine, cancel-all, fills, order history, deposit address, positions)
answer in the shapes Backpack documents, so that ccxt and bpx-py parse them.
Signed requests are verified exactly as ``docs/backpack-api.md`` describes, against
a registry of public keys; nothing here holds a secret. Admin routes under
``/_sandbox/`` register, revoke and mark keys read-only, set balances, inject
faults, report request counts and reset. See ``docs/sandbox.md``.

::

    request --> SandboxHeader (every answer says "sandbox")
            --> public_routes / signed_routes (auth) / admin_routes
            --> gateway (faults in, counts out) --> SandboxState (one lock)
            --> Venue: matching (books), ledger (accounts), orders, history
            --> marketdata, candles (views from market.Fixture + the venue)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from backpack_vault.daemon.serving import make_server
from backpack_vault.testing.admin_routes import AdminRoutes
from backpack_vault.testing.answers import (
    EXPIRED_ANSWER,
    INVALID_SIGNATURE_ANSWER,
    MAINTENANCE_ANSWER,
    READ_ONLY_ANSWER,
    UNKNOWN_KEY_ANSWER,
    Answer,
)
from backpack_vault.testing.faults import Faults
from backpack_vault.testing.gateway import SANDBOX_HEADER, Gateway, SandboxHeader
from backpack_vault.testing.market import Fixture, load_fixture
from backpack_vault.testing.public_routes import PublicRoutes
from backpack_vault.testing.signed_routes import SignedRoutes
from backpack_vault.testing.state import SandboxState

__all__ = [
    "EXPIRED_ANSWER",
    "INVALID_SIGNATURE_ANSWER",
    "MAINTENANCE_ANSWER",
    "READ_ONLY_ANSWER",
    "SANDBOX_HEADER",
    "UNKNOWN_KEY_ANSWER",
    "Answer",
    "Faults",
    "Fixture",
    "SandboxAdmin",
    "SandboxState",
    "create_app",
    "load_fixture",
    "serve",
]

log = structlog.get_logger()

_HTTP_NOT_FOUND = 404


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and methods get Backpack's JSON error shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == _HTTP_NOT_FOUND:
        answer = Answer(status, "RESOURCE_NOT_FOUND", f"No route {request.url.path}")
    else:
        answer = Answer(status, "INVALID_CLIENT_REQUEST", f"{request.method} is not allowed here")
    return answer.response()


async def _server_error(_request: Request, _exc: Exception) -> Response:
    # Answered outside the middleware stack, so it says "sandbox" itself.
    response = Answer(500, "SERVER_ERROR", "The sandbox failed; see its log").response()
    response.headers[SANDBOX_HEADER] = "true"
    return response


def create_app(
    state: SandboxState | None = None, *, clock: Callable[[], float] = time.time
) -> Starlette:
    """The sandbox as an ASGI app; pass ``state`` to drive it from Python too.

    ``clock`` (epoch seconds) is the one time source: signature windows, order and
    fill timestamps, and the made-up price history all read it.
    """
    gate = Gateway(state or SandboxState(), clock)
    routes = PublicRoutes(gate).routes() + SignedRoutes(gate).routes()
    routes += AdminRoutes(gate.state).routes()
    app = Starlette(
        routes=routes,
        middleware=[Middleware(SandboxHeader)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.router.redirect_slashes = False  # /api/v1/time/ is unknown, not a redirect
    app.state.sandbox = gate.state
    return app


def serve(host: str, port: int, *, state: SandboxState | None = None) -> None:
    """Serve the sandbox until SIGINT/SIGTERM (``backpack-vault sandbox --listen``)."""
    server = make_server(create_app(state), host, port)
    log.info("sandbox.listening", url=f"http://{host}:{port}")
    server.run()


class SandboxAdmin:
    """A client for the admin routes: ``SandboxAdmin(httpx.Client(base_url=url))``."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    @property
    def url(self) -> str:
        return str(self.http.base_url).rstrip("/")

    def _send(self, method: str, path: str, body: object = None, **params: str) -> Any:
        response = self.http.request(method, path, json=body, params=params or None)
        response.raise_for_status()
        return response.json()

    def register(self, api_key: str, *, read_only: bool = False) -> None:
        self._send("POST", "/_sandbox/keys", {"api_key": api_key, "read_only": read_only})

    def revoke(self, api_key: str) -> None:
        self._send("POST", "/_sandbox/keys/revoke", {"api_key": api_key})

    def set_faults(self, **faults: object) -> dict[str, Any]:
        """Replace the fault set, e.g. ``set_faults(status=503, rate=0.5)``."""
        result: dict[str, Any] = self._send("POST", "/_sandbox/faults", faults)
        return result

    def clear_faults(self) -> None:
        self._send("DELETE", "/_sandbox/faults")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._send("GET", "/_sandbox/stats")
        return result

    def count(self, route: str, api_key: str | None = None) -> int:
        """How many requests arrived on ``route`` (e.g. ``"GET /api/v1/account"``), by one key."""
        stats = self.stats()
        if api_key is None:
            return int(stats["routes"].get(route, 0))
        return int(stats["keys"].get(api_key, {}).get(route, 0))

    def balances(self, api_key: str) -> dict[str, dict[str, str]]:
        """The key's ``/api/v1/capital`` answer, without signing."""
        result: dict[str, dict[str, str]] = self._send("GET", "/_sandbox/balances", api_key=api_key)
        return result

    def set_balances(self, api_key: str, balances: Mapping[str, str]) -> dict[str, dict[str, str]]:
        """Set available amounts, e.g. ``set_balances(key, {"USDC": "500", "SOL": "0"})``."""
        body = {"api_key": api_key, "balances": dict(balances)}
        result: dict[str, dict[str, str]] = self._send("POST", "/_sandbox/balances", body)
        return result

    def reset(self) -> None:
        """Forget every key, account, order and fault; restore the house book."""
        self._send("POST", "/_sandbox/reset")
