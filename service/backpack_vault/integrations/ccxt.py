"""ccxt's Backpack exchange, signed through the backpack-vault daemon.

::

    broker = BrokerClient("http://backpack-vault:8280", vault_addr=..., token=...)
    exchange = backpack({"enableRateLimit": True}, broker=broker, key="scalper/bot-a")
    exchange.create_order("SOL/USDC", "limit", "buy", 1, 180.5)

Sign mode (the default): the exchange never holds the secret. ``exchange.secret``
stays empty; ``exchange.apiKey`` is the key's public API key (``broker.info``).
ccxt builds each private request as usual (URL, query or JSON body, its own
headers such as X-Broker-Id), and where it would sign, the daemon signs the same
instruction, params, timestamp and window (for a batch, ``create_orders``, the
list of orders); the daemon's four headers replace ccxt's. Copy mode: the copy's
API key and secret become ``exchange.apiKey`` and ``exchange.secret`` and ccxt
signs by itself; the copy is refreshed at two thirds of its lifetime and dropped
when the daemon's watch says the key was retired, revoked or rotated, or when
Backpack rejects the key (reported to the daemon once).

Params: floats and Decimals are sent, and signed, as decimal strings; ``None``
is left out (:mod:`backpack_vault.integrations.params`).

Our errors are raised from inside ccxt's call as ccxt's own, ours as ``__cause__``::

    KeyRevoked, KeyRetired, KeyPending, UnknownKey, NotAuthenticated  AuthenticationError
    NotPermitted (AccessDenied, ReadOnlyKey)                         PermissionDenied
    RateLimited (the daemon's 429)                                   RateLimitExceeded
    InvalidInput (a parameter that cannot be signed)                 BadRequest
    BrokerUnavailable, CopyUnavailable (any UpstreamError)           ExchangeNotAvailable
    any other ServiceError                                           ExchangeError

``async_backpack`` is the same for ``ccxt.async_support``. ccxt's ``sign()`` is
synchronous, so there it only prepares: the daemon is asked in a worker thread
(``asyncio.to_thread``) from ``fetch()``, the coroutine that sends the request,
and a due copy is fetched the same way in ``fetch2()``; the event loop never
waits on the daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import ccxt
import ccxt.async_support

from backpack_vault.backpack.instructions import is_state_changing, lookup
from backpack_vault.backpack.signing import Params
from backpack_vault.client.broker import BrokerClient
from backpack_vault.core.keys import KeyRef
from backpack_vault.errors import (
    ConfigError,
    InvalidInput,
    KeyNotUsable,
    NotAuthenticated,
    NotPermitted,
    RateLimited,
    ReadOnlyKey,
    ServiceError,
    UnknownKey,
    UpstreamError,
)
from backpack_vault.integrations.handle import KeyHandle, Mode
from backpack_vault.integrations.params import signable, signable_batch

__all__ = ["AsyncBackpack", "Backpack", "async_backpack", "backpack", "ccxt_error"]

T = TypeVar("T")

_ERRORS: tuple[tuple[type[ServiceError] | tuple[type[ServiceError], ...], type[Any]], ...] = (
    (NotPermitted, ccxt.PermissionDenied),  # before AuthenticationError: it is a subclass
    ((KeyNotUsable, UnknownKey, NotAuthenticated), ccxt.AuthenticationError),
    (RateLimited, ccxt.RateLimitExceeded),
    (InvalidInput, ccxt.BadRequest),
    (UpstreamError, ccxt.ExchangeNotAvailable),
)


def ccxt_error(exc: ServiceError) -> Exception:
    """ccxt's exception for one of ours, carrying ours as ``__cause__``."""
    kind = next((error for ours, error in _ERRORS if isinstance(exc, ours)), ccxt.ExchangeError)
    error: Exception = kind(f"backpack {exc.message}")
    error.__cause__ = exc
    return error


@dataclass(frozen=True, slots=True)
class _Pending:
    """What the daemon signs for one request: exactly what ccxt would have signed."""

    instruction: str
    params: Params | None
    timestamp_ms: int
    window_ms: int

    def headers(self, handle: KeyHandle) -> dict[str, str]:
        return handle.headers(self.instruction, self.params, self.timestamp_ms, self.window_ms)


