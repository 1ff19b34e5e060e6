"""Small JSON calls over kept-alive HTTP/1.1: one write out, httptools' C parser in.

::

    pool = Pool.for_url("http://backpack-vault:8280", timeout=5.0, tls=context)
    status, headers, body = pool.request("POST", "/v1/keys/main/bot/sign", payload, token)

Who uses it: ``BrokerClient`` for its calls to the daemon and its unwraps at
Vault, and the daemon for the one Vault call on its hot path (wrapping a copy).

Why not httpx or hvac there: a signature or a wrap is one small request and one
small answer. httpx with httpcore and h11 spends about 0.9 ms of Python per call
building, parsing and bookkeeping around a round trip that takes 0.3 to 0.5 ms
on loopback; hvac and requests about 1.5 ms of CPU; the standard library's
``http.client`` still about 0.3 ms, most of it in the ``email`` package that
parses its answer headers (``bench/bots.py``, docs/performance.md). Here a request
is one ``bytes`` written at once (TCP_NODELAY), and the answer is read by
httptools, the C parser (llhttp) the daemon's own server uses: status, headers,
``Content-Length`` or chunked bodies, keep-alive. The connection is kept for the
next call. Callers use it only where no proxy applies (``for_url`` says None
otherwise); streams (the watch) and everything else stay with httpx and hvac.

Connections idle for longer than ``IDLE_S`` (under uvicorn's 5 s keep-alive), or
found readable while idle (the server closed them), are dropped before use. A
reused connection that fails before any byte of an answer arrives is dropped and
the request sent on the next one (a fresh one at the latest), as a browser or
httpcore would: the server did not answer it. An interim answer (``100
Continue``) is skipped; bytes after the answer close the connection.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, NoReturn
from urllib.parse import urlsplit

import httptools

__all__ = ["IDLE_S", "Pool", "WireError", "WireTimeout"]

IDLE_S: Final = 3.0  # uvicorn closes a connection idle for 5 s; Go's servers after longer
_KEEP: Final = 8  # idle connections kept per pool, by default
_READ: Final = 65536  # bytes asked of the socket at once; an answer is well under 1 KiB
_WITH_BODY: Final = frozenset({"POST", "PUT", "PATCH"})
# What a kept connection the server closed meanwhile looks like on the next request.
_STALE: Final = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_INTERIM_MIN, _INTERIM_MAX, _SWITCHING = 100, 200, 101


class WireError(OSError):
    """The server could not be reached or answered with something that is not HTTP."""


class WireTimeout(WireError):
    """The server did not answer (or accept the connection) within the timeout."""


class _NoAnswer(Exception):
    """The connection ended before any byte of an answer arrived."""


@dataclass(slots=True)
class _Answer:
    """httptools' callbacks for one answer: what it has read so far."""

    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)
    parser: httptools.HttpResponseParser | None = None
    status: int = 0
    keep: bool = False  # llhttp says so only while it parses this answer: noted then
    headers_done: bool = False
    complete: bool = False
    extra: bool = False  # bytes after the answer: the connection is not reused

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.parser is not None  # set right after the parser is made
        if self.complete:
            return
        self.status = self.parser.get_status_code()
        self.keep = self.parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.complete:
            return
        if _INTERIM_MIN <= self.status < _INTERIM_MAX and self.status != _SWITCHING:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.headers, self.body, self.status, self.headers_done = {}, [], 0, False
            return
        self.complete = True

    def ends_at_close(self) -> bool:
        """An answer with neither a length nor chunks: its body runs to the close."""
        return (
            self.headers_done
            and "content-length" not in self.headers
            and "chunked" not in self.headers.get("transfer-encoding", "").lower()
        )


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    used_at: float
    fresh: bool = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Pool:
    """A small pool of HTTP/1.1 connections to one server; thread-safe."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        timeout: float,
        tls: ssl.SSLContext | None,
        user_agent: str = "backpack-vault",
        keep: int = _KEEP,
    ) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._keep = keep
        self._tls = tls if scheme == "https" else None
        if scheme == "https" and tls is None:
            self._tls = ssl.create_default_context()
        named = f"[{host}]" if ":" in host else host
        self._fixed = (
            f"Host: {named}:{port}\r\nAccept: application/json\r\nUser-Agent: {user_agent}\r\n"
        )
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False
        self.connections = 0  # how many were opened: one serves call after call

    @classmethod
    def for_url(
        cls,
        url: str,
        *,
        timeout: float,
        tls: ssl.SSLContext | None,
        proxies: bool = True,
        keep: int = _KEEP,
    ) -> Pool | None:
        """A pool for the server at ``url``; None when something else should carry the
        calls: a proxy applies (as httpx and requests read the environment; ``proxies=False``
        for a caller that never uses one), or the URL is not plain http(s) to a host."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        if parts.path not in ("", "/") or parts.username or parts.query:
            return None
        if proxies:
            found = urllib.request.getproxies()
            wanted = found.get(parts.scheme) or found.get("all")
            if wanted and not urllib.request.proxy_bypass(parts.hostname):
                return None
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:  # a port out of range: httpx (or hvac) says so in its own words
            return None
        return cls(parts.scheme, parts.hostname, port, timeout=timeout, tls=tls, keep=keep)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        token: str,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request with ``token`` in ``X-Vault-Token`` (``headers``: any more); the
        answer's status, headers (lower-case names) and body."""
        wire = self._wire(method, path, body, token, headers)
        while True:
            conn = self._checkout()
            try:
                conn.sock.sendall(wire)
                status, found, answer, keep = _read(conn.sock)
            except (_NoAnswer, *_STALE) as exc:  # nothing of an answer came back
                conn.close()
                if not conn.fresh:
                    continue  # a kept connection the server had closed: a fresh one
                if isinstance(exc, _NoAnswer):
                    raise WireError("the server closed the connection without answering") from None
                raise WireError(f"{type(exc).__name__}: {exc}") from None
            except BaseException as exc:  # noqa: BLE001 - raised again, as a WireError or itself
                conn.close()  # an interrupt mid-answer too: the socket goes
                _raise_as_wire(exc, "the server did not answer in time")
            if keep:
                self._checkin(conn)
            else:
                conn.close()
            return status, found, answer

    def _wire(
        self,
        method: str,
        path: str,
        body: bytes | None,
        token: str,
        headers: Mapping[str, str] | None,
    ) -> bytes:
        """The request as it goes out: request line, headers and body in one ``bytes``."""
        if "\r" in token or "\n" in token:
            raise WireError("the Vault token holds a line break")
        if not path.startswith("/") or any(c in path for c in " \r\n"):
            raise WireError("the request path holds a space or a line break")
        head = f"{method} {path} HTTP/1.1\r\n{self._fixed}X-Vault-Token: {token}\r\n"
        for name, value in (headers or {}).items():
            if any(c in name + value for c in "\r\n") or ":" in name:
                raise WireError(f"the header {name[:40]!r} holds a line break or a colon")
            head += f"{name}: {value}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        elif method in _WITH_BODY:
            head += "Content-Length: 0\r\n"
        try:
            wire = (head + "\r\n").encode("ascii")
        except UnicodeEncodeError:
            raise WireError("the request path, a header or the Vault token is not ASCII") from None
        return wire + body if body else wire

    # -- connections ------------------------------------------------------------------------

    def _checkout(self) -> _Conn:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if now - conn.used_at < IDLE_S and not _readable(conn.sock):
                    conn.fresh = False
                    return conn
                conn.close()
        return self._connect()

    def _checkin(self, conn: _Conn) -> None:
        conn.used_at = time.monotonic()
        with self._lock:
            if not self._closed and len(self._idle) < self._keep:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self) -> _Conn:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except (OSError, ValueError) as exc:
            _raise_as_wire(exc, "the server did not accept a connection in time")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException as exc:  # noqa: BLE001 - raised again, as a WireError or itself
            sock.close()
            _raise_as_wire(exc, "the server did not finish the TLS handshake in time")
        with self._lock:
            self.connections += 1
        return _Conn(sock, time.monotonic())


