"""The client for trading bots: ``BrokerClient`` and its ``httpx.Auth``; httpx and pure modules.

::

    broker = BrokerClient("http://backpack-vault:8280", vault_addr=..., token=...)
    auth = broker.auth("scalper/bot-a", mode="copy")   # or mode="sign"
    client = httpx.Client(base_url="https://api.backpack.exchange", auth=auth)
    client.get("/api/v1/capital")                      # instruction from method + path

``copy`` mode fetches a wrapped copy from the daemon, unwraps it at Vault
directly (the daemon never sees the plain copy leave), signs locally and
fetches a fresh copy at about two thirds of its lifetime. ``sign`` mode asks
the daemon for the four headers of every request; the secret never reaches
the bot. Either way a Backpack rejection is reported to the daemon, which
checks the key at once. Its errors (KeyRevoked, AccessDenied, BrokerUnavailable, ...)
are in :mod:`backpack_vault.errors`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, Literal, Self
from urllib.parse import quote

import httpx

from backpack_vault.backpack.instructions import is_state_changing, lookup
from backpack_vault.backpack.signing import DEFAULT_WINDOW_MS, Params, Signer
from backpack_vault.config import Secret, read_secret_file
from backpack_vault.core.keys import KeyRef
from backpack_vault.core.verdicts import is_key_rejection, parse_answer
from backpack_vault.errors import (
    AccessDenied,
    BrokerUnavailable,
    ConfigError,
    CopyUnavailable,
    InvalidInput,
    KeyNotUsable,
    KeyPending,
    KeyRetired,
    KeyRevoked,
    NotAuthenticated,
    RateLimited,
    ServiceError,
    UnknownKey,
    not_usable,
)

__all__ = [
    "AccessDenied",
    "BrokerAuth",
    "BrokerClient",
    "BrokerUnavailable",
    "Copy",
    "CopyUnavailable",
    "KeyPending",
    "KeyRetired",
    "KeyRevoked",
    "is_rejection",
]

REFRESH_FRACTION: Final = 2 / 3
REPORT_EVERY_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class Copy:
    """An unwrapped copy of a key; ``api_secret`` stays a Secret, ``expires_at`` is epoch s."""

    key: KeyRef
    api_key: str
    api_secret: Secret
    version: int
    read_only: bool
    expires_at: float
    received_at: float
    signer: Signer = field(repr=False, compare=False)

    def refresh_due(self, now: float) -> bool:
        """At about two thirds of the copy's lifetime it is time to fetch a fresh one."""
        lifetime = max(self.expires_at - self.received_at, 0.0)
        return now >= self.received_at + lifetime * REFRESH_FRACTION

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def headers(
        self,
        instruction: str,
        params: Params | None,
        timestamp_ms: int,
        window_ms: int = DEFAULT_WINDOW_MS,
    ) -> dict[str, str]:
        if self.read_only and is_state_changing(instruction):
            raise AccessDenied(
                str(self.key),
                f"key {self.key} is read-only: it cannot sign {instruction}, which changes "
                "account state",
                grant=f"sign/{instruction}",
            )
        return self.signer.headers(instruction, params, timestamp_ms, window_ms)


def _ref(key: str | KeyRef) -> KeyRef:
    return key if isinstance(key, KeyRef) else KeyRef.parse(key)


def _error_from(response: httpx.Response, key: str) -> ServiceError:  # noqa: PLR0911 - a table
    """Our exception for a daemon error answer (the body's code picks the class)."""
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        error, code = {}, ""
        message = f"the broker answered {response.status_code} without an error body"
    status = response.status_code
    if status == HTTPStatus.UNAUTHORIZED:
        return NotAuthenticated(message)
    if status == HTTPStatus.FORBIDDEN:
        return AccessDenied(key, message)
    if status == HTTPStatus.NOT_FOUND and code == UnknownKey.code:
        return UnknownKey(key)
    if status == HTTPStatus.CONFLICT and code == KeyNotUsable.code:
        key_status = str(error.get("status", ""))
        return not_usable(key, key_status)
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        return RateLimited(message)
    if status == HTTPStatus.UNPROCESSABLE_ENTITY:
        return InvalidInput(message)
    if status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        return BrokerUnavailable(f"the broker cannot answer now ({status}): {message}")
    return ServiceError(f"the broker answered {status}: {message}")


def is_rejection(response: httpx.Response) -> bool:
    """Whether a Backpack answer means the key itself was refused (not a clock or order
    problem): the verdict table the daemon's checks use, for an ordinary request."""
    return is_key_rejection(parse_answer(response.status_code, response.text))


