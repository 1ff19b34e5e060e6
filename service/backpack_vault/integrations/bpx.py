"""bpx-py's ``Account``, signed through the backpack-vault daemon.

::

    broker = BrokerClient("http://backpack-vault:8280", vault_addr=..., token=...)
    account = Account(broker=broker, key="scalper/bot-a")          # mode="sign"
    account.execute_order("SOL_USDC", "Bid", "Limit", quantity="1", price="180.50")

bpx-py builds each request's params and asks ``_headers(params, instruction,
window)`` for its headers: that is where the daemon signs (sign mode, the
secret never reaches the bot) or the kept copy does (copy mode: fetched, refreshed
at two thirds of its life, dropped on a watch event or a rejection). bpx-py
decodes a secret in ``BaseAccount.__init__``, so that constructor is not called:
the account has no ``private_key``. Floats in params are sent, and signed, as
decimal strings (:mod:`backpack_vault.integrations.params`).

Requests go through httpx (one pooled client) with bpx-py's answers (the JSON,
or the text), and with our errors, since bpx-py has no exception tree of its
own: KeyRevoked, KeyRetired, AccessDenied, BrokerUnavailable ... from the
daemon; KeyRejected when Backpack refuses the key itself (reported to the daemon
once); ExchangeUnavailable when Backpack cannot be reached. Other error answers
come back as bpx-py returns them (``{"code", "message"}``).
"""

from __future__ import annotations

import time
from typing import Any, Final

import httpx
from bpx.account import Account as _BpxAccount
from bpx.http_client.base.http_client import HttpClient

from backpack_vault.client.broker import BrokerClient
from backpack_vault.core.keys import KeyRef
from backpack_vault.errors import ExchangeUnavailable, KeyRejected
from backpack_vault.integrations.handle import KeyHandle, Mode
from backpack_vault.integrations.params import signable

__all__ = ["Account"]

_JSON: Final = "application/json; charset=utf-8"
_TIMEOUT_S: Final = 10.0


class _Http(HttpClient):  # type: ignore[misc]
    """bpx-py's HTTP client contract over httpx; a refused key raises KeyRejected."""

    def __init__(self, http: httpx.Client, handle: KeyHandle) -> None:
        self.http = http
        self.handle = handle

    def get(self, url: str, headers: Any = None, params: Any = None) -> Any:
        return self._send("GET", url, headers, params=params)

    def post(self, url: str, headers: Any = None, data: Any = None) -> Any:
        return self._send("POST", url, headers, json=data)

    def delete(self, url: str, headers: Any = None, data: Any = None) -> Any:
        return self._send("DELETE", url, headers, json=data)

    def patch(self, url: str, headers: Any = None, data: Any = None) -> Any:
        return self._send("PATCH", url, headers, json=data)

    def _send(
        self, method: str, url: str, headers: Any, *, params: Any = None, json: Any = None
    ) -> Any:
        try:
            response = self.http.request(method, url, headers=headers, params=params, json=json)
        except httpx.HTTPError as exc:
            raise ExchangeUnavailable(
                f"Backpack at {url} is unreachable: {type(exc).__name__}"
            ) from None
        if response.is_error and headers and "X-Signature" in headers:
            reason = self.handle.rejection(response.status_code, response.text)
            if reason is not None:
                if self.handle.rejected():
                    self.handle.report(reason)
                raise KeyRejected(f"key {self.handle.key} was refused: {reason}")
        try:
            return response.json()
        except ValueError:
            return response.text


class Account(_BpxAccount):  # type: ignore[misc]
    """``bpx.account.Account`` for ``key`` in ``mode`` (``"sign"`` or ``"copy"``).

    ``base_url`` replaces ``BPX_API_URL`` (the sandbox's URL, say); ``http`` is the
    httpx client for Backpack (one of its own by default, closed by :meth:`close`).
    The daemon is asked once here, for the public API key.
    """

    def __init__(
        self,
        *,
        broker: BrokerClient,
        key: str | KeyRef,
        mode: Mode = "sign",
        window: int = 5000,
        base_url: str | None = None,
        http: httpx.Client | None = None,
        watch: bool = True,
    ) -> None:
        # Not super().__init__(): BaseAccount's decodes a secret, and this account has none.
        self.key_handle = KeyHandle(broker, key, mode, watch=watch)
        self.public_key = self.key_handle.api_key()
        self.window = window
        self.debug = False
        self._owns_http = http is None
        self.http_client = _Http(http or httpx.Client(timeout=_TIMEOUT_S), self.key_handle)
        if base_url is not None:
            self.BPX_API_URL = f"{base_url.rstrip('/')}/"

    def _headers(self, params: dict[str, Any], instruction: str, window: int | None) -> Any:
        # bpx-py sends this same dict as the body or query: make it what is signed, in place.
        plain = signable(params)
        params.clear()
        params.update(plain)
        stamp = time.time_ns() // 1_000_000
        signed = self.key_handle.headers(
            instruction, params or None, stamp, self.window if window is None else window
        )
        self.public_key = signed["X-API-Key"]  # after a rotation: the successor's
        return {**signed, "Content-Type": _JSON}

    def close(self) -> None:
        """Stop watching the key (copy mode) and close the httpx client this account made."""
        self.key_handle.close()
        if self._owns_http:
            self.http_client.http.close()
