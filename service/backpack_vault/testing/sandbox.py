"""A local double of Backpack's REST API, for tests, demos and users' own bot tests.

Public routes (``/api/v1/time``, ``/status``, ``/ping``) and signed routes
(account, capital, order execute/cancel/query, batch orders, open orders)
answer as ``backpack/SPEC.md`` describes. Signed requests are verified exactly:
the signing string is rebuilt from the raw decoded query text (GET/DELETE) and
the JSON body (POST/PATCH/DELETE) with the same code the daemon signs with, and
checked against a registry of public keys. Nothing here holds a secret.

Admin routes under ``/_sandbox/`` register, revoke and mark keys read-only,
inject faults (status, rate, latency, maintenance, clock offset) and report
request counts. See ``docs/sandbox.md``.

Where Backpack's real answer is undocumented, the sandbox picks one and says
so next to a constant below; ``docs/sandbox.md`` lists the same choices.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import anyio
import httpx
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from backpack_vault.backpack.instructions import ENDPOINTS, lookup
from backpack_vault.backpack.signing import DEFAULT_WINDOW_MS, MAX_WINDOW_MS, signing_string, verify
from backpack_vault.core.keys import parse_api_key
from backpack_vault.daemon.serving import make_server
from backpack_vault.errors import InvalidInput

__all__ = [
    "EXPIRED_ANSWER",
    "INVALID_SIGNATURE_ANSWER",
    "READ_ONLY_ANSWER",
    "SANDBOX_HEADER",
    "UNKNOWN_KEY_ANSWER",
    "Answer",
    "Faults",
    "SandboxAdmin",
    "SandboxState",
    "create_app",
    "serve",
]

log = structlog.get_logger()


# The header every sandbox answer carries (Backpack's own answers never do).
SANDBOX_HEADER: Final = "X-Backpack-Sandbox"

@dataclass(frozen=True, slots=True)
class Answer:
    """An error answer: HTTP status and Backpack's ``{"code", "message"}`` body."""

    status: int
    code: str
    message: str

    def response(self) -> JSONResponse:
        return JSONResponse({"code": self.code, "message": self.message}, status_code=self.status)


# Documented message and code (SPEC.md section 6); the status of both is
# undocumented and 400 is what Backpack answered most recently.
EXPIRED_ANSWER: Final = Answer(400, "INVALID_CLIENT_REQUEST", "Request has expired")
INVALID_SIGNATURE_ANSWER: Final = Answer(400, "INVALID_CLIENT_REQUEST", "Invalid signature")

# OUR CHOICE for an unknown, deleted or revoked API key. Backpack does not
# document this answer (SPEC.md sections 6, 8 and 11.1). The sandbox answers
# 401 UNAUTHORIZED, which is row 7 of the verdict table (a REJECTED candidate).
# Change it here, and in docs/sandbox.md, once the live answer is known.
UNKNOWN_KEY_ANSWER: Final = Answer(401, "UNAUTHORIZED", "API key is not registered or was revoked")

# OUR CHOICE for a read-only key on a state-changing instruction (SPEC.md 11.3).
READ_ONLY_ANSWER: Final = Answer(403, "FORBIDDEN", "API key is read-only")

MAINTENANCE_ANSWER: Final = Answer(503, "MAINTENANCE", "Exchange is under maintenance")

# The body sent with an injected fault status.
_FAULT_CODES: Final[dict[int, str]] = {
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "RESOURCE_NOT_FOUND",
    429: "TOO_MANY_REQUESTS",
    503: "MAINTENANCE",
    504: "TIMEOUT",
}
_HTTP_CLIENT_ERROR: Final = 400
_HTTP_SERVER_ERROR: Final = 500
_HTTP_MAX: Final = 599


def _fault_answer(status: int) -> Answer:
    default = "SERVER_ERROR" if status >= _HTTP_SERVER_ERROR else "INVALID_CLIENT_REQUEST"
    return Answer(status, _FAULT_CODES.get(status, default), f"Injected fault ({status})")


