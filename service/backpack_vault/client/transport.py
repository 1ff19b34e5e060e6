"""The daemon's small JSON calls over kept-alive HTTP/1.1 (the standard library's ``http.client``).

::

    lean = Lean.for_url("http://backpack-vault:8280", timeout=5.0, tls=tls_context(verify=True))
    status, headers, body = lean.request("POST", "/v1/keys/main/bot/sign", payload, token)

Why not httpx here: a signature is one small request and one small answer, and
httpx with httpcore and h11 spends about 0.9 ms of Python per call building,
parsing and bookkeeping around a round trip that takes 0.5 ms on loopback (see
``bench/bots.py``). Sign mode pays that on every order. ``http.client`` sends
headers and body in one write (TCP_NODELAY), parses the answer, and the
connection is kept for the next call. This serves only ``BrokerClient``'s calls
to the daemon, and only when the ``BrokerClient`` made its own ``httpx.Client``
and no proxy applies to the daemon's address; streams (the watch), Vault and
Backpack stay with httpx.

Connections idle for longer than ``IDLE_S`` (under uvicorn's 5 s keep-alive), or
found readable while idle (the daemon closed them), are dropped before use. A
reused connection that fails before any byte of an answer arrives is replaced
once, as a browser or httpcore would: the daemon did not answer that request.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

__all__ = ["IDLE_S", "Lean", "LeanError"]

IDLE_S: Final = 3.0  # uvicorn closes a connection idle for 5 s
_KEEP: Final = 8  # idle connections kept per client
# What a kept connection the daemon closed meanwhile looks like on the next request.
_STALE: Final = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)


class LeanError(OSError):
    """The daemon could not be reached or answered with something that is not HTTP."""


@dataclass(slots=True)
class _Conn:
    http: http.client.HTTPConnection
    used_at: float
    fresh: bool = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.http.close()


class Lean:
    """A small pool of HTTP/1.1 connections to one daemon; thread-safe."""

    def __init__(
        self, scheme: str, host: str, port: int, *, timeout: float, tls: ssl.SSLContext
    ) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._tls = tls if scheme == "https" else None
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False
        self.connections = 0  # how many were opened: one serves call after call

    @classmethod
    def for_url(cls, url: str, *, timeout: float, tls: ssl.SSLContext) -> Lean | None:
        """A pool for the daemon at ``url``; None when httpx should carry the calls (a
        proxy applies, or the URL is not plain http(s) to a host and port)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        if parts.path not in ("", "/") or parts.username or parts.query:
            return None
        # What httpx would do (trust_env): a proxy that applies to the daemon carries it.
        proxies = urllib.request.getproxies()
        wanted = proxies.get(parts.scheme) or proxies.get("all")
        if wanted and not urllib.request.proxy_bypass(parts.hostname):
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, timeout=timeout, tls=tls)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def request(
        self, method: str, path: str, body: bytes | None, token: str
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request; the answer's status, headers (lower-case names) and body."""
        if "\r" in token or "\n" in token:
            raise LeanError("the Vault token holds a line break")
        headers = {
            "Accept": "application/json",
            "User-Agent": "backpack-vault",
            "X-Vault-Token": token,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        while True:
            conn = self._checkout()
            try:
                conn.http.request(method, path, body=body, headers=headers)
                response = conn.http.getresponse()
                answer = response.read()
            except _STALE:
                conn.close()
                if conn.fresh:
                    raise LeanError("the daemon closed the connection without answering") from None
                continue  # a kept connection the daemon had closed: a fresh one
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                raise LeanError(f"{type(exc).__name__}: {exc}") from None
            found = {name.lower(): value for name, value in response.getheaders()}
            if response.will_close:
                conn.close()
            else:
                self._checkin(conn)
            return response.status, found, answer

    # -- connections ------------------------------------------------------------------------

    def _checkout(self) -> _Conn:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if now - conn.used_at < IDLE_S and not _readable(conn.http.sock):
                    conn.fresh = False
                    return conn
                conn.close()
        return self._connect()

    def _checkin(self, conn: _Conn) -> None:
        conn.used_at = time.monotonic()
        with self._lock:
            if not self._closed and len(self._idle) < _KEEP:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self) -> _Conn:
        conn: http.client.HTTPConnection
        if self._tls is not None:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self._tls
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.connect()
            if conn.sock is not None:
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, ssl.SSLError) as exc:
            conn.close()
            raise LeanError(f"{type(exc).__name__}: {exc}") from None
        with self._lock:
            self.connections += 1
        return _Conn(conn, time.monotonic())


def _readable(sock: socket.socket | None) -> bool:
    """An idle connection with something to read has been closed by the daemon."""
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
