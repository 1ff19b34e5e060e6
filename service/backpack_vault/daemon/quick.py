"""uvicorn's HTTP protocol, with copies and signatures from memory answered in its callback.

Through uvicorn's own path a request becomes an ASGI scope, a task, a receive/send
exchange and a Starlette request: about 0.2 ms of Python per request on this
kind of machine, more than the signature itself, and more again when the daemon
has been idle between a bot's orders (``bench/bots.py``, docs/performance.md).
This subclass of uvicorn's ``HttpToolsProtocol`` (the ``http`` class that
``uvicorn.Config`` takes) holds a request that may be answered at once::

    POST /v1/keys/SUB/NAME/sign     POST /v1/keys/SUB/NAME/copy
    HTTP/1.1, kept alive, no Expect, no %-escapes, nothing of the connection's in flight

until its body is in, then asks the API's ``answer_at_once``. A 200 it returns is
written on the spot; for anything else (a refusal, a bad body, a key or grant
not in memory, a body over the limit) the request is handed to uvicorn as if it
had just been read, and the ASGI app answers it as ever. So every route, status
and error body stays the app's; only how a success from memory reaches the
socket changes. Nothing is awaited, so requests on one connection stay in order,
a graceful shutdown that finds a held request closes the connection once it is
answered, as uvicorn does for a request in flight, and a client that goes away
before its body is in is the app's to log, as for any request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from backpack_vault.api import QuickAnswer, QuickLane
from backpack_vault.logging import get_logger

__all__ = ["quick_protocol"]

log = get_logger("backpack_vault.daemon.quick")

# ASCII names only (a key's name is a-z, 0-9, '.', '_', '-'): anything else is the app's.
_ROUTE: Final = re.compile(rb"/v1/keys/([\w.-]+)/([\w.-]+)/(copy|sign)")
_WANTED: Final = frozenset({b"x-vault-token", b"authorization"})
_OK_HEAD: Final = b"HTTP/1.1 200 OK\r\n"
_JSON: Final = b"content-type: application/json\r\n"
_CLOSE: Final = b"connection: close\r\n"
_PER_READ: Final = 8  # requests answered in one callback before the rest queue as uvicorn's


class _QuickProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, lane: QuickLane, body_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lane = lane
        self.body_limit = body_limit
        self._held: bytearray | None = None  # the body of a request held for the lane
        self._route: tuple[str, str, str] = ("", "", "")
        self._header_count = 0  # the request's own headers; a chunked body's trailer follows
        self._closing = False  # a graceful shutdown came while a request was held
        self._dropping = False  # a request read after this connection was closed
        self._answered_in_read = 0
        self._failure_logged = False

    # -- asyncio's callbacks -----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._answered_in_read = 0
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            if self._held is not None:
                self._hand_over()  # the app meets the disconnect and logs it, as for any request
        finally:
            super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._held is not None:
            self._closing = True  # answer the request being read, then close
            return
        super().shutdown()

    # -- httptools' callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._dropping = False

    def on_headers_complete(self) -> None:
        # A request answered in this same read armed the keep-alive timeout; whatever this
        # one becomes, it must not run under it (uvicorn clears it on each read).
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            # Closed after a held request's answer: like uvicorn's own queue on a closing
            # connection, nothing read after it runs.
            self._dropping = True
            return
        route = self._quick_route()
        if route is None:
            super().on_headers_complete()
            return
        self._route = route
        self._header_count = len(self.headers)
        self._held = bytearray()

    def on_body(self, body: bytes) -> None:
        held = self._held
        if held is None:
            if not self._dropping:
                super().on_body(body)
            return
        held += body
        if len(held) > self.body_limit:
            self._hand_over()  # the app reads the rest, and says 413

    def on_message_complete(self) -> None:
        held = self._held
        if held is None:
            if not self._dropping:
                super().on_message_complete()
            return
        self._held = None
        answer = self._ask(bytes(held))
        if answer is None:
            self._held = held
            self._hand_over()
            super().on_message_complete()
            return
        self._answered_in_read += 1
        self.transport.write(
            b"".join(
                (
                    _OK_HEAD,
                    *(b"%s: %s\r\n" % pair for pair in self.server_state.default_headers),
                    b"content-length: %d\r\n" % len(answer.body),
                    _JSON,
                    _CLOSE if self._closing else b"",
                    b"\r\n",
                    answer.body,
                )
            )
        )
        if self._closing:
            self.transport.close()
        self.on_response_complete()  # counts it; reads on, or arms the keep-alive timeout
        try:
            answer.then()
        except Exception:  # the answer is out: a failure to record it must not touch it
            log.exception("api.record_failed", route=self._route[0])

    # -- helpers -------------------------------------------------------------------------

    def _ask(self, body: bytes) -> QuickAnswer | None:
        try:
            return self.lane(*self._route, self._token_headers(), body)
        except Exception:  # the app meets it again, and answers (and logs) it as its own
            if not self._failure_logged:  # once per connection: the lane is only a shortcut
                self._failure_logged = True
                log.exception("api.quick_lane_failed", route=self._route[0])
            return None

    def _quick_route(self) -> tuple[str, str, str] | None:
        parser = self.parser
        if (
            parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or not parser.should_keep_alive()
            or parser.should_upgrade()
            or self.expect_100_continue
            or self.limit_concurrency is not None
            or self._closing
            or self.flow.write_paused  # a client not reading: uvicorn's flow control
            or self.pipeline
            or (self.cycle is not None and not self.cycle.response_complete)
            # Many requests in one read: the rest take uvicorn's queue, one task each, so
            # that other connections are served in between, as uvicorn would.
            or self._answered_in_read >= _PER_READ
        ):
            return None
        match = _ROUTE.fullmatch(self.url)
        if match is None:
            return None
        sub, name, route = (part.decode("ascii") for part in match.groups())
        return route, sub, name

    def _token_headers(self) -> Mapping[str, str]:
        found: dict[str, str] = {}
        # The request's headers only, and the first of a repeated one, as starlette reads them.
        for name, value in self.headers[: self._header_count]:
            if name in _WANTED:
                found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        return found

    def _hand_over(self) -> None:
        """Give the held request to uvicorn: the ASGI app gets it, body so far included."""
        held, self._held = self._held, None
        del self.headers[self._header_count :]  # a trailer is not a header to the app either
        super().on_headers_complete()  # reads the same method and URL, starts the app's task
        if held:
            super().on_body(bytes(held))
        if self._closing:
            self._closing = False
            super().shutdown()


def quick_protocol(lane: QuickLane, *, body_limit: int) -> type[HttpToolsProtocol]:
    """An ``HttpToolsProtocol`` class for ``uvicorn.Config(http=...)`` that asks ``lane``."""

    class QuickProtocol(_QuickProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, lane=lane, body_limit=body_limit, **kwargs)

    return QuickProtocol