@dataclass(frozen=True, slots=True)
class Faults:
    """What the sandbox does wrong. Each POST to ``/_sandbox/faults`` replaces the whole set.

    ``status`` and ``latency_ms`` hit a fraction ``rate`` of requests to the
    public and signed routes, drawn from the state's seeded RNG.
    ``maintenance`` and ``clock_offset_ms`` hit every request.
    ``time_skew_ms`` makes ``/api/v1/time`` lie by that much relative to the
    clock that checks timestamps (a drifting node behind a load balancer).
    """

    status: int | None = None
    rate: float = 1.0
    latency_ms: int = 0
    maintenance: bool = False
    clock_offset_ms: int = 0
    time_skew_ms: int = 0

    @classmethod
    def from_json(cls, data: object) -> Faults:
        """Parse an admin request body; ValueError says which field is wrong."""
        if not isinstance(data, dict):
            raise ValueError("body must be a JSON object")  # noqa: TRY004 - one error type for callers
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        _require(not unknown, f"unknown field(s): {', '.join(unknown)}")
        status = data.get("status")
        _require(
            status is None or (_is_int(status) and _HTTP_CLIENT_ERROR <= status <= _HTTP_MAX),
            "status must be an HTTP error status, 400-599",
        )
        rate = data.get("rate", 1.0)
        _require(
            not isinstance(rate, bool) and isinstance(rate, int | float) and 0 <= rate <= 1,
            "rate must be a number from 0 to 1",
        )
        latency = data.get("latency_ms", 0)
        _require(_is_int(latency) and latency >= 0, "latency_ms must be a non-negative integer")
        maintenance = data.get("maintenance", False)
        _require(isinstance(maintenance, bool), "maintenance must be true or false")
        for name in ("clock_offset_ms", "time_skew_ms"):
            _require(_is_int(data.get(name, 0)), f"{name} must be an integer")
        return cls(
            status=status,
            rate=float(rate),
            latency_ms=latency,
            maintenance=maintenance,
            clock_offset_ms=data.get("clock_offset_ms", 0),
            time_skew_ms=data.get("time_skew_ms", 0),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(slots=True)
class _Key:
    read_only: bool
    revoked: bool = False


@dataclass(slots=True)
class _Stats:
    routes: Counter[str] = field(default_factory=Counter)
    keys: dict[str, Counter[str]] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)
    faulted: int = 0
    total: int = 0


