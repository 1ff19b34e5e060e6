"""The operator page: server-rendered HTML behind a Vault-token login, refreshed by a poll.

Routes, relative to where the app is mounted (``/ui`` in the worker API)::

    GET  /                  the page with a session; only the login form without one
    POST /login             form field ``token``: checked once, then dropped; 303 to the page
    POST /logout            ends the session; 303 to the login form
    GET  /state             the page's data as JSON, for the live refresh (401 without a session)
    GET  /static/page.css   the style sheet; /static/page.js refreshes the page every 2 s

Modules::

    __init__  the app: routes, login, sessions, headers        render.py  /state JSON and HTML
    source.py UiSource, DaemonSource, Activity                 page.css, page.js  static

A token is enough when Vault grants it ``read`` or ``list`` on the KV metadata
paths (a metadata-reader or operator token); a worker token gets 403, a dead one
401, each as the form again with a message. The session cookie is HttpOnly,
SameSite=Strict (Secure under TLS) and holds only a random reference; the
server keeps ``hash(reference) -> (identity, ends_at)``, and a session ends with
the token's TTL or after ``session_ttl_s``, whichever comes first. POSTs from
another origin are refused. The page reads everything with the daemon's own
token, through a :class:`UiSource`; nothing it renders or answers holds a
secret, a token or a wrapping token.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Final
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from backpack_vault.config import Secret
from backpack_vault.core.caches import RateLimiter
from backpack_vault.core.clock import Clock, iso_utc
from backpack_vault.errors import NotAuthenticated, NotPermitted, ServiceError, UpstreamError
from backpack_vault.logging import get_logger
from backpack_vault.ui.render import gather, login_page, page
from backpack_vault.ui.source import (
    Activity,
    ActivityRow,
    DaemonSource,
    LastCheck,
    Operator,
    UiSource,
    UiVault,
)

__all__ = [
    "Activity",
    "ActivityRow",
    "DaemonSource",
    "LastCheck",
    "Operator",
    "UiSource",
    "UiVault",
    "create_ui",
    "ui_routes",
]

log = get_logger("backpack_vault.ui")

SESSION_COOKIE: Final = "bv_ui_session"
DEFAULT_SESSION_TTL_S: Final = 3600.0
MAX_SESSIONS: Final = 1000
MAX_FORM_BYTES: Final = 8 * 1024
LOGIN_ATTEMPTS_PER_MINUTE: Final = 10


# -- sessions ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Session:
    identity: str
    ends_at: float


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class _Sessions:
    """``sha256(sid) -> session``, at most ``limit`` of them: the sid itself is never kept."""

    def __init__(self, clock: Clock, ttl_s: float, limit: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self._ttl_s = ttl_s
        self._limit = limit
        self._lock = threading.Lock()
        self._by_digest: dict[str, _Session] = {}

    def open(self, operator: Operator) -> tuple[str, _Session] | None:
        """A new session for ``operator``; None when their token expires now."""
        now = self._clock()
        ends_at = now + self._ttl_s
        if operator.expires_at is not None:
            ends_at = min(ends_at, operator.expires_at)
        if ends_at <= now:
            return None
        sid = secrets.token_urlsafe(32)
        session = _Session(operator.identity, ends_at)
        with self._lock:
            self._expire(now)
            while len(self._by_digest) >= self._limit:  # the one that would end first goes
                del self._by_digest[min(self._by_digest, key=lambda d: self._by_digest[d].ends_at)]
            self._by_digest[_digest(sid)] = session
        return sid, session

    def get(self, sid: str | None) -> _Session | None:
        if not sid:
            return None
        now = self._clock()
        with self._lock:
            session = self._by_digest.get(_digest(sid))
            if session is not None and session.ends_at <= now:
                del self._by_digest[_digest(sid)]
                return None
            return session

    def close(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._by_digest.pop(_digest(sid), None)

    def _expire(self, now: float) -> None:
        for digest in [d for d, s in self._by_digest.items() if s.ends_at <= now]:
            del self._by_digest[digest]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_digest)


# -- the app -------------------------------------------------------------------------------------

_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: under it Chromium sends "Origin: null" with our own forms' POSTs.
    "Referrer-Policy": "same-origin",
}
_ASSETS: Final = {
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
}


def _html(text: str, status: int = HTTPStatus.OK) -> Response:
    return Response(text, status_code=status, media_type="text/html", headers=_HEADERS)


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _same_origin(request: Request) -> bool:
    """A POST from our own pages: Origin (or, without it, Sec-Fetch-Site) names no other site.

    Only the host and port are compared: behind a TLS-terminating proxy the scheme we
    see is not the browser's.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
    host = request.headers.get("host", "")
    return origin != "null" and bool(host) and urlsplit(origin).netloc.lower() == host.lower()


