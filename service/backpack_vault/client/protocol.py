"""The daemon's worker API as both clients speak it: URLs, bodies, answers -> copies or errors.

Pure apart from reading ``httpx.Response`` objects already received: the blocking
:class:`~backpack_vault.client.broker.BrokerClient` and the asyncio
:class:`~backpack_vault.client.aio.AsyncBrokerClient` send, this module decides.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import quote

import httpx

from backpack_vault.backpack.instructions import is_state_changing
from backpack_vault.backpack.signing import DEFAULT_WINDOW_MS, Params, Signer
from backpack_vault.config import Secret
from backpack_vault.core.keys import KeyRef
from backpack_vault.core.verdicts import is_key_rejection, parse_answer
from backpack_vault.errors import (
    AccessDenied,
    BrokerUnavailable,
    CopyUnavailable,
    InvalidInput,
    KeyNotUsable,
    NotAuthenticated,
    RateLimited,
    ServiceError,
    UnknownKey,
    not_usable,
)

__all__ = [
    "REFRESH_FRACTION",
    "REPORT_EVERY_S",
    "Copy",
    "Reports",
    "error_from",
    "is_rejection",
    "key_url",
    "parse_copy",
    "ref",
    "rejection_reason",
    "request_params",
    "sign_body",
    "tls_context",
    "unreachable",
    "unwrapped",
]

REFRESH_FRACTION: Final = 2 / 3
REPORT_EVERY_S: Final = 10.0  # a key's rejections are reported at most this often
_REASON_CHARS: Final = 200


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


def ref(key: str | KeyRef) -> KeyRef:
    return key if isinstance(key, KeyRef) else KeyRef.parse(key)


def key_url(base: str, key: KeyRef, suffix: str = "") -> str:
    return f"{base}/v1/keys/{quote(key.subaccount)}/{quote(key.name)}{suffix}"


def sign_body(
    instruction: str, params: Params | None, timestamp: int | None, window: int | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"instruction": instruction, "params": params or {}}
    if timestamp is not None:
        body["timestamp"] = timestamp
    if window is not None:
        body["window"] = window
    return body


def tls_context(verify: str | bool | ssl.SSLContext) -> ssl.SSLContext:
    """What verifies the daemon and Vault: a CA bundle's path, True (httpx's own trust:
    certifi, or ``SSL_CERT_FILE``), False (nothing), or a context of the caller's."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if isinstance(verify, str):  # httpx deprecates verify=<path>: a context instead
        return ssl.create_default_context(cafile=verify)
    return httpx.create_ssl_context(verify=verify)


def unreachable(what: str, exc: Exception) -> BrokerUnavailable:
    return BrokerUnavailable(f"{what} is unreachable: {type(exc).__name__}")


def answer_json(response: httpx.Response, key: str, base: str) -> Any:
    """The JSON of a daemon answer, or our error for it."""
    if not response.is_success:
        raise error_from(response, key)
    try:
        return response.json()
    except ValueError:
        raise BrokerUnavailable(f"the broker at {base} answered with invalid JSON") from None


def error_from(response: httpx.Response, key: str) -> ServiceError:  # noqa: PLR0911 - a table
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


def rejection_reason(response: httpx.Response) -> str:
    """What a report says of Backpack's answer: its status, code and message, short."""
    try:
        body = response.json()
        detail = f"{body.get('code', '')} {body.get('message', '')}".strip()
    except (ValueError, AttributeError):
        detail = ""
    return f"Backpack answered {response.status_code} {detail}".strip()[:_REASON_CHARS]


class Reports:
    """When to tell the daemon of a rejection: at most once per ``every_s``; thread-safe."""

    def __init__(self, every_s: float, clock: Callable[[], float]) -> None:
        self._every_s = every_s
        self._clock = clock
        self._last = float("-inf")
        self._lock = threading.Lock()

    def due(self) -> bool:
        """True (and noted) when it is time to report; False when one went out moments ago."""
        with self._lock:
            now = self._clock()
            if now - self._last < self._every_s:
                return False
            self._last = now
            return True


def says_token_dead(error: ServiceError) -> bool:
    """A daemon refusal that may mean the worker's token is dead (401 always; 403 maybe)."""
    return isinstance(error, (NotAuthenticated, AccessDenied))


def unwrapped(key: KeyRef, status: int, content: bytes) -> dict[str, Any]:
    """The data of Vault's answer (``status``, body ``content``) to ``sys/wrapping/unwrap``."""
    if status in (HTTPStatus.BAD_REQUEST, HTTPStatus.FORBIDDEN):
        raise CopyUnavailable(
            f"the copy of {key} could not be unwrapped: its wrapping token was already used, "
            "expired or was revoked (the key may have been retired or revoked)"
        )
    if status != HTTPStatus.OK:
        raise BrokerUnavailable(f"Vault answered {status} to unwrap")
    try:
        data = json.loads(content)["data"]
    except (ValueError, KeyError, TypeError):
        raise BrokerUnavailable("Vault's unwrap answer holds no data") from None
    if not isinstance(data, dict):
        raise BrokerUnavailable("Vault's unwrap answer holds no data")
    return data


def parse_copy(key: KeyRef, data: dict[str, Any], *, received_at: float) -> Copy:
    """A :class:`Copy` from the unwrapped data."""
    try:
        api_secret = Secret(str(data["api_secret"]))
        api_key = str(data["api_key"])
        expires_at = datetime.fromisoformat(str(data["expires_at"])).timestamp()
        return Copy(
            key=key,
            api_key=api_key,
            api_secret=api_secret,
            version=int(data["version"]),
            read_only=bool(data["read_only"]),
            expires_at=expires_at,
            received_at=received_at,
            signer=Signer(api_key, api_secret),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ServiceError(f"the copy of {key} is malformed ({type(exc).__name__})") from None


def request_params(request: httpx.Request) -> Params | None:
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
