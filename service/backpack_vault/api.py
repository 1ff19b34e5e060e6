"""HTTP for workers: request -> broker -> response; errors -> status codes, in one place.

Routes (README.md "Worker API")::

    POST /v1/keys/{sub}/{name}/copy     wrapped copy            grant: copy (read)
    POST /v1/keys/{sub}/{name}/sign     four signed headers     grant: sign/<instruction> (update)
    GET  /v1/keys/{sub}/{name}          status and metadata     grant: copy or any sign
    POST /v1/keys/{sub}/{name}/report   "Backpack rejected it"  grant: copy or any sign; 429
    GET  /v1/keys/{sub}/{name}/watch    server-sent events      grant: copy or any sign
    GET  /healthz  /readyz  /metrics

Every answer is inside the contract: a missing token is a 401 before any other work;
a body over 256 KiB is a 413 and one nested deeper than 32 levels a 422, before it
is parsed; an unknown path (a trailing slash included) is a JSON 404; a client that
goes away mid-request is logged as such, never as an error; a failure of ours is a
500 whose body says nothing more.

The broker is synchronous (hvac). A copy or signature it can answer from memory
(``Broker.answers_from_memory``: cached grant and key, a spare copy) is answered
on the event loop; every other call into it runs in the thread pool. A success
from memory does not even reach these routes: the daemon's HTTP protocol asks
``answer_at_once`` first (``daemon/quick.py``, docs/architecture.md). Tokens
arrive in ``X-Vault-Token`` or ``Authorization: Bearer`` and stay ``Secret``
objects; no response body but a copy's own ``wrap_token`` carries anything secret.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, Final, NamedTuple, Protocol

import orjson
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from backpack_vault.backpack.instructions import is_known
from backpack_vault.broker import COPY, Broker, KeyInfo, Signature
from backpack_vault.config import Secret
from backpack_vault.core.caches import RateLimiter
from backpack_vault.core.keys import KeyRef
from backpack_vault.errors import (
    BodyTooLarge,
    InvalidInput,
    KeyNotUsable,
    MethodNotAllowed,
    NotAuthenticated,
    NotFound,
    RateLimited,
    ReadOnlyKey,
    ReportsLimited,
    ServiceError,
    UpstreamError,
    VaultUnavailable,
)
from backpack_vault.logging import get_logger
from backpack_vault.metrics import NO_KEY, Metrics
from backpack_vault.ui import Activity, ui_routes

__all__ = [
    "QuickAnswer",
    "QuickLane",
    "Readiness",
    "ReportCallback",
    "WatchSource",
    "create_app",
    "error_response",
    "quick_lane",
]

log = get_logger("backpack_vault.api")


class JSONResponse(StarletteJSONResponse):
    """Starlette's JSON response, rendered with orjson (the hot path answers JSON)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


Readiness = Callable[[], "bool | tuple[bool, str] | tuple[bool, Mapping[str, object]]"]
ReportCallback = Callable[[KeyRef, str], None]


class WatchSource(Protocol):
    """Server-sent events of one key's status changes (the daemon's watchers hub)."""

    def stream(self, ref: KeyRef, last_event_id: str | None) -> AsyncIterator[bytes]: ...


class QuickAnswer(NamedTuple):
    """A 200's JSON body, and what to do once it is written (see ``answer_at_once``)."""

    body: bytes
    then: Callable[[], None]


QuickLane = Callable[[str, str, str, Mapping[str, str], bytes], "QuickAnswer | None"]


MAX_BODY_BYTES: Final = 256 * 1024
MAX_BODY_DEPTH: Final = 32
MAX_REASON_CHARS: Final = 200
_REFILL_JOIN_S: Final = 5.0  # at shutdown, a wrap in flight finishes (Vault's timeout bounds it)
_UNPRINTABLE: Final = re.compile(r"[^\x20-\x7e]")
_LONG_DIGITS: Final = re.compile(rb"\d{19}")  # as long as 2**63: orjson would make it a float
# Outcomes after which the broker has seen the key in Vault: only these name the key in a
# metric label, so requests for made-up names cannot grow the series.
_KEY_SEEN: Final = frozenset({"ok", KeyNotUsable.code, ReadOnlyKey.code})
_HANDOUTS: Final = frozenset({"copy", "sign"})  # the hot path: answered before bookkeeping
_RECORDED: Final = frozenset({"copy", "sign", "info", "report", "watch"})  # and logged


