"""The asyncio client: ``AsyncBrokerClient`` and its ``httpx.Auth`` for ``httpx.AsyncClient``.

::

    async with AsyncBrokerClient.from_env() as broker:
        auth = broker.auth("scalper/bot-a", mode="copy")        # or mode="sign"
        async with httpx.AsyncClient(base_url=BACKPACK, auth=auth) as client:
            await client.get("/api/v1/capital")
        async for event in broker.watch("scalper/bot-a"):       # reconnects by itself
            if event.final:
                break

The same calls, answers and errors as :class:`~backpack_vault.client.broker.BrokerClient`
(the URLs, bodies and the error table are :mod:`backpack_vault.client.protocol`'s), the
same Vault auto-auth (:class:`~backpack_vault.client.vault_auth.AsyncVaultLogin`).
Copy mode fetches a copy, signs locally and fetches a fresh one at two thirds of its
lifetime; a ``retired`` or ``revoked`` answer from the daemon is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Mapping
from http import HTTPStatus
from typing import Any, Literal, Self

import httpx

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import DEFAULT_WINDOW_MS, Params
from backpack_vault.client.protocol import (
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
from backpack_vault.client.vault_auth import AsyncVaultLogin, VaultAuth, client_env
from backpack_vault.client.watch import BACKOFF_S, READ_TIMEOUT_S, WatchEvent, parse_sse
from backpack_vault.config import Secret
from backpack_vault.core.keys import KeyRef
from backpack_vault.errors import (
    AccessDenied,
    BrokerUnavailable,
    CallerError,
    ConfigError,
    NotFound,
    ServiceError,
)

__all__ = ["AsyncBrokerAuth", "AsyncBrokerClient"]


class AsyncBrokerClient:
    """Talks to the daemon from asyncio with the worker's own Vault login."""

    def __init__(
        self,
        url: str,
        *,
        vault_addr: str,
        auth: VaultAuth | None = None,
        token: str | Secret | None = None,
        http: httpx.AsyncClient | None = None,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        verify: str | bool = True,
    ) -> None:
        if auth is None:
            if token is None:
                raise ConfigError("AsyncBrokerClient needs auth=VaultAuth... or token=")
            auth = VaultAuth.token(token)
        self.url = url.rstrip("/")
        self.vault_addr = vault_addr.rstrip("/")
        self._http = http or httpx.AsyncClient(timeout=timeout, verify=verify)
        self._owns_http = http is None
        self.login = AsyncVaultLogin(auth, self.vault_addr, self._http)
        self._clock = clock

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, url: str | None = None, **kwargs: Any
    ) -> Self:
        """As :meth:`BrokerClient.from_env <backpack_vault.client.broker.BrokerClient.from_env>`."""
        found = client_env(os.environ if environ is None else environ, url)
        return cls(
            found.url, vault_addr=found.vault_addr, auth=found.auth, verify=found.verify, **kwargs
        )

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def _call(self, method: str, key: KeyRef, suffix: str, body: Any = None) -> Any:
        for attempt in (1, 2):
            token = await self.login.token()
            try:
                response = await self._http.request(
                    method,
                    key_url(self.url, key, suffix),
                    json=body,
                    headers={"X-Vault-Token": token.reveal()},
                )
            except httpx.HTTPError as exc:
                raise unreachable(f"the broker at {self.url}", exc) from None
            try:
                return answer_json(response, str(key), self.url)
            except ServiceError as exc:
                if attempt == 2 or not says_token_dead(exc):  # noqa: PLR2004 - the second try
                    raise
                if isinstance(exc, AccessDenied) and await self.login.is_alive(token):
                    raise
                if not await self.login.dead(token):
                    raise
        raise AssertionError  # pragma: no cover - the loop returns or raises

    async def copy(self, key: str | KeyRef) -> Copy:
        """Fetch a wrapped copy and unwrap it at Vault (single use)."""
        ref = _ref(key)
        handout = await self._call("POST", ref, "/copy")
        wrap_token = Secret(str(handout["wrap_token"]))
        try:
            response = await self._http.post(
                f"{self.vault_addr}/v1/sys/wrapping/unwrap",
                headers={"X-Vault-Token": wrap_token.reveal()},
            )
        except httpx.HTTPError as exc:
            raise unreachable(f"Vault at {self.vault_addr}", exc) from None
        return parse_copy(ref, unwrapped(ref, response), received_at=self._clock())

    async def sign(
        self,
        key: str | KeyRef,
        instruction: str,
        params: Params | None = None,
        timestamp: int | None = None,
        window: int | None = None,
    ) -> dict[str, str]:
        body = sign_body(instruction, params, timestamp, window)
        answer = await self._call("POST", _ref(key), "/sign", body)
        return {str(k): str(v) for k, v in answer["headers"].items()}

    async def info(self, key: str | KeyRef) -> dict[str, Any]:
        return dict(await self._call("GET", _ref(key), ""))

    async def report(self, key: str | KeyRef, reason: str) -> None:
        await self._call("POST", _ref(key), "/report", {"reason": reason})

    async def watch(
        self,
        key: str | KeyRef,
        *,
        last_event_id: str | None = None,
        read_timeout_s: float = READ_TIMEOUT_S,
        backoff_s: tuple[float, float] = BACKOFF_S,
    ) -> AsyncGenerator[WatchEvent, None]:
        """The key's status events; reconnects with ``Last-Event-ID``; a refusal is raised."""
        ref = _ref(key)
        url = key_url(self.url, ref, "/watch")
        timeout = httpx.Timeout(10.0, read=read_timeout_s)
        first, cap = backoff_s
        delay = first
        while True:
            headers = {
                "Accept": "text/event-stream",
                "X-Vault-Token": (await self.login.token()).reveal(),
            }
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            try:
                async with self._http.stream("GET", url, headers=headers, timeout=timeout) as a:
                    if a.status_code == HTTPStatus.OK:
                        async for event in _events(a.aiter_lines()):
                            delay = first
                            if event.id is not None:
                                last_event_id = event.id
                            yield event
                    else:
                        await a.aread()
                        error = error_from(a, str(ref))
                        if isinstance(error, CallerError):
                            raise error
                        if a.status_code == HTTPStatus.NOT_FOUND:
                            raise NotFound(f"the daemon serves no watch stream at {url}")
            except httpx.TransportError:
                pass  # refused, reset, or silent past read_timeout_s: connect again
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)

    def auth(
        self,
        key: str | KeyRef,
        mode: Literal["copy", "sign"] = "copy",
        *,
        window: int | None = None,
    ) -> AsyncBrokerAuth:
        if mode not in ("copy", "sign"):
            raise ConfigError(f"mode must be 'copy' or 'sign', not {mode!r}")
        return AsyncBrokerAuth(self, _ref(key), mode, window=window, clock=self._clock)


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[WatchEvent]:
    """parse_sse over an async line stream, one event at a time."""
    block: list[str] = []
    async for line in lines:
        block.append(line)
        if not line:
            for event in parse_sse(block):
                yield event
            block = []


