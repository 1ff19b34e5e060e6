"""The client for trading bots: ``BrokerClient`` and its ``httpx.Auth``; httpx and pure modules.

::

    broker = BrokerClient("http://backpack-vault:8280", vault_addr=..., token=...)
    auth = broker.auth("scalper/bot-a", mode="copy")   # or mode="sign"
    client = httpx.Client(base_url="https://api.backpack.exchange", auth=auth)
    client.get("/api/v1/capital")                      # instruction from method + path

``copy`` mode fetches a wrapped copy from the daemon, unwraps it at Vault
directly (the daemon never sees the plain copy leave), signs locally and
fetches a fresh copy at about two thirds of its lifetime. While it holds a copy
it watches the key (:mod:`backpack_vault.client.watch`, a background thread):
when the key is retired or revoked the copy is dropped at once and the next
request raises KeyRetired or KeyRevoked; on a rotation the next request fetches
the successor. ``sign`` mode asks the daemon for the four headers of every
request; the secret never reaches the bot, and the daemon refuses a retired or
revoked key (409: KeyRetired, KeyRevoked).

A Backpack rejection is reported to the daemon, which checks the key at once. In
copy mode the request then waits (at most ``confirm_s``, 3 s) for the daemon's
verdict and raises KeyRevoked if the key was revoked; otherwise the answer is
returned as it came, and the copy kept: never a loop of fresh copies and 401s.
Errors (KeyRevoked, AccessDenied, BrokerUnavailable, ...) are in
:mod:`backpack_vault.errors`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any, Final, Literal, Self

import httpx

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import DEFAULT_WINDOW_MS, Params
from backpack_vault.client.protocol import (
    REFRESH_FRACTION,
    Copy,
    answer_json,
    error_from,
    is_rejection,
    key_url,
    parse_copy,
    request_params,
    says_token_dead,
    sign_body,
    unreachable,
    unwrapped,
)
from backpack_vault.client.protocol import ref as _ref
from backpack_vault.client.vault_auth import VaultAuth, VaultLogin, client_env
from backpack_vault.client.watch import (
    FINAL_STATUSES,
    READ_TIMEOUT_S,
    Watch,
    WatchEvent,
    follow,
)
from backpack_vault.config import Secret
from backpack_vault.core.keys import KeyRef
from backpack_vault.errors import (
    AccessDenied,
    BrokerUnavailable,
    ConfigError,
    CopyUnavailable,
    KeyPending,
    KeyRetired,
    KeyRevoked,
    RateLimited,
    ServiceError,
    not_usable,
)

__all__ = [
    "REFRESH_FRACTION",
    "AccessDenied",
    "BrokerAuth",
    "BrokerClient",
    "BrokerUnavailable",
    "Copy",
    "CopyUnavailable",
    "KeyPending",
    "KeyRetired",
    "KeyRevoked",
    "VaultAuth",
    "Watch",
    "WatchEvent",
    "is_rejection",
]

REPORT_EVERY_S: Final = 10.0
CONFIRM_S: Final = 3.0  # after a report, how long a request waits for the daemon's verdict
_INFO_EVERY_S: Final = 0.5  # while no watch is connected, how often info is asked meanwhile
_JOIN_S: Final = 2.0


_error_from = error_from  # the name the modules of this package used before


class BrokerClient:
    """Talks to the backpack-vault daemon with the worker's own Vault token.

    The token comes from ``auth`` (:class:`VaultAuth`: token, token file, AppRole,
    Kubernetes; renewed and logged in again by itself), or from the ``token=`` /
    ``token_file=`` shortcuts. :meth:`from_env` reads it all from the environment.
    """

    def __init__(
        self,
        url: str,
        *,
        vault_addr: str,
        token: str | Secret | None = None,
        token_file: str | Path | None = None,
        auth: VaultAuth | None = None,
        http: httpx.Client | None = None,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        verify: str | bool = True,
    ) -> None:
        if auth is None:
            if token is not None:
                auth = VaultAuth.token(token)
            elif token_file is not None:
                auth = VaultAuth.token_file(token_file)
            else:
                raise ConfigError(
                    "BrokerClient needs the worker's Vault login: auth=VaultAuth..., token= "
                    "or token_file="
                )
        self.url = url.rstrip("/")
        self.vault_addr = vault_addr.rstrip("/")
        self._http = http or httpx.Client(timeout=timeout, verify=verify)
        self._owns_http = http is None
        self.login = VaultLogin(auth, self.vault_addr, self._http)
        self._clock = clock
        self._watches: weakref.WeakSet[Watch] = weakref.WeakSet()
        self._threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, url: str | None = None, **kwargs: Any
    ) -> Self:
        """A client from ``BACKPACK_VAULT_DAEMON_URL``, ``VAULT_ADDR`` and the worker auth
        variables (:mod:`backpack_vault.client.vault_auth`); ``url`` overrides the first.

        ``BACKPACK_VAULT_DAEMON_CACERT`` and ``VAULT_CACERT`` name CA bundles. The one
        CA a client can hold verifies both: the daemon's wins when both are set.
        """
        found = client_env(os.environ if environ is None else environ, url)
        return cls(
            found.url,
            vault_addr=found.vault_addr,
            auth=found.auth,
            verify=found.verify,
            **kwargs,
        )

    def close(self) -> None:
        """End every watch (and the watcher threads of this client's auths), then the client."""
        for watch in list(self._watches):
            watch.close()
        for thread in list(self._threads):
            thread.join(_JOIN_S)
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _vault_token(self) -> Secret:
        return self.login.token()

    def _url(self, key: KeyRef, suffix: str = "") -> str:
        return key_url(self.url, key, suffix)

    def _headers(self) -> dict[str, str]:
        return {"X-Vault-Token": self._vault_token().reveal()}

    def _call(self, method: str, key: KeyRef, suffix: str, body: Any = None) -> Any:
        for attempt in (1, 2):
            token = self._vault_token()
            try:
                response = self._http.request(
                    method,
                    self._url(key, suffix),
                    json=body,
                    headers={"X-Vault-Token": token.reveal()},
                )
            except httpx.HTTPError as exc:
                raise unreachable(f"the broker at {self.url}", exc) from None
            try:
                return answer_json(response, str(key), self.url)
            except ServiceError as exc:
                # A dead token (expired, revoked): log in again once, if the method can.
                if attempt == 2 or not says_token_dead(exc):  # noqa: PLR2004 - the second try
                    raise
                if isinstance(exc, AccessDenied) and self.login.is_alive(token):
                    raise
                if not self.login.dead(token):
                    raise
        raise AssertionError  # pragma: no cover - the loop returns or raises

    # -- the four calls -------------------------------------------------------------------

    def copy(self, key: str | KeyRef) -> Copy:
        """Fetch a wrapped copy and unwrap it at Vault (single use)."""
        ref = _ref(key)
        handout = self._call("POST", ref, "/copy")
        wrap_token = Secret(str(handout["wrap_token"]))
        return parse_copy(ref, self._unwrap(ref, wrap_token), received_at=self._clock())

    def _unwrap(self, ref: KeyRef, wrap_token: Secret) -> dict[str, Any]:
        try:
            response = self._http.post(
                f"{self.vault_addr}/v1/sys/wrapping/unwrap",
                headers={"X-Vault-Token": wrap_token.reveal()},
            )
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(
                f"Vault at {self.vault_addr} is unreachable for unwrapping: {type(exc).__name__}"
            ) from None
        return unwrapped(ref, response)

    def sign(
        self,
        key: str | KeyRef,
        instruction: str,
        params: Params | None = None,
        timestamp: int | None = None,
        window: int | None = None,
    ) -> dict[str, str]:
        """The four Backpack headers for one request, signed by the daemon."""
        answer = self._call(
            "POST", _ref(key), "/sign", sign_body(instruction, params, timestamp, window)
        )
        return {str(k): str(v) for k, v in answer["headers"].items()}

    def info(self, key: str | KeyRef) -> dict[str, Any]:
        """The key's status and metadata (never its secret)."""
        return dict(self._call("GET", _ref(key), ""))

    def report(self, key: str | KeyRef, reason: str) -> None:
        """Tell the daemon Backpack rejected the key; it checks the key at once."""
        self._call("POST", _ref(key), "/report", {"reason": reason})

    def watch(
        self,
        key: str | KeyRef,
        *,
        last_event_id: str | None = None,
        read_timeout_s: float | None = None,
    ) -> Watch:
        """The key's status events as the daemon streams them; iterate it, ``close()`` it.

        It reconnects by itself (``Last-Event-ID``: nothing the daemon's feed still
        holds is missed) and raises AccessDenied or NotAuthenticated when refused.
        ``read_timeout_s`` (default 45) is how long silence means a dead connection.
        """
        ref = _ref(key)
        watch = Watch(
            self._http,
            self._url(ref, "/watch"),
            self._headers,
            error_for=lambda response: error_from(response, str(ref)),
            last_event_id=last_event_id,
            read_timeout_s=READ_TIMEOUT_S if read_timeout_s is None else read_timeout_s,
        )
        self._watches.add(watch)
        return watch

    def _track(self, thread: threading.Thread) -> None:
        self._threads.add(thread)

    def auth(
        self,
        key: str | KeyRef,
        mode: Literal["copy", "sign"] = "copy",
        *,
        window: int | None = None,
        watch: bool = True,
        confirm_s: float = CONFIRM_S,
    ) -> BrokerAuth:
        """An ``httpx.Auth`` that signs every Backpack request with ``key``.

        In copy mode it watches the key while it holds a copy (``watch=False``: it
        does not), and after a reported rejection waits up to ``confirm_s`` for the
        daemon's verdict.
        """
        if mode not in ("copy", "sign"):
            raise ConfigError(f"mode must be 'copy' or 'sign', not {mode!r}")
        return BrokerAuth(
            self,
            _ref(key),
            mode,
            window=window,
            clock=self._clock,
            watch=watch,
            confirm_s=confirm_s,
        )


_params = request_params


class BrokerAuth(httpx.Auth):
    """Signs Backpack requests through a BrokerClient; thread-safe.

    It talks to the daemon with a blocking ``httpx.Client``, so with an
    ``httpx.AsyncClient`` each signature blocks the event loop for one round trip.

    Copy mode: the key is watched while a copy is held; a ``retired`` or
    ``revoked`` event drops the copy, and every request after it raises
    KeyRetired or KeyRevoked without a round trip (a revoked key that is
    reinstated becomes usable again). A rejection by Backpack is reported to the
    daemon (at most every ``REPORT_EVERY_S`` seconds) and confirmed: the request
    waits up to ``confirm_s`` for the daemon's verdict, by the watch or else by
    asking ``info``, and raises KeyRevoked when the daemon revoked the key.
    """

    requires_response_body = True

    def __init__(
        self,
        broker: BrokerClient,
        key: KeyRef,
        mode: Literal["copy", "sign"],
        *,
        window: int | None = None,
        clock: Callable[[], float] = time.time,
        watch: bool = True,
        confirm_s: float = CONFIRM_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.key = key
        self.mode = mode
        self.window = window
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._copy: Copy | None = None
        self._unusable: str | None = None  # "revoked" or "retired", as the daemon said
        self._last_report = float("-inf")
        self._watch_enabled = watch and mode == "copy"
        self._confirm_s = confirm_s
        self._watch: Watch | None = None

    @property
    def watching(self) -> bool:
        """Whether the key's watch stream is connected now."""
        return self._watch is not None and self._watch.connected

    @property
    def unusable(self) -> str | None:
        """``"retired"`` or ``"revoked"`` once the daemon said so (watch or info), else None."""
        with self._lock:
            return self._unusable

    def current_copy(self) -> Copy:
        """The copy in use, fetched anew at two thirds of its lifetime."""
        with self._lock:
            if self._unusable is not None:
                raise not_usable(str(self.key), self._unusable)
            now = self._clock()
            if self._copy is None or self._copy.refresh_due(now):
                try:
                    self._copy = self.broker.copy(self.key)
                except BrokerUnavailable:
                    # Keep signing with the old copy while it is valid; the daemon may be back soon.
                    if self._copy is None or self._copy.expired(now):
                        raise
            self._start_watching()
            return self._copy

    def headers_for(self, request: httpx.Request) -> Mapping[str, str]:
        instruction = lookup(request.method, request.url.path).instruction
        params = _params(request)
        if self.mode == "sign":
            return self.broker.sign(self.key, instruction, params, window=self.window)
        stamp = int(self._clock() * 1000)
        return self.current_copy().headers(
            instruction, params, stamp, self.window or DEFAULT_WINDOW_MS
        )

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(self.headers_for(request))
        response = yield request
        if is_rejection(response):
            self._rejected(response)

    def close(self) -> None:
        """Stop watching the key (the watcher thread ends)."""
        with self._lock:
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    # -- the watch ------------------------------------------------------------------------

    def _start_watching(self) -> None:
        """Under the lock: once a copy is held, watch the key in a daemon thread."""
        if not self._watch_enabled or self._watch is not None:
            return
        watch = self.broker.watch(self.key)
        self._watch = watch
        thread = threading.Thread(
            target=follow,
            args=(weakref.ref(self), watch),
            name=f"backpack-vault-watch:{self.key}",
            daemon=True,
        )
        weakref.finalize(self, watch.close)  # an auth nobody holds stops watching
        self.broker._track(thread)  # noqa: SLF001 - the client that made this auth
        thread.start()

    def on_watch_event(self, event: WatchEvent) -> bool:
        """Act on one event of the key's watch; False when there is nothing left to watch."""
        status = event.status or ""
        with self._lock:
            if event.event in FINAL_STATUSES or status in FINAL_STATUSES:
                self._copy = None
                self._unusable = status if status in FINAL_STATUSES else event.event
            elif event.event == "rotated":
                self._copy = None  # the next request fetches the successor
            elif status == "active" and self._unusable is not None:
                self._unusable = None  # a revoked key was reinstated
            self._changed.notify_all()
            return self._unusable != "retired"  # retired is for good

    # -- rejections -----------------------------------------------------------------------

    def _rejected(self, response: httpx.Response) -> None:
        with self._lock:
            now = self._clock()
            if now - self._last_report < REPORT_EVERY_S:
                return  # reported (and confirmed) moments ago: this answer goes back as is
            self._last_report = now
        try:
            body = response.json()
            detail = f"{body.get('code', '')} {body.get('message', '')}".strip()
        except (ValueError, AttributeError):
            detail = ""
        reason = f"Backpack answered {response.status_code} {detail}".strip()[:200]
        # RateLimited: the daemon has heard it already; unavailable: it checks on schedule.
        with contextlib.suppress(RateLimited, BrokerUnavailable):
            self.broker.report(self.key, reason)
        if self.mode != "copy":
            return  # the daemon refuses the next signature once it has revoked the key
        status = self._confirm()
        if status is not None:
            raise not_usable(str(self.key), status)

    def _confirm(self) -> str | None:
        """The daemon's verdict after a report: "revoked" or "retired", or None within
        ``confirm_s`` (the key stays usable as far as the daemon knows)."""
        deadline = self._monotonic() + self._confirm_s
        asked = False
        while True:
            with self._lock:
                if self._unusable is not None:
                    return self._unusable
            if not asked or not self.watching:
                asked = True
                status = self._ask_info()
                if status is not None:
                    return status
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                return None
            with self._lock:
                if self._unusable is None:
                    wait = remaining if self.watching else min(remaining, _INFO_EVERY_S)
                    self._changed.wait(wait)

    def _ask_info(self) -> str | None:
        """Ask the daemon; mark the key when it is final; drop a copy of an older version."""
        try:
            info = self.broker.info(self.key)
        except ServiceError:
            return None
        status, version = str(info.get("status", "")), info.get("version")
        with self._lock:
            if status in FINAL_STATUSES:
                self._copy = None
                self._unusable = status
                return status
            if self._copy is not None and version is not None and version != self._copy.version:
                self._copy = None  # a successor is stored under this name: fetch it next time
        return None
