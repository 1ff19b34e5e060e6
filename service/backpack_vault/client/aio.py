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
Copy mode keeps its copy as the blocking auth does (the rules of
:mod:`backpack_vault.client.copies`, :class:`AsyncCopyKeeper`): refreshed at two
thirds of its lifetime, the key watched by an asyncio task (retired or revoked: every
request raises at once; rotated: the next one fetches the successor), and after a
reported rejection the request waits up to ``confirm_s`` for the daemon's verdict.
Nothing here blocks the event loop. ``await broker.aclose()`` ends the watch tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from typing import Any, Final, Literal, Self

import httpx

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import DEFAULT_WINDOW_MS, Params
from backpack_vault.client.copies import AsyncCopyKeeper, Verdict
from backpack_vault.client.protocol import (
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
from backpack_vault.client.vault_auth import AsyncVaultLogin, VaultAuth, client_env
from backpack_vault.client.watch import BACKOFF_S, FINAL_STATUSES, READ_TIMEOUT_S, AsyncWatch
from backpack_vault.config import Secret
from backpack_vault.core.keys import KeyRef
from backpack_vault.errors import (
    AccessDenied,
    BrokerUnavailable,
    ConfigError,
    RateLimited,
    ServiceError,
    not_usable,
)

__all__ = ["CONFIRM_S", "AsyncBrokerAuth", "AsyncBrokerClient", "AsyncCopyKeeper"]

CONFIRM_S: Final = 3.0  # after a report, how long a request waits for the daemon's verdict


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
        verify: str | bool | ssl.SSLContext = True,
    ) -> None:
        if auth is None:
            if token is None:
                raise ConfigError("AsyncBrokerClient needs auth=VaultAuth... or token=")
            auth = VaultAuth.token(token)
        self.url = url.rstrip("/")
        self.vault_addr = vault_addr.rstrip("/")
        self._http = http or httpx.AsyncClient(timeout=timeout, verify=tls_context(verify))
        self._owns_http = http is None
        self.login = AsyncVaultLogin(auth, self.vault_addr, self._http)
        self._clock = clock
        self._tasks: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()

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
        """End the watch tasks of this client's auths and the login's renewal, then the client."""
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.login.aclose()
        if self._owns_http:
            await self._http.aclose()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)

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
        return parse_copy(
            ref, unwrapped(ref, response.status_code, response.content), received_at=self._clock()
        )

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

    def watch(
        self,
        key: str | KeyRef,
        *,
        last_event_id: str | None = None,
        read_timeout_s: float = READ_TIMEOUT_S,
        backoff_s: tuple[float, float] = BACKOFF_S,
    ) -> AsyncWatch:
        """The key's status events (``async for``); reconnects with ``Last-Event-ID``; a
        refusal is raised. ``await watch.aclose()`` (or cancelling the task) ends it."""
        ref = _ref(key)

        async def headers() -> dict[str, str]:
            return {"X-Vault-Token": (await self.login.token()).reveal()}

        return AsyncWatch(
            self._http,
            key_url(self.url, ref, "/watch"),
            headers,
            error_for=lambda response: error_from(response, str(ref)),
            last_event_id=last_event_id,
            backoff_s=backoff_s,
            read_timeout_s=read_timeout_s,
        )

    def auth(
        self,
        key: str | KeyRef,
        mode: Literal["copy", "sign"] = "copy",
        *,
        window: int | None = None,
        watch: bool = True,
        confirm_s: float = CONFIRM_S,
    ) -> AsyncBrokerAuth:
        """An ``httpx.Auth`` for an ``httpx.AsyncClient`` that signs with ``key``; in copy
        mode it watches the key (``watch=False``: it does not) and after a reported
        rejection waits up to ``confirm_s`` for the daemon's verdict."""
        if mode not in ("copy", "sign"):
            raise ConfigError(f"mode must be 'copy' or 'sign', not {mode!r}")
        return AsyncBrokerAuth(
            self,
            _ref(key),
            mode,
            window=window,
            clock=self._clock,
            watch=watch,
            confirm_s=confirm_s,
        )


class AsyncBrokerAuth(httpx.Auth):
    """Signs Backpack requests of an ``httpx.AsyncClient`` through an AsyncBrokerClient.

    As :class:`~backpack_vault.client.broker.BrokerAuth`, on the event loop: copy mode
    keeps an :class:`AsyncCopyKeeper` (:attr:`copies`); a rejection by Backpack is
    reported (at most every ``REPORT_EVERY_S``) and, in copy mode, confirmed.
    """

    requires_response_body = True

    def __init__(
        self,
        broker: AsyncBrokerClient,
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
        self.copies = (
            AsyncCopyKeeper(broker, key, watch=watch, clock=clock) if mode == "copy" else None
        )
        self._reports = Reports(REPORT_EVERY_S, clock)

    @property
    def watching(self) -> bool:
        """Whether the key's watch stream is connected now (copy mode)."""
        return self.copies is not None and self.copies.watching

    @property
    def unusable(self) -> str | None:
        """``"retired"`` or ``"revoked"`` once the daemon said so (watch or info), else None."""
        return self.copies.cut_off if self.copies is not None else None

    async def current_copy(self) -> Copy:
        if self.copies is None:
            raise ConfigError("a sign-mode auth holds no copy")
        return await self.copies.current()

    async def aclose(self) -> None:
        """Stop watching the key (its task is cancelled)."""
        if self.copies is not None:
            await self.copies.aclose()

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        raise RuntimeError("AsyncBrokerAuth serves httpx.AsyncClient; use BrokerClient.auth")
        yield request  # pragma: no cover - makes this a generator

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        signer = await self._sign(request)
        response = yield request
        await response.aread()  # httpx reads it only for the async_auth_flow it ships
        if not is_rejection(response):
            return
        refused = request.headers.get("X-API-Key", "")
        if await self._rejected(response, signer) == "rotated" or self.copies is None:
            # The name may have switched keys while Backpack refused this one (a failover
            # to its standby): Backpack did not act on the request, so if the daemon now
            # signs with another key, that key sends it once more.
            try:
                await self._sign(request)
            except ServiceError:
                return  # refused now (revoked, retired): Backpack's answer stands
            if request.headers.get("X-API-Key", "") != refused:
                yield request

    async def _sign(self, request: httpx.Request) -> Copy | None:
        instruction = lookup(request.method, request.url.path).instruction
        params = request_params(request)
        if self.copies is None:
            headers = await self.broker.sign(self.key, instruction, params, window=self.window)
            request.headers.update(headers)
            return None
        copy = await self.copies.current()
        stamp = int(self._clock() * 1000)
        request.headers.update(
            copy.headers(instruction, params, stamp, self.window or DEFAULT_WINDOW_MS)
        )
        return copy

    async def _rejected(self, response: httpx.Response, signer: Copy | None) -> Verdict:
        if not self._reports.due():
            return None  # reported (and confirmed) moments ago: this answer goes back as is
        with contextlib.suppress(RateLimited, BrokerUnavailable):
            await self.broker.report(self.key, rejection_reason(response))
        if self.copies is None:
            return None  # the daemon refuses the next signature once it has revoked the key
        verdict = await self.copies.verdict(
            self._confirm_s, signer=signer, monotonic=self._monotonic
        )
        if verdict in FINAL_STATUSES:
            raise not_usable(str(self.key), str(verdict))
        return verdict