class _Unsigned(dict[str, Any]):
    """(async) ccxt's headers for a request the daemon signs in ``fetch()``."""

    __slots__ = ("pending",)

    def __init__(self, headers: Mapping[str, Any], pending: _Pending) -> None:
        super().__init__(headers)
        self.pending = pending


class _DaemonSigning:
    """What the sync and async exchanges share; ccxt's own class follows it in the MRO."""

    key_handle: KeyHandle
    id: str
    apiKey: str  # noqa: N815 - ccxt's attribute
    secret: str
    options: dict[str, Any]

    def check_required_credentials(self, error: bool = True) -> bool:
        """Sign mode needs only the public API key; copy mode installs the copy first."""
        missing = not self.apiKey or (self.key_handle.mode == "copy" and not self.secret)
        if missing and error:
            raise ccxt.AuthenticationError(f"{self.id} has no key from backpack-vault")
        return not missing

    def eddsa(
        self, request: bytes, secret: bytes, curve: str = "ed25519", url_encode: bool = False
    ) -> str:
        if self.key_handle.mode == "sign":
            return ""  # the daemon signs this request: sign() puts its headers in
        return str(ccxt.Exchange.eddsa(request, secret, curve, url_encode))

    def sign(
        self,
        path: str,
        api: str = "public",
        method: str = "GET",
        params: Any = None,
        headers: Any = None,
        body: Any = None,
    ) -> dict[str, Any]:
        params = {} if params is None else params
        if api != "private":
            return dict(super().sign(path, api, method, params, headers, body))  # type: ignore[misc]
        try:
            params = signable_batch(params) if isinstance(params, list) else signable(params)
            instruction = self._instruction(path, method)
            if self.key_handle.mode == "copy":
                self._install_copy(instruction)
            request = dict(super().sign(path, api, method, params, headers, body))  # type: ignore[misc]
            if self.key_handle.mode == "sign":
                stamp, window = request["headers"]["X-Timestamp"], request["headers"]["X-Window"]
                self._sign_with_daemon(
                    request, _Pending(instruction, params or None, int(stamp), int(window))
                )
        except ServiceError as exc:
            raise ccxt_error(exc) from exc
        return request

    def _instruction(self, path: str, method: str) -> str:
        """ccxt's own instruction for the route (what it signs); else the package's table."""
        table = self.options.get("instructions", {}).get(path, {})
        return str(table.get(method) or lookup(method, f"/{path}").instruction)

    def _install_copy(self, instruction: str) -> None:
        try:
            copy = self.key_handle.copy()
        except KeyNotUsable:
            self.secret = ""  # a cut-off key's secret leaves the exchange at its next request
            raise
        if copy.read_only and is_state_changing(instruction):
            raise ReadOnlyKey(str(copy.key), instruction)
        self.apiKey, self.secret = copy.api_key, copy.api_secret.reveal()

    def _sign_with_daemon(self, request: dict[str, Any], pending: _Pending) -> None:
        signed = pending.headers(self.key_handle)
        request["headers"].update(signed)
        self.apiKey = signed["X-API-Key"]  # after a rotation: the successor's

    def handle_errors(
        self,
        code: int,
        reason: str,
        url: str,
        method: str,
        headers: Any,
        body: str,
        response: Any,
        request_headers: Any,
        request_body: Any,
    ) -> Any:
        """Before ccxt raises its error: a refused key is reported (once) to the daemon."""
        if code >= 400 and request_headers and "X-Signature" in request_headers:  # noqa: PLR2004
            cause = self.key_handle.rejection(code, body or "")
            if cause is not None and self.key_handle.rejected():
                self._report(cause)
        return super().handle_errors(  # type: ignore[misc]
            code, reason, url, method, headers, body, response, request_headers, request_body
        )

    def _report(self, reason: str) -> None:
        self.key_handle.report(reason)


