"""Signed requests: headers, clock, key and signature checked as ``docs/backpack-api.md`` says.

The signing string is rebuilt from the raw decoded query text (GET/DELETE) and
the JSON body (POST/PATCH/DELETE) with the same code the daemon signs with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import DEFAULT_WINDOW_MS, MAX_WINDOW_MS, signing_string, verify
from backpack_vault.errors import InvalidInput
from backpack_vault.testing.answers import (
    EXPIRED_ANSWER,
    INVALID_SIGNATURE_ANSWER,
    MAINTENANCE_ANSWER,
    READ_ONLY_ANSWER,
    UNKNOWN_KEY_ANSWER,
    Refused,
    bad_request,
)
from backpack_vault.testing.faults import Faults
from backpack_vault.testing.gateway import Gateway

__all__ = ["Call", "authenticate"]


@dataclass(frozen=True, slots=True)
class Call:
    """A verified signed request."""

    api_key: str
    instruction: str
    query: dict[str, str]
    body: Any
    now_ms: int

    def params(self) -> dict[str, Any]:
        """Query pairs and body fields together (a body field wins)."""
        return dict(self.query) | (self.body if isinstance(self.body, dict) else {})


async def authenticate(request: Request, gate: Gateway, faults: Faults, api_key: str) -> Call:
    """Check headers, clock, key and signature in that order; raise Refused."""
    if faults.maintenance:
        raise Refused(MAINTENANCE_ANSWER)
    # Starlette answers HEAD on every GET route; it is signed like the GET.
    method = "GET" if request.method == "HEAD" else request.method
    endpoint = lookup(method, request.url.path)
    headers = request.headers
    if not api_key or "x-signature" not in headers or "x-timestamp" not in headers:
        raise bad_request("Missing X-API-Key, X-Signature or X-Timestamp header")
    timestamp = _header_int(headers.get("x-timestamp"), "X-Timestamp")
    window = _header_int(headers.get("x-window", str(DEFAULT_WINDOW_MS)), "X-Window")
    now_ms = gate.server_ms(faults)
    # A window over the maximum, or a timestamp a whole window in the future, get the
    # expired answer too: both are undocumented (docs/backpack-api.md section 5): our choice.
    if window > MAX_WINDOW_MS or now_ms > timestamp + window or timestamp > now_ms + window:
        raise Refused(EXPIRED_ANSWER)
    entry = gate.state.key(api_key)
    if entry is None or entry[1]:
        raise Refused(UNKNOWN_KEY_ANSWER)
    query, body = await _params(request, batch=endpoint.batch)
    try:
        message = _message(endpoint.instruction, query, body, timestamp, window)
    except InvalidInput as exc:
        raise bad_request(f"Parameters cannot be signed: {exc.message}") from None
    if not verify(api_key, message, headers["x-signature"].strip()):
        raise Refused(INVALID_SIGNATURE_ANSWER)
    if endpoint.state_changing and entry[0]:
        raise Refused(READ_ONLY_ANSWER)
    return Call(api_key, endpoint.instruction, query, body, now_ms)


def _header_int(text: str | None, name: str) -> int:
    try:
        value = int(text or "")
    except ValueError:
        raise bad_request(f"Invalid {name} header") from None
    if value < 1:
        raise bad_request(f"Invalid {name} header")
    return value


async def _params(request: Request, *, batch: bool) -> tuple[dict[str, str], Any]:
    """Query pairs (raw decoded text) and the JSON body; raise Refused when malformed."""
    pairs = request.query_params.multi_items()
    query = dict(pairs)
    if len(query) != len(pairs):
        raise bad_request("Duplicate query parameter")
    body: Any = None
    raw = await request.body() if request.method not in ("GET", "HEAD") else b""
    if raw.strip():
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise bad_request("Body is not valid JSON") from None
    if batch and not (isinstance(body, list) and body and all(isinstance(o, dict) for o in body)):
        raise bad_request("Body must be an array of orders")
    if not batch and body is not None and not isinstance(body, dict):
        raise bad_request("Body must be a JSON object")
    return query, body


def _message(
    instruction: str, query: Mapping[str, str], body: Any, timestamp: int, window: int
) -> str:
    """The signing string: sorted query pairs, then the body's pairs (docs/backpack-api.md §4)."""
    if not body:
        return signing_string(instruction, query, timestamp, window)
    if not query:
        return signing_string(instruction, body, timestamp, window)
    tail = f"&timestamp={timestamp}&window={window}"
    head = signing_string(instruction, query, timestamp, window).removesuffix(tail)
    rest = signing_string(instruction, body, timestamp, window).removesuffix(tail)
    return head + rest.removeprefix(f"instruction={instruction}") + tail