class BrokerClient:
    """Talks to the backpack-vault daemon with the worker's own Vault token."""

    def __init__(
        self,
        url: str,
        *,
        vault_addr: str,
        token: str | Secret | None = None,
        token_file: str | Path | None = None,
        http: httpx.Client | None = None,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if token is None and token_file is None:
            raise ConfigError("BrokerClient needs the worker's Vault token: token= or token_file=")
        self.url = url.rstrip("/")
        self.vault_addr = vault_addr.rstrip("/")
        self._token = Secret(token) if isinstance(token, str) else token
        self._token_file = Path(token_file) if token_file is not None else None
        self._http = http or httpx.Client(timeout=timeout)
        self._owns_http = http is None
        self._clock = clock

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _vault_token(self) -> Secret:
        if self._token is not None:
            return self._token
        if self._token_file is None:  # pragma: no cover - __init__ requires one of the two
            raise ConfigError("no Vault token and no token file")
        # Read each time: Vault Agent rewrites the file when it renews or logs in again.
        return read_secret_file(self._token_file, "the token file")

    def _call(self, method: str, key: KeyRef, suffix: str, body: Any = None) -> Any:
        path = f"/v1/keys/{quote(key.subaccount)}/{quote(key.name)}{suffix}"
        try:
            response = self._http.request(
                method,
                f"{self.url}{path}",
                json=body,
                headers={"X-Vault-Token": self._vault_token().reveal()},
            )
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(
                f"the broker at {self.url} is unreachable: {type(exc).__name__}"
            ) from None
        if not response.is_success:
            raise _error_from(response, str(key))
        try:
            return response.json()
        except ValueError:
            raise BrokerUnavailable(
                f"the broker at {self.url} answered with invalid JSON"
            ) from None

    # -- the four calls -------------------------------------------------------------------

    def copy(self, key: str | KeyRef) -> Copy:
        """Fetch a wrapped copy and unwrap it at Vault (single use)."""
        ref = _ref(key)
        handout = self._call("POST", ref, "/copy")
        wrap_token = Secret(str(handout["wrap_token"]))
        data = self._unwrap(ref, wrap_token)
        try:
            api_secret = Secret(str(data["api_secret"]))
            api_key = str(data["api_key"])
            expires_at = datetime.fromisoformat(str(data["expires_at"])).timestamp()
            return Copy(
                key=ref,
                api_key=api_key,
                api_secret=api_secret,
                version=int(data["version"]),
                read_only=bool(data["read_only"]),
                expires_at=expires_at,
                received_at=self._clock(),
                signer=Signer(api_key, api_secret),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(f"the copy of {ref} is malformed ({type(exc).__name__})") from None

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
        if response.status_code in (HTTPStatus.BAD_REQUEST, HTTPStatus.FORBIDDEN):
            raise CopyUnavailable(
                f"the copy of {ref} could not be unwrapped: its wrapping token was already used, "
                "expired or was revoked (the key may have been retired or revoked)"
            )
        if response.status_code != HTTPStatus.OK:
            raise BrokerUnavailable(f"Vault answered {response.status_code} to unwrap")
        try:
            data = response.json()["data"]
        except (ValueError, KeyError, TypeError):
            raise BrokerUnavailable("Vault's unwrap answer holds no data") from None
        if not isinstance(data, dict):
            raise BrokerUnavailable("Vault's unwrap answer holds no data")
        return data

    def sign(
        self,
        key: str | KeyRef,
        instruction: str,
        params: Params | None = None,
        timestamp: int | None = None,
        window: int | None = None,
    ) -> dict[str, str]:
        """The four Backpack headers for one request, signed by the daemon."""
        body: dict[str, Any] = {"instruction": instruction, "params": params or {}}
        if timestamp is not None:
            body["timestamp"] = timestamp
        if window is not None:
            body["window"] = window
        answer = self._call("POST", _ref(key), "/sign", body)
        return {str(k): str(v) for k, v in answer["headers"].items()}

    def info(self, key: str | KeyRef) -> dict[str, Any]:
        """The key's status and metadata (never its secret)."""
        return dict(self._call("GET", _ref(key), ""))

    def report(self, key: str | KeyRef, reason: str) -> None:
        """Tell the daemon Backpack rejected the key; it checks the key at once."""
        self._call("POST", _ref(key), "/report", {"reason": reason})

    def auth(
        self,
        key: str | KeyRef,
        mode: Literal["copy", "sign"] = "copy",
        *,
        window: int | None = None,
    ) -> BrokerAuth:
        """An ``httpx.Auth`` that signs every Backpack request with ``key``."""
        if mode not in ("copy", "sign"):
            raise ConfigError(f"mode must be 'copy' or 'sign', not {mode!r}")
        return BrokerAuth(self, _ref(key), mode, window=window, clock=self._clock)


def _params(request: httpx.Request) -> Params | None:
    """What Backpack signs for this request: the JSON body if any, else the query."""
    if request.content:
        try:
            body = json.loads(request.content)
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput("the request body is not JSON, so it cannot be signed") from None
        if isinstance(body, dict):
            return body
        if isinstance(body, list) and all(isinstance(item, dict) for item in body):
            return body
        raise InvalidInput("the request body must be a JSON object (or a list for batch orders)")
    return dict(request.url.params.multi_items()) or None


class BrokerAuth(httpx.Auth):
    """Signs Backpack requests through a BrokerClient; thread-safe.

    It talks to the daemon with a blocking ``httpx.Client``, so with an
    ``httpx.AsyncClient`` each signature blocks the event loop for one round trip.

    A rejected request is reported to the daemon (at most every ``REPORT_EVERY_S``
    seconds) and, in copy mode, drops the copy so the next request fetches a new
    one, which fails with KeyRevoked once the daemon confirms the revocation.
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
    ) -> None:
        self.broker = broker
        self.key = key
        self.mode = mode
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._copy: Copy | None = None
        self._last_report = float("-inf")

    def current_copy(self) -> Copy:
        """The copy in use, fetched anew at two thirds of its lifetime."""
        with self._lock:
            now = self._clock()
            if self._copy is None or self._copy.refresh_due(now):
                try:
                    self._copy = self.broker.copy(self.key)
                except BrokerUnavailable:
                    # Keep signing with the old copy while it is valid; the daemon may be back soon.
                    if self._copy is None or self._copy.expired(now):
                        raise
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

    def _rejected(self, response: httpx.Response) -> None:
        with self._lock:
            self._copy = None
            now = self._clock()
            if now - self._last_report < REPORT_EVERY_S:
                return
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