class SandboxState:
    """Keys, faults, open orders and request counts; every method is thread-safe."""

    def __init__(self, *, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._rng = random.Random(seed)  # noqa: S311 - fault injection, not cryptography
        self._keys: dict[str, _Key] = {}
        self._faults = Faults()
        self._orders: dict[str, dict[str, dict[str, Any]]] = {}
        self._next_order_id = 111_000_000
        self._stats = _Stats()

    # -- keys ---------------------------------------------------------------------------

    def register(self, api_key: str, *, read_only: bool = False) -> bool:
        """Accept a public key (again); True when it was not known before."""
        api_key = parse_api_key(api_key)
        with self._lock:
            created = api_key not in self._keys
            self._keys[api_key] = _Key(read_only=read_only)
        return created

    def revoke(self, api_key: str) -> bool:
        """Refuse a key from now on; False when it was never registered."""
        with self._lock:
            entry = self._keys.get(api_key.strip())
            if entry is None:
                return False
            entry.revoked = True
        return True

    def key(self, api_key: str) -> tuple[bool, bool] | None:
        """``(read_only, revoked)`` of a registered key, or None."""
        with self._lock:
            entry = self._keys.get(api_key)
            return None if entry is None else (entry.read_only, entry.revoked)

    def keys(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"api_key": k, "read_only": v.read_only, "revoked": v.revoked}
                for k, v in sorted(self._keys.items())
            ]

    # -- faults -------------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    def set_faults(self, faults: Faults) -> None:
        with self._lock:
            self._faults = faults

    def clear_faults(self) -> None:
        self.set_faults(Faults())

    def arrive(self, route: str, api_key: str | None) -> tuple[Faults, bool]:
        """Count a request; return the faults in force and whether this one is hit."""
        with self._lock:
            faults = self._faults
            self._stats.total += 1
            self._stats.routes[route] += 1
            if api_key:
                self._stats.keys.setdefault(api_key, Counter())[route] += 1
            hit = bool(faults.status or faults.latency_ms) and (
                faults.rate >= 1 or self._rng.random() < faults.rate
            )
            if hit:
                self._stats.faulted += 1
        return faults, hit

    def answered(self, route: str, status: int) -> None:
        with self._lock:
            self._stats.answers[f"{route} {status}"] += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self._stats
            return {
                "total": s.total,
                "faulted": s.faulted,
                "routes": dict(s.routes),
                "keys": {k: dict(v) for k, v in s.keys.items()},
                "answers": dict(s.answers),
            }

    def reset(self) -> None:
        """Forget keys, faults, orders and counts; reseed the RNG."""
        with self._lock:
            self._rng = random.Random(self._seed)  # noqa: S311 - see __init__
            self._keys.clear()
            self._faults = Faults()
            self._orders.clear()
            self._stats = _Stats()

    # -- orders -------------------------------------------------------------------------

    def place(self, api_key: str, order: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._next_order_id += 1
            placed = order | {"id": str(self._next_order_id)}
            if placed["status"] == "New":
                self._orders.setdefault(api_key, {})[placed["id"]] = placed
        return placed

    def find(
        self,
        api_key: str,
        symbol: str,
        order_id: str | None,
        client_id: str | None,
        *,
        remove: bool = False,
    ) -> dict[str, Any] | None:
        with self._lock:
            book = self._orders.get(api_key, {})
            for oid, order in list(book.items()):
                if order["symbol"] != symbol:
                    continue
                if (order_id is not None and oid == order_id) or (
                    client_id is not None and str(order.get("clientId")) == client_id
                ):
                    if remove:
                        del book[oid]
                    return order
        return None

    def open_orders(self, api_key: str, symbol: str | None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                o
                for o in self._orders.get(api_key, {}).values()
                if symbol is None or o["symbol"] == symbol
            ]


# -- canned data ----------------------------------------------------------------------------

_ACCOUNT: Final[dict[str, Any]] = {
    "autoBorrowSettlements": True,
    "autoLend": True,
    "autoRealizePnl": True,
    "autoRepayBorrows": True,
    "borrowLimit": "0",
    "futuresMakerFee": "2",
    "futuresTakerFee": "5",
    "leverageLimit": "10",
    "limitOrders": 0,
    "liquidating": False,
    "positionLimit": "0",
    "spotMakerFee": "8",
    "spotTakerFee": "10",
    "triggerOrders": 0,
}
_CAPITAL: Final[dict[str, dict[str, str]]] = {
    "USDC": {"available": "10000", "locked": "0", "staked": "0"},
    "SOL": {"available": "25", "locked": "0", "staked": "0"},
    "BTC": {"available": "0.5", "locked": "0", "staked": "0"},
}


class _Refused(Exception):
    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.message)
        self.answer = answer


def _bad_order(code: str, message: str) -> _Refused:
    return _Refused(Answer(400, code, message))


def _bad_request(message: str) -> _Refused:
    return _Refused(Answer(400, "INVALID_CLIENT_REQUEST", message))