class AsyncBrokerAuth(httpx.Auth):
    """Signs Backpack requests of an ``httpx.AsyncClient`` through an AsyncBrokerClient."""

    requires_response_body = True

    def __init__(
        self,
        broker: AsyncBrokerClient,
        key: KeyRef,
        mode: Literal["copy", "sign"],
        *,
        window: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.key = key
        self.mode = mode
        self.window = window
        self._clock = clock
        self._lock = asyncio.Lock()
        self._copy: Copy | None = None

    async def current_copy(self) -> Copy:
        async with self._lock:
            now = self._clock()
            if self._copy is None or self._copy.refresh_due(now):
                try:
                    self._copy = await self.broker.copy(self.key)
                except BrokerUnavailable:
                    if self._copy is None or self._copy.expired(now):
                        raise
            return self._copy

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        raise RuntimeError("AsyncBrokerAuth serves httpx.AsyncClient; use BrokerClient.auth")
        yield request  # pragma: no cover - makes this a generator

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        instruction = lookup(request.method, request.url.path).instruction
        params = request_params(request)
        if self.mode == "sign":
            headers = await self.broker.sign(self.key, instruction, params, window=self.window)
        else:
            copy = await self.current_copy()
            stamp = int(self._clock() * 1000)
            headers = copy.headers(instruction, params, stamp, self.window or DEFAULT_WINDOW_MS)
        request.headers.update(headers)
        response = yield request
        if is_rejection(response):
            with contextlib.suppress(ServiceError):
                await self.broker.report(self.key, f"Backpack answered {response.status_code}")
            async with self._lock:
                self._copy = None  # the next request fetches a copy: refused once revoked
