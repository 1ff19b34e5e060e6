"""Backpack request signing: a pure, sans-IO core.

``instruction=<i>[&k=v ... sorted]&timestamp=<t>&window=<w>`` is signed with
Ed25519 and sent as four headers. No clock, network or environment is read
here: the timestamp is an argument, so fixed vectors test it exactly.

Values are signed exactly as sent: booleans as ``true``/``false``, integers as
digits, strings raw (Backpack's decimals are JSON strings: ``"180.50"`` stays
``180.50``). Floats, ``None``, nested objects, arrays and empty strings are
refused: their wire text is unstable or their signing is undocumented.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping, Sequence
from typing import Final

import nacl.exceptions
import nacl.signing

from backpack_vault.config import Secret
from backpack_vault.core.keys import parse_seed
from backpack_vault.errors import InvalidInput, KeyMismatch

__all__ = [
    "DEFAULT_WINDOW_MS",
    "MAX_WINDOW_MS",
    "Params",
    "Signer",
    "sign_request",
    "signing_string",
    "verify",
]

DEFAULT_WINDOW_MS: Final = 5000
MAX_WINDOW_MS: Final = 60000

Scalar = str | int | bool
Params = Mapping[str, Scalar] | Sequence[Mapping[str, Scalar]]


def _value(key: str, value: object) -> str:
    # bool before int: bool is a subclass of int, and Backpack wants lowercase.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if not value:
            raise InvalidInput(f"parameter {key!r} is empty: omit it instead")
        return value
    if isinstance(value, float):
        raise InvalidInput(
            f'parameter {key!r} is a float: send decimals as strings (e.g. "180.50") so the '
            "signed text is exactly what is sent"
        )
    if value is None:
        raise InvalidInput(f"parameter {key!r} is null: omit it instead")
    raise InvalidInput(
        f"parameter {key!r} is a {type(value).__name__}: only strings, integers and booleans "
        "can be signed"
    )


def _pairs(instruction: str, params: Mapping[str, object]) -> str:
    if not isinstance(params, Mapping):
        raise InvalidInput("params must be an object (or a list of objects for batch orders)")
    parts = [f"instruction={instruction}"]
    parts.extend(f"{k}={_value(k, params[k])}" for k in sorted(params))
    return "&".join(parts)


def signing_string(
    instruction: str, params: Params | None, timestamp_ms: int, window_ms: int
) -> str:
    """The exact UTF-8 text Backpack expects to be signed."""
    if not instruction or not instruction.isascii() or not instruction.isalnum():
        raise InvalidInput(f"instruction {instruction!r} is not a Backpack instruction name")
    if isinstance(timestamp_ms, bool) or not isinstance(timestamp_ms, int) or timestamp_ms <= 0:
        raise InvalidInput("timestamp must be a positive integer of milliseconds since the epoch")
    if isinstance(window_ms, bool) or not isinstance(window_ms, int):
        raise InvalidInput("window must be an integer of milliseconds")
    if not 1 <= window_ms <= MAX_WINDOW_MS:
        raise InvalidInput(f"window {window_ms} ms is outside 1..{MAX_WINDOW_MS} ms")
    if params is None:
        params = {}
    if isinstance(params, Mapping):
        head = _pairs(instruction, params)
    elif isinstance(params, Sequence) and not isinstance(params, (str, bytes)):
        if not params:
            raise InvalidInput("a batch must hold at least one order")
        head = "&".join(_pairs(instruction, p) for p in params)
    else:
        raise InvalidInput("params must be an object (or a list of objects for batch orders)")
    return f"{head}&timestamp={timestamp_ms}&window={window_ms}"


class Signer:
    """Signs for one key. Build once per key; the seed stays inside the SigningKey."""

    __slots__ = ("_key", "api_key")

    def __init__(self, api_key: str, api_secret: str | Secret) -> None:
        self._key = nacl.signing.SigningKey(parse_seed(api_secret))
        derived = base64.b64encode(bytes(self._key.verify_key)).decode("ascii")
        if derived != api_key:
            raise KeyMismatch
        self.api_key = api_key

    def __repr__(self) -> str:
        return f"Signer(api_key={self.api_key!r})"

    def sign(self, message: str) -> str:
        return base64.b64encode(self._key.sign(message.encode()).signature).decode("ascii")

    def headers(
        self,
        instruction: str,
        params: Params | None,
        timestamp_ms: int,
        window_ms: int = DEFAULT_WINDOW_MS,
    ) -> dict[str, str]:
        message = signing_string(instruction, params, timestamp_ms, window_ms)
        return {
            "X-API-Key": self.api_key,
            "X-Signature": self.sign(message),
            "X-Timestamp": str(timestamp_ms),
            "X-Window": str(window_ms),
        }


def sign_request(
    api_key: str,
    api_secret: str | Secret,
    instruction: str,
    params: Params | None,
    timestamp_ms: int,
    window_ms: int = DEFAULT_WINDOW_MS,
) -> dict[str, str]:
    """Return ``X-API-Key``, ``X-Signature``, ``X-Timestamp`` and ``X-Window`` for one request."""
    secret = api_secret.reveal() if isinstance(api_secret, Secret) else api_secret
    return _signer(api_key, secret).headers(instruction, params, timestamp_ms, window_ms)


# For the one-shot sign_request of a bot holding a copy, a handful of recently used
# keys stay decoded: deriving a SigningKey costs as much as a signature, and a bot
# signs with the same key all day. The daemon holds Signer objects itself instead
# (bounded by its secret cache), so its keys never linger here.
@functools.lru_cache(maxsize=8)
def _signer(api_key: str, api_secret: str) -> Signer:
    return Signer(api_key, api_secret)


def verify(api_key: str, message: str, signature: str) -> bool:
    """Whether ``signature`` (base64) is ``api_key``'s signature of ``message``."""
    try:
        verify_key = nacl.signing.VerifyKey(base64.b64decode(api_key, validate=True))
        verify_key.verify(message.encode(), base64.b64decode(signature, validate=True))
    except (ValueError, nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError):
        return False
    return True