def _decimal(params: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = params.get(name)
    if value is None:
        if required:
            raise _bad_order("INVALID_ORDER", f"{name} is required")
        return None
    code = "INVALID_PRICE" if "rice" in name else "INVALID_QUANTITY"
    if not isinstance(value, str):
        raise _bad_order(code, f"{name} must be a decimal string")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise _bad_order(code, f"{name} is not a decimal") from None
    if not number.is_finite() or number <= 0:
        raise _bad_order(code, f"{name} must be positive")
    return value


def _new_order(params: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    symbol = params.get("symbol")
    if not isinstance(symbol, str) or "_" not in symbol or symbol.upper() != symbol:
        raise _bad_order("INVALID_SYMBOL", "symbol must look like SOL_USDC")
    side = params.get("side")
    if side not in ("Bid", "Ask"):
        raise _bad_order("INVALID_ORDER", "side must be Bid or Ask")
    order_type = params.get("orderType")
    if order_type not in ("Limit", "Market"):
        raise _bad_order("INVALID_ORDER", "orderType must be Limit or Market")
    limit = order_type == "Limit"
    quantity = _decimal(params, "quantity", required=limit)
    quote_quantity = _decimal(params, "quoteQuantity", required=False)
    price = _decimal(params, "price", required=limit)
    if not limit and (quantity is None) == (quote_quantity is None):
        raise _bad_order("INVALID_ORDER", "a market order needs quantity or quoteQuantity")
    return {
        "clientId": params.get("clientId"),
        "createdAt": now_ms,
        "executedQuantity": "0" if limit else (quantity or "0"),
        "executedQuoteQuantity": "0" if limit else (quote_quantity or "0"),
        "orderType": order_type,
        "postOnly": bool(params.get("postOnly", False)),
        "price": price,
        "quantity": quantity,
        "quoteQuantity": quote_quantity,
        "reduceOnly": params.get("reduceOnly"),
        "selfTradePrevention": params.get("selfTradePrevention", "RejectTaker"),
        "side": side,
        "status": "New" if limit else "Filled",
        "symbol": symbol,
        "timeInForce": params.get("timeInForce", "GTC"),
        "triggerPrice": params.get("triggerPrice"),
    }


# -- the application ----------------------------------------------------------------------

Handler = Callable[["_Call"], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class _Call:
    """A verified signed request."""

    api_key: str
    instruction: str
    query: dict[str, str]
    body: Any
    now_ms: int


class _Exchange:
    def __init__(self, state: SandboxState, clock: Callable[[], float]) -> None:
        self.state = state
        self.clock = clock

    def server_ms(self, faults: Faults) -> int:
        return int(self.clock() * 1000) + faults.clock_offset_ms

    async def _enter(self, request: Request, api_key: str | None) -> tuple[Faults, Response | None]:
        route = f"{request.method} {request.url.path}"
        faults, hit = self.state.arrive(route, api_key)
        if hit and faults.latency_ms:
            await anyio.sleep(faults.latency_ms / 1000)
        if hit and faults.status:
            return faults, _fault_answer(faults.status).response()
        return faults, None

    def _done(self, request: Request, response: Response) -> Response:
        self.state.answered(f"{request.method} {request.url.path}", response.status_code)
        # Every answer says it comes from a sandbox, so that a verdict reached here is never
        # written for a key that belongs to the real exchange.
        response.headers[SANDBOX_HEADER] = "true"
        return response

    # -- public -------------------------------------------------------------------------

    async def time(self, request: Request) -> Response:
        faults, fault = await self._enter(request, None)
        response = fault or PlainTextResponse(str(self.server_ms(faults) + faults.time_skew_ms))
        return self._done(request, response)

    async def status(self, request: Request) -> Response:
        faults, fault = await self._enter(request, None)
        if fault is None:
            body = (
                {"status": "Maintenance", "message": MAINTENANCE_ANSWER.message}
                if faults.maintenance
                else {"status": "Ok", "message": None}
            )
            fault = JSONResponse(body)
        return self._done(request, fault)

    async def ping(self, request: Request) -> Response:
        _, fault = await self._enter(request, None)
        return self._done(request, fault or PlainTextResponse("pong"))

    # -- signed -------------------------------------------------------------------------

    def signed(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            api_key = request.headers.get("x-api-key", "").strip()
            faults, fault = await self._enter(request, api_key or None)
            response = fault or await self._verify(request, faults, api_key, handler)
            return self._done(request, response)

        return endpoint

    async def _verify(
        self, request: Request, faults: Faults, api_key: str, handler: Handler
    ) -> Response:
        try:
            return await handler(await self._authenticate(request, faults, api_key))
        except _Refused as exc:
            return exc.answer.response()

    async def _authenticate(self, request: Request, faults: Faults, api_key: str) -> _Call:
        """Check headers, clock, key and signature in that order; raise _Refused."""
        if faults.maintenance:
            raise _Refused(MAINTENANCE_ANSWER)
        # Starlette answers HEAD on every GET route; it is signed like the GET.
        method = "GET" if request.method == "HEAD" else request.method
        endpoint = lookup(method, request.url.path)
        headers = request.headers
        if not api_key or "x-signature" not in headers or "x-timestamp" not in headers:
            raise _bad_request("Missing X-API-Key, X-Signature or X-Timestamp header")
        timestamp = _header_int(headers.get("x-timestamp"), "X-Timestamp")
        window = _header_int(headers.get("x-window", str(DEFAULT_WINDOW_MS)), "X-Window")
        now_ms = self.server_ms(faults)
        # A window over the maximum, or a timestamp a whole window in the future, get the
        # expired answer too: both are undocumented (SPEC.md section 5), this is our choice.
        if window > MAX_WINDOW_MS or now_ms > timestamp + window or timestamp > now_ms + window:
            raise _Refused(EXPIRED_ANSWER)
        entry = self.state.key(api_key)
        if entry is None or entry[1]:
            raise _Refused(UNKNOWN_KEY_ANSWER)
        query, body = await _params(request, batch=endpoint.batch)
        try:
            message = _message(endpoint.instruction, query, body, timestamp, window)
        except InvalidInput as exc:
            raise _bad_request(f"Parameters cannot be signed: {exc.message}") from None
        if not verify(api_key, message, headers["x-signature"].strip()):
            raise _Refused(INVALID_SIGNATURE_ANSWER)
        if endpoint.state_changing and entry[0]:
            raise _Refused(READ_ONLY_ANSWER)
        return _Call(api_key, endpoint.instruction, query, body, now_ms)

    # -- signed handlers ------------------------------------------------------------------

    async def account(self, _call: _Call) -> Response:
        return JSONResponse(_ACCOUNT)

    async def capital(self, _call: _Call) -> Response:
        return JSONResponse(_CAPITAL)

    async def order_execute(self, call: _Call) -> Response:
        params = call.body if isinstance(call.body, dict) else call.query
        return JSONResponse(self.state.place(call.api_key, _new_order(params, call.now_ms)))

    async def orders_execute(self, call: _Call) -> Response:
        orders = [_new_order(p, call.now_ms) for p in call.body]
        return JSONResponse([self.state.place(call.api_key, o) for o in orders])

    async def order_query(self, call: _Call) -> Response:
        return self._one(call, remove=False)

    async def order_cancel(self, call: _Call) -> Response:
        return self._one(call, remove=True)

    def _one(self, call: _Call, *, remove: bool) -> Response:
        params: dict[str, Any] = dict(call.query)
        if isinstance(call.body, dict):
            params |= call.body
        symbol = params.get("symbol")
        order_id, client_id = params.get("orderId"), params.get("clientId")
        if not isinstance(symbol, str) or (order_id is None and client_id is None):
            raise _bad_order("INVALID_ORDER", "symbol and orderId or clientId are required")
        found = self.state.find(
            call.api_key,
            symbol,
            None if order_id is None else str(order_id),
            None if client_id is None else str(client_id),
            remove=remove,
        )
        if found is None:
            return Answer(404, "RESOURCE_NOT_FOUND", "Order not found").response()
        return JSONResponse(found | {"status": "Cancelled"} if remove else found)

    async def orders_query(self, call: _Call) -> Response:
        return JSONResponse(self.state.open_orders(call.api_key, call.query.get("symbol")))

    async def not_implemented(self, call: _Call) -> Response:
        # Every other signed route is verified like the rest, so a bot can test its
        # signing for any endpoint; only the business logic is missing.
        return Answer(
            501,
            "NOT_IMPLEMENTED",
            f"The sandbox verifies but does not implement {call.instruction}",
        ).response()

    # -- admin --------------------------------------------------------------------------

    async def admin_keys(self, request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(self.state.keys())
        data, problem = await _admin_body(request)
        if problem is not None:
            return problem
        api_key, read_only = data.get("api_key"), data.get("read_only", False)
        if not isinstance(api_key, str) or not isinstance(read_only, bool):
            return _admin_error(400, "api_key (string) and read_only (boolean) are expected")
        try:
            created = self.state.register(api_key, read_only=read_only)
        except InvalidInput as exc:
            return _admin_error(400, exc.message)
        log.info("sandbox.key_registered", api_key=api_key.strip(), read_only=read_only)
        return JSONResponse(
            {"api_key": api_key.strip(), "read_only": read_only, "revoked": False},
            status_code=201 if created else 200,
        )

    async def admin_revoke(self, request: Request) -> Response:
        data, problem = await _admin_body(request)
        if problem is not None:
            return problem
        api_key = data.get("api_key")
        if not isinstance(api_key, str):
            return _admin_error(400, "api_key (string) is expected")
        if not self.state.revoke(api_key):
            return _admin_error(404, "no such key is registered")
        log.info("sandbox.key_revoked", api_key=api_key.strip())
        return JSONResponse({"api_key": api_key.strip(), "revoked": True})

    async def admin_faults(self, request: Request) -> Response:
        if request.method == "POST":
            data, problem = await _admin_body(request)
            if problem is not None:
                return problem
            try:
                self.state.set_faults(Faults.from_json(data))
            except ValueError as exc:
                return _admin_error(400, str(exc))
            log.info("sandbox.faults_set", **self.state.faults.as_dict())
        elif request.method == "DELETE":
            self.state.clear_faults()
            log.info("sandbox.faults_cleared")
        return JSONResponse(self.state.faults.as_dict())

    async def admin_stats(self, _request: Request) -> Response:
        return JSONResponse(self.state.stats())


_MAX_ADMIN_BODY: Final = 64 * 1024


def _admin_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _admin_body(request: Request) -> tuple[dict[str, Any], Response | None]:
    raw = await request.body()
    if len(raw) > _MAX_ADMIN_BODY:
        return {}, _admin_error(413, f"body is larger than {_MAX_ADMIN_BODY} bytes")
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        return {}, _admin_error(400, "body is not JSON")
    if not isinstance(data, dict):
        return {}, _admin_error(400, "body must be a JSON object")
    return data, None


def _header_int(text: str | None, name: str) -> int:
    try:
        value = int(text or "")
    except ValueError:
        raise _bad_request(f"Invalid {name} header") from None
    if value < 1:
        raise _bad_request(f"Invalid {name} header")
    return value


async def _params(request: Request, *, batch: bool) -> tuple[dict[str, str], Any]:
    """Query pairs (raw decoded text) and the JSON body; raise _Refused when malformed."""
    pairs = request.query_params.multi_items()
    query = dict(pairs)
    if len(query) != len(pairs):
        raise _bad_request("Duplicate query parameter")
    body: Any = None
    raw = await request.body() if request.method not in ("GET", "HEAD") else b""
    if raw.strip():
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise _bad_request("Body is not valid JSON") from None
    if batch and not (isinstance(body, list) and body and all(isinstance(o, dict) for o in body)):
        raise _bad_request("Body must be an array of orders")
    if not batch and body is not None and not isinstance(body, dict):
        raise _bad_request("Body must be a JSON object")
    return query, body


def _message(
    instruction: str, query: Mapping[str, str], body: Any, timestamp: int, window: int
) -> str:
    """The signing string: sorted query pairs, then the body's pairs (SPEC.md section 4)."""
    if not body:
        return signing_string(instruction, query, timestamp, window)
    if not query:
        return signing_string(instruction, body, timestamp, window)
    tail = f"&timestamp={timestamp}&window={window}"
    head = signing_string(instruction, query, timestamp, window).removesuffix(tail)
    rest = signing_string(instruction, body, timestamp, window).removesuffix(tail)
    return head + rest.removeprefix(f"instruction={instruction}") + tail


def create_app(
    state: SandboxState | None = None, *, clock: Callable[[], float] = time.time
) -> Starlette:
    """The sandbox as an ASGI app; pass ``state`` to drive it from Python too."""
    ex = _Exchange(state or SandboxState(), clock)
    routes = [
        Route("/api/v1/time", ex.time, methods=["GET"]),
        Route("/api/v1/status", ex.status, methods=["GET"]),
        Route("/api/v1/ping", ex.ping, methods=["GET"]),
        Route("/api/v1/account", ex.signed(ex.account), methods=["GET"]),
        Route("/api/v1/capital", ex.signed(ex.capital), methods=["GET"]),
        Route("/api/v1/order", ex.signed(ex.order_query), methods=["GET"]),
        Route("/api/v1/order", ex.signed(ex.order_execute), methods=["POST"]),
        Route("/api/v1/order", ex.signed(ex.order_cancel), methods=["DELETE"]),
        Route("/api/v1/orders", ex.signed(ex.orders_query), methods=["GET"]),
        Route("/api/v1/orders", ex.signed(ex.orders_execute), methods=["POST"]),
    ]
    served = {(m, r.path) for r in routes if isinstance(r, Route) for m in r.methods or ()}
    routes += [
        Route(e.path, ex.signed(ex.not_implemented), methods=[e.method])
        for e in ENDPOINTS
        if (e.method, e.path) not in served
    ]
    routes += [
        Route("/_sandbox/keys", ex.admin_keys, methods=["GET", "POST"]),
        Route("/_sandbox/keys/revoke", ex.admin_revoke, methods=["POST"]),
        Route("/_sandbox/faults", ex.admin_faults, methods=["GET", "POST", "DELETE"]),
        Route("/_sandbox/stats", ex.admin_stats, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.sandbox = ex.state
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

    def _send(self, method: str, path: str, body: object = None) -> Any:
        response = self.http.request(method, path, json=body)
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
