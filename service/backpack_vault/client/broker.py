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
the successor (the rules: :mod:`backpack_vault.client.copies`). ``sign`` mode
asks the daemon for the four headers of every request; the secret never reaches
the bot, and the daemon refuses a retired or revoked key (409: KeyRetired,
KeyRevoked).

A Backpack rejection is reported to the daemon, which checks the key at once. In
copy mode the request then waits (at most ``confirm_s``, 3 s) for the daemon's
verdict and raises KeyRevoked if the key was revoked; if the name switched to
another key meanwhile (a failover to its standby), the same request is sent once
more, signed by that key; otherwise the answer is returned as it came, and the
copy kept: never a loop of fresh copies and 401s.
Errors (KeyRevoked, AccessDenied, BrokerUnavailable, ...) are in
:mod:`backpack_vault.errors`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Generator, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, Literal, Self

import httpx
import orjson

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import DEFAULT_WINDOW_MS, Params
from backpack_vault.client.copies import CopyKeeper, Verdict
from backpack_vault.client.protocol import (
    REFRESH_FRACTION,
    REPORT_EVERY_S,
    Copy,
    Reports,
    answer_json,
    error_from,
    is_rejection,
    key_url,
    parse_copy,
    rejection_reason,
    request_params,
    says_token_dead,
    sign_body,
    tls_context,
    unreachable,
    unwrapped,
)
from backpack_vault.client.protocol import ref as _ref
from backpack_vault.client.vault_auth import VaultAuth, VaultLogin, client_env
from backpack_vault.client.watch import FINAL_STATUSES, READ_TIMEOUT_S, Watch, WatchEvent
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
from backpack_vault.wire import Pool, WireError

__all__ = [
    "REFRESH_FRACTION",
    "REPORT_EVERY_S",
    "AccessDenied",
    "BrokerAuth",
    "BrokerClient",
    "BrokerUnavailable",
    "Copy",
    "CopyKeeper",
    "CopyUnavailable",
    "KeyPending",
    "KeyRetired",
    "KeyRevoked",
    "VaultAuth",
    "Watch",
    "WatchEvent",
    "is_rejection",
]

CONFIRM_S: Final = 3.0  # after a report, how long a request waits for the daemon's verdict
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
        verify: str | bool | ssl.SSLContext = True,
    ) -> None:
        """``verify``: the CA bundle (a path) that verifies the daemon and Vault, True for
        the usual trust, False for none; it serves only a client made here (no ``http``)."""
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
        tls = tls_context(verify) if http is None else None
        self._http = http or httpx.Client(timeout=timeout, verify=tls or True)
        self._owns_http = http is None
        # The daemon's calls and the unwraps at Vault go over kept connections (wire.py)
        # unless the caller handed in an httpx.Client: then its hooks, transport and
        # proxies serve them all.
        self._wire_settings = (timeout, tls) if tls is not None else None
        self._pools: dict[str, Pool | None] = {}
        self._pools_lock = threading.Lock()
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
        """End every watch (and the watcher threads of this client's auths) and the login's
        background renewal, then the client."""
        for watch in list(self._watches):
            watch.close()
        for thread in list(self._threads):
            thread.join(_JOIN_S)
        self.login.close()
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            if pool is not None:
                pool.close()
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
                return self._send(method, key, suffix, body, token)
            except ServiceError as exc:
                # A dead token (expired, revoked): log in again once, if the method can.
                if attempt == 2 or not says_token_dead(exc):  # noqa: PLR2004 - the second try
                    raise
                if isinstance(exc, AccessDenied) and self.login.is_alive(token):
                    raise
                if not self.login.dead(token):
                    raise
        raise AssertionError  # pragma: no cover - the loop returns or raises

    def _send(self, method: str, key: KeyRef, suffix: str, body: Any, token: Secret) -> Any:
        """One call to the daemon: its JSON answer, or our error for it."""
        pool = self._pool_for(self.url)
        if pool is None:
            try:
                response = self._http.request(
                    method,
                    self._url(key, suffix),
                    json=body,
                    headers={"X-Vault-Token": token.reveal()},
                )
            except httpx.HTTPError as exc:
                raise unreachable(f"the broker at {self.url}", exc) from None
            return answer_json(response, str(key), self.url)
        content = None if body is None else _json_bytes(body)
        try:
            status, headers, answer = pool.request(
                method, _path(key, suffix), content, token.reveal()
            )
        except WireError as exc:
            raise BrokerUnavailable(f"the broker at {self.url} is unreachable: {exc}") from None
        if HTTPStatus.OK <= status < HTTPStatus.MULTIPLE_CHOICES:
            try:
                return orjson.loads(answer)
            except ValueError:
                raise BrokerUnavailable(
                    f"the broker at {self.url} answered with invalid JSON"
                ) from None
        raise error_from(httpx.Response(status, headers=headers, content=answer), str(key))

    def _pool_for(self, base: str) -> Pool | None:
        """The kept connections to ``base`` (the daemon or Vault); None: httpx carries it."""
        if self._wire_settings is None:
            return None
        try:
            return self._pools[base]
        except KeyError:
            pass
        timeout, tls = self._wire_settings
        with self._pools_lock:
            if base not in self._pools:
                self._pools[base] = Pool.for_url(base, timeout=timeout, tls=tls)
            return self._pools[base]

    # -- the four calls -------------------------------------------------------------------

    def copy(self, key: str | KeyRef) -> Copy:
        """Fetch a wrapped copy and unwrap it at Vault (single use)."""
        ref = _ref(key)
        handout = self._call("POST", ref, "/copy")
        wrap_token = Secret(str(handout["wrap_token"]))
        return parse_copy(ref, self._unwrap(ref, wrap_token), received_at=self._clock())

    def _unwrap(self, ref: KeyRef, wrap_token: Secret) -> dict[str, Any]:
        unreachable_vault = f"Vault at {self.vault_addr} is unreachable for unwrapping"
        pool = self._pool_for(self.vault_addr)
        if pool is not None:
            try:
                status, _headers, content = pool.request(
                    "POST", "/v1/sys/wrapping/unwrap", None, wrap_token.reveal()
                )
            except WireError as exc:  # its text names what failed (never the token)
                raise BrokerUnavailable(f"{unreachable_vault}: {exc}") from None
            return unwrapped(ref, status, content)
        try:
            response = self._http.post(
                f"{self.vault_addr}/v1/sys/wrapping/unwrap",
                headers={"X-Vault-Token": wrap_token.reveal()},
            )
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(f"{unreachable_vault}: {type(exc).__name__}") from None
        return unwrapped(ref, response.status_code, response.content)

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