def error_response(exc: ServiceError) -> JSONResponse:
    """The one translation of our errors into HTTP: ``{"error": {"code", "message"}}``."""
    error: dict[str, str] = {"code": exc.code, "message": exc.message}
    headers: dict[str, str] = {}
    if isinstance(exc, KeyNotUsable):
        error["status"] = exc.status
    if isinstance(exc, VaultUnavailable):
        error["message"] = (
            "Vault is unavailable, so keys cannot be checked or handed out right now; retry "
            f"shortly ({exc.message})"
        )
        headers["Retry-After"] = "1"
    if isinstance(exc, RateLimited) and exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return JSONResponse({"error": error}, status_code=exc.http_status, headers=headers)


def _after_sending(response: Response, record: Callable[[], None]) -> None:
    """Run ``record`` once ``response`` is sent, before any background work of its own.

    A copy or a signature is on the wire before its metrics, activity tally and log
    line are done. Nothing is awaited in between, so the event loop serves no other
    request (a /metrics scrape, say) before they are.
    """
    then = response.background

    async def bookkeeping() -> None:  # async: run on the event loop, not in a thread
        record()
        if then is not None:
            await then()

    response.background = BackgroundTask(bookkeeping)


def _internal_error() -> JSONResponse:
    return error_response(ServiceError("internal error in backpack-vault; see the daemon's logs"))


def _token(headers: Mapping[str, str]) -> Secret | None:
    """The worker's token from a request's headers (names in lower case)."""
    value = headers.get("x-vault-token", "").strip()
    if value:
        return Secret(value)
    scheme, _, rest = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return Secret(rest.strip())
    return None


def _ref(request: Request) -> KeyRef:
    return KeyRef(str(request.path_params["sub"]), str(request.path_params["name"]))


_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


def _nesting(body: bytes, limit: int) -> bool:
    """Whether JSON text nests arrays/objects deeper than ``limit`` (strings skipped)."""
    # It cannot nest deeper than it has brackets: a sign request has one to three, and
    # counting them is C speed, where the scan below is a Python loop over every byte.
    return body.count(b"[") + body.count(b"{") > limit and _scan_nesting(body, limit)


def _scan_nesting(body: bytes, limit: int) -> bool:
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPEN:
            depth += 1
            if depth > limit:
                return True
        elif byte in _CLOSE:
            depth -= 1
    return False


def _require_token(token: Secret | None) -> Secret:
    if token is None:
        raise NotAuthenticated(
            "no Vault token: send your own Vault token in X-Vault-Token (or Authorization: Bearer)"
        )
    return token


def _too_large() -> BodyTooLarge:
    return BodyTooLarge(f"request body is larger than {MAX_BODY_BYTES // 1024} KiB")


async def _json_object(request: Request) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # bounded even without a Content-Length
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return _parse_object(chunks[0] if len(chunks) == 1 else b"".join(chunks))


def _parse_object(body: bytes) -> dict[str, Any]:
    """A request body (at most ``MAX_BODY_BYTES``) as a JSON object; empty is ``{}``."""
    if not body.strip():
        return {}
    if _nesting(body, MAX_BODY_DEPTH):
        raise InvalidInput(f"request body nests deeper than {MAX_BODY_DEPTH} levels")
    try:
        # orjson reads an integer beyond 64 bits as a float: such a body goes to json,
        # which keeps it an integer (and a field's own check then speaks of it).
        data = json.loads(body) if _LONG_DIGITS.search(body) else orjson.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # orjson's error is a ValueError
        raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return data


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer of milliseconds")
    return value


def _sign_request(body: dict[str, Any]) -> tuple[str, Any, int | None, int | None]:
    unknown = sorted(set(body) - {"instruction", "params", "timestamp", "window"})
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(unknown)[:200]} in the sign request")
    instruction = body.get("instruction")
    if not isinstance(instruction, str) or not instruction:
        raise InvalidInput(
            '"instruction" is required: a Backpack instruction name, e.g. orderExecute'
        )
    params = body.get("params")
    if params is not None and not isinstance(params, (dict, list)):
        raise InvalidInput('"params" must be an object, or a list of objects for batch orders')
    if isinstance(params, list) and not all(isinstance(p, dict) for p in params):
        raise InvalidInput('"params" must be an object, or a list of objects for batch orders')
    return instruction, params, _optional_int(body, "timestamp"), _optional_int(body, "window")


def _no_report(ref: KeyRef, reason: str) -> None:
    log.info("check.report_received", key=str(ref), reason=reason)