class Backpack(_DaemonSigning, ccxt.backpack):  # type: ignore[misc]
    """``ccxt.backpack`` whose private requests are signed through the daemon."""

    def __init__(self, config: Mapping[str, Any] | None = None, *, key_handle: KeyHandle) -> None:
        self.key_handle = key_handle
        super().__init__(dict(config or {}))

    def close(self, clean_instance_data: bool = False) -> Any:
        """Stop watching the key and forget any copy; then ccxt's own close."""
        self.key_handle.close()
        self.secret = ""
        return super().close(clean_instance_data)


class AsyncBackpack(_DaemonSigning, ccxt.async_support.backpack):  # type: ignore[misc]
    """``ccxt.async_support.backpack`` signed through the daemon, off the event loop."""

    def __init__(self, config: Mapping[str, Any] | None = None, *, key_handle: KeyHandle) -> None:
        self.key_handle = key_handle
        super().__init__(dict(config or {}))

    async def fetch2(
        self,
        path: str,
        api: str = "public",
        method: str = "GET",
        params: Any = None,
        headers: Any = None,
        body: Any = None,
        config: Any = None,
    ) -> Any:
        if api == "private" and self.key_handle.copy_due():
            await _off_loop(self.key_handle.copy)  # then sign() finds the copy in place
        return await super().fetch2(
            path, api, method, {} if params is None else params, headers, body, config or {}
        )

    async def fetch(
        self, url: str, method: str = "GET", headers: Any = None, body: Any = None
    ) -> Any:
        if isinstance(headers, _Unsigned):
            signed = await _off_loop(lambda: headers.pending.headers(self.key_handle))
            headers = {**headers, **signed}
            self.apiKey = signed["X-API-Key"]  # after a rotation: the successor's
        return await super().fetch(url, method, headers, body)

    def _sign_with_daemon(self, request: dict[str, Any], pending: _Pending) -> None:
        request["headers"] = _Unsigned(request["headers"], pending)

    def _report(self, reason: str) -> None:
        # handle_errors runs inside fetch() on the loop: the report goes to a worker thread.
        asyncio.get_running_loop().run_in_executor(None, self.key_handle.report, reason)

    async def close(self, clean_instance_data: bool = False) -> Any:
        self.key_handle.close()
        self.secret = ""
        return await super().close(clean_instance_data)


async def _off_loop(call: Callable[[], T]) -> T:
    try:
        return await asyncio.to_thread(call)
    except ServiceError as exc:
        raise ccxt_error(exc) from exc


def _config(config: Mapping[str, Any] | None, handle: KeyHandle) -> dict[str, Any]:
    settings = dict(config or {})
    if settings.get("secret"):
        raise ConfigError(
            "pass no secret to backpack_vault.ccxt: the daemon signs (sign mode) or the copy "
            "brings it (copy mode)"
        )
    try:
        settings["apiKey"] = handle.api_key()
    except ServiceError as exc:
        raise ccxt_error(exc) from exc
    settings["secret"] = ""  # ccxt's default is None, which its sign() cannot decode
    return settings


def backpack(
    config: Mapping[str, Any] | None = None,
    *,
    broker: BrokerClient,
    key: str | KeyRef,
    mode: Mode = "sign",
    watch: bool = True,
) -> Backpack:
    """A ``ccxt.backpack`` for ``key`` in ``mode`` (``"sign"`` or ``"copy"``).

    ``config`` is ccxt's (``enableRateLimit``, ``urls``, ``options`` ...), without
    credentials. The daemon is asked once here, for the public API key. In copy
    mode ``watch=False`` does not watch the key.
    """
    handle = KeyHandle(broker, key, mode, watch=watch)
    return Backpack(_config(config, handle), key_handle=handle)


def async_backpack(
    config: Mapping[str, Any] | None = None,
    *,
    broker: BrokerClient,
    key: str | KeyRef,
    mode: Mode = "sign",
    watch: bool = True,
) -> AsyncBackpack:
    """The same for ``ccxt.async_support``; ``await exchange.close()`` when done.

    The one call made here (the public API key) blocks; every later call to the
    daemon runs in a worker thread.
    """
    handle = KeyHandle(broker, key, mode, watch=watch)
    return AsyncBackpack(_config(config, handle), key_handle=handle)