@functools.lru_cache(maxsize=256)
def _path(key: KeyRef, suffix: str) -> str:
    """The daemon's path for a key's call, quoted once per key and call."""
    return key_url("", key, suffix)


def _json_bytes(body: Any) -> bytes:
    """A request body as JSON; orjson for speed, json for what orjson refuses (an int
    beyond 64 bits), so the lean path sends what httpx would."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, separators=(",", ":")).encode()


class BrokerAuth(httpx.Auth):
    """Signs Backpack requests through a BrokerClient; thread-safe.

    It talks to the daemon with a blocking ``httpx.Client``, so with an
    ``httpx.AsyncClient`` each signature blocks the event loop for one round trip
    (:class:`~backpack_vault.client.aio.AsyncBrokerAuth` does not).

    Copy mode keeps its copy in a :class:`~backpack_vault.client.copies.CopyKeeper`
    (:attr:`copies`): refreshed at two thirds of its life, watched, dropped on a
    rotation, cut off on a retire or revoke (every request after it raises KeyRetired
    or KeyRevoked without a round trip; a revoked key that is reinstated becomes usable
    again). A rejection by Backpack is reported to the daemon (at most every
    ``REPORT_EVERY_S`` seconds) and, in copy mode, confirmed: the request waits up to
    ``confirm_s`` for the daemon's verdict, by the watch or else by asking ``info``,
    and raises KeyRevoked when the daemon revoked the key, or is sent again, signed by
    the successor, when the name switched keys meanwhile.
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
        self._confirm_s = confirm_s
        self.copies = CopyKeeper(broker, key, watch=watch, clock=clock) if mode == "copy" else None
        self._reports = Reports(REPORT_EVERY_S, clock)

    @property
    def watching(self) -> bool:
        """Whether the key's watch stream is connected now (copy mode)."""
        return self.copies is not None and self.copies.watching

    @property
    def unusable(self) -> str | None:
        """``"retired"`` or ``"revoked"`` once the daemon said so (watch or info), else None."""
        return self.copies.cut_off if self.copies is not None else None

    def current_copy(self) -> Copy:
        """The copy in use, fetched anew at two thirds of its lifetime (copy mode)."""
        if self.copies is None:
            raise ConfigError("a sign-mode auth holds no copy")
        return self.copies.current()

    def headers_for(self, request: httpx.Request) -> Mapping[str, str]:
        """The four headers for ``request``: the daemon's (sign mode) or the copy's."""
        return self._signed(request)[0]

    def _signed(self, request: httpx.Request) -> tuple[Mapping[str, str], Copy | None]:
        instruction = lookup(request.method, request.url.path).instruction
        params = _params(request)
        if self.copies is None:
            return self.broker.sign(self.key, instruction, params, window=self.window), None
        copy = self.copies.current()
        stamp = int(self._clock() * 1000)
        return copy.headers(instruction, params, stamp, self.window or DEFAULT_WINDOW_MS), copy

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        headers, signer = self._signed(request)
        request.headers.update(headers)
        response = yield request
        if not is_rejection(response):
            return
        refused = request.headers.get("X-API-Key", "")
        if self._rejected(response, signer) == "rotated" or self.copies is None:
            # The name may have switched keys while Backpack refused this one (a failover
            # to its standby): Backpack did not act on the request, so if the daemon now
            # signs with another key, that key sends it once more.
            try:
                request.headers.update(self.headers_for(request))
            except ServiceError:
                return  # refused now (revoked, retired): Backpack's answer stands
            if request.headers.get("X-API-Key", "") != refused:
                yield request

    def close(self) -> None:
        """Stop watching the key (the watcher thread ends)."""
        if self.copies is not None:
            self.copies.close()

    def _rejected(self, response: httpx.Response, signer: Copy | None) -> Verdict:
        """Report the rejection; in copy mode, the daemon's verdict (a final one raised)."""
        if not self._reports.due():
            return None  # reported (and confirmed) moments ago: this answer goes back as is
        # RateLimited: the daemon has heard it already; unavailable: it checks on schedule.
        with contextlib.suppress(RateLimited, BrokerUnavailable):
            self.broker.report(self.key, rejection_reason(response))
        if self.copies is None:
            return None  # the daemon refuses the next signature once it has revoked the key
        verdict = self.copies.verdict(self._confirm_s, signer=signer, monotonic=self._monotonic)
        if verdict in FINAL_STATUSES:
            raise not_usable(str(self.key), str(verdict))
        return verdict