class _Refills:
    """Spare copies wrapped ahead, in one thread of their own, one key at a time.

    After each copy the event loop only hands the key over (a set and a queue: no
    await, no thread-pool round trip, which cost about as much CPU as the wrap
    itself). A key already waiting is not queued twice: one refill tops it up.
    """

    def __init__(self, refill: Callable[[KeyRef], None]) -> None:
        self._refill = refill
        self._queue: queue.SimpleQueue[KeyRef | None] = queue.SimpleQueue()
        self._waiting: set[KeyRef] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def want(self, ref: KeyRef) -> None:
        with self._lock:
            if self._closed or ref in self._waiting:
                return
            self._waiting.add(ref)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="backpack-vault-refills", daemon=True
                )
                self._thread.start()
        self._queue.put(ref)

    def _run(self) -> None:
        while (ref := self._queue.get()) is not None:
            with self._lock:
                self._waiting.discard(ref)
            try:
                self._refill(ref)
            except ServiceError as exc:  # the next copy wraps inline instead; nothing is lost
                log.debug("api.refill_failed", key=str(ref), error=exc.code)
            except Exception:  # never the thread's end: the next copy asks again
                log.exception("api.refill_crashed", key=str(ref))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(_REFILL_JOIN_S)


class _Api:
    def __init__(
        self,
        broker: Broker,
        metrics: Metrics,
        readiness: Readiness,
        report: ReportCallback,
        *,
        report_interval_s: float,
        clock: Callable[[], float],
        watch: WatchSource | None = None,
        activity: Activity | None = None,
    ) -> None:
        self.broker = broker
        self.watch = watch
        self.activity = activity
        self.metrics = metrics
        self.readiness = readiness
        self.report = report
        self.report_interval_s = report_interval_s
        self.clock = clock
        # Used on the event loop only, so it needs no lock.
        self.reports: RateLimiter[KeyRef] = RateLimiter(1, per=report_interval_s)
        self.refills = _Refills(broker.refill)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(self.refills.close)  # a wrap in flight ends off the loop

    # -- the shared request path ----------------------------------------------------------

    async def _answer(
        self,
        route: str,
        request: Request,
        work: Callable[[Secret | None, dict[str, Any]], Awaitable[Response]],
    ) -> Response:
        """Run ``work``; translate errors; record one metric sample and one log event.

        ``work`` notes what it learns (instruction, version) in ``facts`` for the log event.
        """
        started = time.perf_counter()
        token = _token(request.headers)
        facts: dict[str, Any] = {}
        try:
            # Before the body is read or anything else is done.
            response = await work(_require_token(token), facts)
            outcome = "ok"
        except ClientDisconnect:
            log.info("api.client_disconnected", route=route)
            response, outcome = Response(status_code=HTTPStatus.BAD_REQUEST), "disconnected"
        except ServiceError as exc:
            response, outcome = error_response(exc), exc.code
            if isinstance(exc, UpstreamError):
                log.warning("api.upstream_failed", route=route, error=exc.code, detail=exc.message)
        except Exception:  # the worker gets a 500 without details; the log has the rest
            log.exception("api.internal_error", route=route)
            response, outcome = _internal_error(), "internal"
        seconds = time.perf_counter() - started

        def record() -> None:
            self.metrics.observe_request(route, response.status_code, seconds)
            if route in _RECORDED:
                key = f"{request.path_params.get('sub', '')}/{request.path_params.get('name', '')}"
                self._record(route, key, token, outcome, facts, seconds)

        if route in _HANDOUTS:
            _after_sending(response, record)
        else:
            record()
        return response

    def _record(
        self,
        route: str,
        key: str,
        token: Secret | None,
        outcome: str,
        facts: dict[str, Any],
        seconds: float,
    ) -> None:
        label = key if outcome in _KEY_SEEN else NO_KEY
        instruction = str(facts.get("instruction") or "")
        if route == "copy":
            self.metrics.observe_copy(label, outcome)
        elif route == "sign":
            shown = instruction if is_known(instruction) else "unknown"
            self.metrics.observe_signature(label, shown, outcome)
        elif route == "report":
            self.metrics.observe_report(label, outcome)
        identity = self.broker.identity(token)
        if self.activity is not None and route in _HANDOUTS:
            self.activity.record(
                identity,
                "copy" if route == "copy" else "sign",
                label,
                ok=outcome == "ok",
                now=time.time(),
            )
        logger = log.bind()  # what log.info would do; then nothing more when info is off
        if not logger.is_enabled_for(logging.INFO):
            return
        logger.info(
            "api.handout" if route in _HANDOUTS else f"api.{route}",
            action=route,
            key=key[:130],
            identity=identity,
            outcome=outcome,
            duration_ms=round(seconds * 1000, 2),
            **({"instruction": instruction[:64]} if instruction else {}),
            **{k: v for k, v in facts.items() if k != "instruction"},
        )

    # -- routes ---------------------------------------------------------------------------

    async def post_copy(self, request: Request) -> Response:
        async def work(token: Secret | None, facts: dict[str, Any]) -> Response:
            ref = _ref(request)
            if self.broker.answers_from_memory(token, ref, COPY):
                handout = self.broker.copy(token, ref)
            else:
                handout = await run_in_threadpool(self.broker.copy, token, ref)
            facts.update(version=handout.version, wrap_ttl_s=handout.wrap_ttl)
            # After the answer is sent: wrap the next copy of this key ahead of time.
            return JSONResponse(handout.as_response(), background=BackgroundTask(self._refill, ref))

        return await self._answer("copy", request, work)

    async def post_sign(self, request: Request) -> Response:
        async def work(token: Secret | None, facts: dict[str, Any]) -> Response:
            ref = _ref(request)
            body = await _json_object(request)
            if isinstance(body.get("instruction"), str):
                facts["instruction"] = body["instruction"]
            instruction, params, timestamp, window = _sign_request(body)

            def sign() -> Signature:
                return self.broker.sign(
                    token, ref, instruction, params, timestamp=timestamp, window=window
                )

            if self.broker.answers_from_memory(token, ref, f"sign/{instruction}"):
                signature = sign()
            else:
                signature = await run_in_threadpool(sign)
            return JSONResponse({"headers": dict(signature.headers)})

        return await self._answer("sign", request, work)

    def answer_at_once(
        self, route: str, sub: str, name: str, headers: Mapping[str, str], body: bytes
    ) -> QuickAnswer | None:
        """A copy or a signature the broker hands over from memory, answered at once.

        The daemon's HTTP protocol (``daemon/quick.py``) asks this when a
        ``POST .../copy`` or ``.../sign`` has arrived whole, before it starts the
        ASGI app: on the event loop, with no task, no Starlette request and no
        await. ``None`` means "not this way": a refusal, a bad body, or anything that
        needs Vault goes the usual way (``post_copy``, ``post_sign``), which answers it as
        ever. Only what the broker serves from memory is tried here (a refusal is
        not: it is the route's, with its error), so every error keeps one translation.
        The request is then recorded as the route would: one metric sample, the
        handout's metrics, activity and log line, after the answer is written.
        """
        started = time.perf_counter()
        token = _token(headers)
        if token is None or len(body) > MAX_BODY_BYTES:
            return None
        facts: dict[str, Any] = {}
        try:
            ref = KeyRef(sub, name)
            if route == "sign":
                instruction, params, timestamp, window = _sign_request(_parse_object(body))
                if not self.broker.serves_from_memory(token, ref, f"sign/{instruction}"):
                    return None
                facts["instruction"] = instruction
                signature = self.broker.sign(
                    token, ref, instruction, params, timestamp=timestamp, window=window
                )
                content: dict[str, Any] = {"headers": dict(signature.headers)}
            elif route == "copy" and self.broker.serves_from_memory(token, ref, COPY):
                handout = self.broker.copy(token, ref)
                facts.update(version=handout.version, wrap_ttl_s=handout.wrap_ttl)
                content = handout.as_response()
            else:
                return None
        except ServiceError:
            return None  # the usual way asks again, and answers with the error
        seconds = time.perf_counter() - started

        def then() -> None:
            self.metrics.observe_request(route, int(HTTPStatus.OK), seconds)
            self._record(route, str(ref), token, "ok", facts, seconds)
            if route == "copy":
                self.refills.want(ref)

        return QuickAnswer(orjson.dumps(content), then)

    async def _refill(self, ref: KeyRef) -> None:
        self.refills.want(ref)  # async, so starlette runs it on the loop, not in a thread

    async def get_info(self, request: Request) -> Response:
        async def work(token: Secret | None, _facts: dict[str, Any]) -> Response:
            ref = _ref(request)
            info: KeyInfo = await run_in_threadpool(self.broker.info, token, ref)
            return JSONResponse(info.as_response())

        return await self._answer("info", request, work)

    async def post_report(self, request: Request) -> Response:
        async def work(token: Secret | None, facts: dict[str, Any]) -> Response:
            ref = _ref(request)
            body = await _json_object(request)
            raw = body.get("reason", "")
            if not isinstance(raw, str):
                raise InvalidInput('"reason" must be a string')
            reason = _UNPRINTABLE.sub("?", raw)[:MAX_REASON_CHARS]
            facts["reason"] = reason
            await run_in_threadpool(self.broker.info, token, ref)  # grant, then 404 if unknown
            now = self.clock()
            if not self.reports.try_acquire(ref, now=now):
                retry_after_s = self.reports.retry_after(ref, now=now)
                raise ReportsLimited(str(ref), self.report_interval_s, retry_after_s)
            await run_in_threadpool(self.report, ref, reason)
            return JSONResponse(
                {"accepted": True, "key": str(ref)}, status_code=HTTPStatus.ACCEPTED
            )

        return await self._answer("report", request, work)

    async def get_watch(self, request: Request) -> Response:
        async def work(token: Secret | None, _facts: dict[str, Any]) -> Response:
            ref = _ref(request)
            await run_in_threadpool(self.broker.authorize_any, token, ref)
            if self.watch is None:
                raise NotFound("this daemon serves no watch streams")
            frames = self.watch.stream(ref, request.headers.get("last-event-id"))
            return StreamingResponse(
                frames,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        return await self._answer("watch", request, work)

    async def get_healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def get_readyz(self, _request: Request) -> Response:
        state = self.readiness()
        ready, detail = state if isinstance(state, tuple) else (state, "")
        body: dict[str, object] = {"ready": bool(ready)}
        if isinstance(detail, Mapping):
            body |= {k: v for k, v in detail.items() if k != "ready"}
            missing = detail.get("missing")
            names = [str(k) for k in missing] if isinstance(missing, list | tuple) else []
            reason = ", ".join(f"{k} {detail.get(k, 'missing')}" for k in names)
        else:
            reason = detail
        if ready:
            return JSONResponse(body)
        body["reason"] = reason or "not ready"
        return JSONResponse(
            body, status_code=HTTPStatus.SERVICE_UNAVAILABLE, headers={"Retry-After": "1"}
        )

    async def get_metrics(self, _request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, headers={"Content-Type": content_type})


async def _http_error(_request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else HTTPStatus.INTERNAL_SERVER_ERROR
    if status == HTTPStatus.NOT_FOUND:
        return error_response(
            NotFound(
                "no such route: the worker API is /v1/keys/SUB/NAME[/copy|/sign|/report|/watch]"
            )
        )
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        return error_response(MethodNotAllowed("this route does not accept that method"))
    return _internal_error()


def create_app(
    broker: Broker,
    *,
    readiness: Readiness,
    metrics: Metrics,
    report: ReportCallback | None = None,
    report_interval_s: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    watch: WatchSource | None = None,
    ui: Starlette | None = None,
    activity: Activity | None = None,
) -> Starlette:
    """The worker API. ``report`` runs (in the thread pool) when a worker reports a rejection."""
    api = _Api(
        broker,
        metrics,
        readiness,
        report or _no_report,
        report_interval_s=report_interval_s,
        clock=clock,
        watch=watch,
        activity=activity,
    )
    metrics.track_outstanding(lambda: broker.outstanding)
    keys = "/v1/keys/{sub}/{name}"
    app = Starlette(
        routes=[
            Route(f"{keys}/copy", api.post_copy, methods=["POST"]),
            Route(f"{keys}/sign", api.post_sign, methods=["POST"]),
            Route(f"{keys}/report", api.post_report, methods=["POST"]),
            Route(f"{keys}/watch", api.get_watch, methods=["GET"]),
            Route(keys, api.get_info, methods=["GET"]),
            Route("/healthz", api.get_healthz, methods=["GET"]),
            Route("/readyz", api.get_readyz, methods=["GET"]),
            Route("/metrics", api.get_metrics, methods=["GET"]),
            *(ui_routes(ui) if ui is not None else ()),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=api.lifespan,
    )
    app.router.redirect_slashes = False  # /v1/keys/a/b/ is a JSON 404, not a bare 307
    app.state.api = api
    return app


def quick_lane(app: object) -> QuickLane | None:
    """The app's ``answer_at_once``, when ``app`` is the worker API ``create_app`` made."""
    state = getattr(app, "state", None)
    api = getattr(state, "api", None)
    return api.answer_at_once if isinstance(api, _Api) else None