class _Ui:
    def __init__(
        self, source: UiSource, clock: Clock, session_ttl_s: float, secure_cookies: bool
    ) -> None:
        self.source = source
        self.clock = clock
        self.secure_cookies = secure_cookies
        self.sessions = _Sessions(clock, session_ttl_s)
        # Used on the event loop only, so it needs no lock.
        self.attempts: RateLimiter[str] = RateLimiter(LOGIN_ATTEMPTS_PER_MINUTE, per=60)
        package = resources.files(__name__)
        self.assets = {name: (package / name).read_bytes() for name in _ASSETS}

    def _session(self, request: Request) -> _Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def _forget_cookie(self, request: Request, response: Response) -> Response:
        response.delete_cookie(
            SESSION_COOKIE,
            path=_base(request) or "/",
            secure=self._secure(request),
            httponly=True,
            samesite="strict",
        )
        return response

    def _secure(self, request: Request) -> bool:
        return self.secure_cookies or request.url.scheme == "https"

    async def get_page(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            message = (
                "Your session has ended; log in again."
                if request.cookies.get(SESSION_COOKIE)
                else ""
            )
            response = _html(login_page(message))
            return self._forget_cookie(request, response) if message else response
        state = await run_in_threadpool(
            gather, self.source, session.identity, session.ends_at, self.clock()
        )
        return _html(page(state))

    async def get_state(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return JSONResponse(
                {"error": {"code": "not_authenticated", "message": "log in on the operator page"}},
                status_code=HTTPStatus.UNAUTHORIZED,
                headers={"Cache-Control": "no-store"},
            )
        state = await run_in_threadpool(
            gather, self.source, session.identity, session.ends_at, self.clock()
        )
        return JSONResponse(state, headers={"Cache-Control": "no-store"})

    async def post_login(self, request: Request) -> Response:
        if not _same_origin(request):
            return self._cross_site(request)
        client = request.client.host if request.client else ""
        now = self.clock()
        if not self.attempts.try_acquire(client, now=now):
            wait = max(1, round(self.attempts.retry_after(client, now=now)))
            log.info("ui.login_limited", client=client)
            return _html(
                login_page(f"Too many login attempts; try again in {wait} s."),
                HTTPStatus.TOO_MANY_REQUESTS,
            )
        return await self._login(request)

    async def _login(self, request: Request) -> Response:
        """Check the form's token with Vault once, then forget it; open a session."""
        token = await _form_token(request)
        if token is None:
            return _html(login_page("Paste a Vault token."), HTTPStatus.UNAUTHORIZED)
        try:
            operator = await run_in_threadpool(self.source.authorize, token)
        except ServiceError as exc:
            return self._refused(exc)
        except Exception as exc:  # noqa: BLE001 - a login never answers with a traceback
            # Not log.exception: a rendered traceback may show locals (the token among them).
            log.error("ui.login_failed", error=type(exc).__name__)  # noqa: TRY400
            return _html(
                login_page("Login failed; see the daemon's logs."),
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        # The token goes no further: only the session's reference outlives this request.
        opened = self.sessions.open(operator)
        if opened is None:
            return _html(login_page("This token expires now."), HTTPStatus.UNAUTHORIZED)
        sid, session = opened
        log.info("ui.login", identity=operator.identity, ends_at=iso_utc(session.ends_at))
        response = RedirectResponse(f"{_base(request)}/", status_code=HTTPStatus.SEE_OTHER)
        response.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=max(1, int(session.ends_at - self.clock())),
            path=_base(request) or "/",
            secure=self._secure(request),
            httponly=True,
            samesite="strict",
        )
        return response

    def _refused(self, exc: ServiceError) -> Response:
        log.info("ui.login_refused", error=exc.code)
        if isinstance(exc, NotAuthenticated):
            message = "Vault does not accept this token (expired, revoked or unknown)."
            return _html(login_page(message), HTTPStatus.UNAUTHORIZED)
        if isinstance(exc, NotPermitted):
            message = (
                "This token may not read key metadata: the page needs a metadata-reader or "
                "operator token, not a worker's."
            )
            return _html(login_page(message), HTTPStatus.FORBIDDEN)
        if isinstance(exc, UpstreamError):
            message = f"Vault cannot be asked right now; try again shortly ({exc.message})."
            return _html(login_page(message), HTTPStatus.SERVICE_UNAVAILABLE)
        status = exc.http_status if exc.http_status < HTTPStatus.INTERNAL_SERVER_ERROR else 503
        return _html(login_page(f"Login refused: {exc.message}"), status)

    def _cross_site(self, request: Request) -> Response:
        log.warning("ui.cross_site_refused", path=request.url.path)
        return _html(login_page("Refused: the form was sent from another site."), 403)

    async def post_logout(self, request: Request) -> Response:
        if not _same_origin(request):
            return self._cross_site(request)
        sid = request.cookies.get(SESSION_COOKIE)
        session = self.sessions.get(sid)
        self.sessions.close(sid)
        if session is not None:
            log.info("ui.logout", identity=session.identity)
        response = RedirectResponse(f"{_base(request)}/", status_code=HTTPStatus.SEE_OTHER)
        return self._forget_cookie(request, response)

    async def get_login(self, request: Request) -> Response:
        return RedirectResponse(f"{_base(request)}/", status_code=HTTPStatus.SEE_OTHER)

    async def get_asset(self, request: Request) -> Response:
        name = str(request.path_params["name"])
        if name not in _ASSETS:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(
            self.assets[name],
            media_type=_ASSETS[name],
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )


async def _form_token(request: Request) -> Secret | None:
    """The ``token`` field of a urlencoded form, read up to MAX_FORM_BYTES."""
    body = b""
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return None
    except ClientDisconnect:
        return None
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        return None
    value = (fields.get("token") or [""])[0].strip()
    return Secret(value) if value else None


async def _http_error(_request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    text = {404: "not found", 405: "method not allowed"}.get(status, "error")
    return Response(text, status_code=status, media_type="text/plain", headers=_HEADERS)


def create_ui(
    source: UiSource,
    *,
    clock: Clock = time.time,
    session_ttl_s: float = DEFAULT_SESSION_TTL_S,
    secure_cookies: bool = False,
) -> Starlette:
    """The operator page as an ASGI app, to mount at ``/ui`` (see :func:`ui_routes`).

    ``secure_cookies`` marks the session cookie Secure (set it when serving TLS; a
    request that arrived over https gets it anyway).
    """
    ui = _Ui(source, clock, session_ttl_s, secure_cookies)
    app = Starlette(
        routes=[
            Route("/", ui.get_page, methods=["GET"]),
            Route("/state", ui.get_state, methods=["GET"]),
            Route("/login", ui.post_login, methods=["POST"]),
            Route("/login", ui.get_login, methods=["GET"]),
            Route("/logout", ui.post_logout, methods=["POST"]),
            Route("/static/{name}", ui.get_asset, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    app.router.redirect_slashes = False
    app.state.ui = ui
    return app


def ui_routes(ui: Starlette, path: str = "/ui") -> list[BaseRoute]:
    """``GET /ui`` redirected to ``/ui/``, and the app mounted there (an app that turns
    ``redirect_slashes`` off, as the worker API does, would answer ``/ui`` with a 404)."""

    async def redirect(_request: Request) -> Response:
        return RedirectResponse(f"{path}/", status_code=HTTPStatus.TEMPORARY_REDIRECT)

    return [Route(path, redirect, methods=["GET"]), Mount(path, app=ui)]