def _raise_as_wire(exc: BaseException, timed_out: str) -> NoReturn:
    """Raise a failure on the wire as callers know it: WireTimeout (``timed_out``), or
    WireError naming what failed (an OSError, ssl's errors among them; a ValueError, an
    IDNA refusal among them; the parser's), or anything else (an interrupt) as it is."""
    if isinstance(exc, WireError):
        raise exc
    if isinstance(exc, TimeoutError):
        raise WireTimeout(timed_out) from None
    if isinstance(exc, OSError | ValueError | httptools.HttpParserError):
        raise WireError(f"{type(exc).__name__}: {exc}") from None
    raise exc


def _read(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """One answer off ``sock``: status, headers, body, and whether the connection stays."""
    answer = _Answer()
    answer.parser = parser = httptools.HttpResponseParser(answer)
    received = False
    while not answer.complete:
        try:
            data = sock.recv(_READ)
        except _STALE as exc:
            if not received:
                raise _NoAnswer from None
            raise WireError(f"{type(exc).__name__} in the middle of an answer") from None
        if not data:
            if not received:
                raise _NoAnswer
            if answer.ends_at_close():
                return answer.status, answer.headers, b"".join(answer.body), False
            raise WireError("the server closed the connection in the middle of an answer")
        received = True
        parser.feed_data(data)
    return answer.status, answer.headers, b"".join(answer.body), answer.keep and not answer.extra


def _readable(sock: socket.socket) -> bool:
    """An idle connection with something to read has been closed by the server."""
    try:
        if hasattr(select, "poll"):  # select() cannot see a descriptor above 1023
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
