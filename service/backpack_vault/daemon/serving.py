"""The uvicorn Server lifecycle: start, serve until told to stop, drain; and signal capture.

The worker API is served through ``daemon/quick.py``'s protocol, which answers a
copy or signature from memory in its callback; every other app through uvicorn's
own httptools protocol. The daemon, the sandbox exchange, ``backpack-vault dev``
and the tests all serve the same way, so readiness waiting and draining live here once::

    ServerThread(app, host, port).start()   ConfigError when it cannot bind
    .serve_until(lambda: flag)              returns when the flag is set
    .stop(hurry=...)                        in-flight requests get graceful_s; hurry() cuts it short

Signal handlers only set a flag (:func:`capture_signals`); the thread that
serves polls it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any, Final

import uvicorn

from backpack_vault.api import MAX_BODY_BYTES, quick_lane
from backpack_vault.core.clock import wait_for
from backpack_vault.daemon.quick import quick_protocol
from backpack_vault.errors import ConfigError, ServiceError

__all__ = [
    "HANDLED_SIGNALS",
    "ReloadableTLS",
    "ServerThread",
    "capture_signals",
    "free_port",
    "make_server",
    "on_reload_signal",
]

HANDLED_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
_FORCED_EXIT_S: Final = 5.0  # after the graceful period: open connections are cut


@contextlib.contextmanager
def capture_signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``handler`` (main thread only); restore the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class ReloadableTLS:
    """One server-side TLS context whose certificate can be swapped while serving.

    ``reload()`` loads the files again into the same context: handshakes from then on
    use the new certificate, connections already open keep theirs. A reload that fails
    (a half-written file, say) keeps the old certificate and raises ConfigError.
    """

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(self.context)

    def _load(self, context: ssl.SSLContext) -> None:
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ConfigError(
                f"cannot load the TLS certificate {self.cert_file} and key {self.key_file}: "
                f"{reason}"
            ) from None

    def reload(self) -> None:
        # Check the new pair on a scratch context first: a bad pair must not be half-loaded.
        self._load(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
        self._load(self.context)


@contextlib.contextmanager
def on_reload_signal(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Route SIGHUP to ``handler`` (main thread only); restore the old handler on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGHUP, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def make_server(
    app: Any, host: str, port: int, *, graceful_s: int = 10, tls: ReloadableTLS | None = None
) -> uvicorn.Server:
    lane = quick_lane(app)  # the worker API: copies and signatures from memory at once
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_s,
        ws="none",
        http=quick_protocol(lane, body_limit=MAX_BODY_BYTES) if lane is not None else "httptools",
    )
    if tls is not None:
        # uvicorn builds its own context from file names; ours can be reloaded in place.
        config.load()
        config.ssl = tls.context
    return uvicorn.Server(config)


def _never() -> bool:
    return False


class ServerThread:
    """Serve ``app`` on ``host:port`` in a daemon thread; ``with ServerThread(app, port=p):``."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        graceful_s: int = 2,
        tls: ReloadableTLS | None = None,
    ) -> None:
        if port == 0:
            port = free_port()
        self.host = host
        self.port = port
        self.graceful_s = graceful_s
        self.tls = tls
        self.server = make_server(app, host, port, graceful_s=graceful_s, tls=tls)
        self._thread = threading.Thread(target=self.server.run, name=f"asgi:{port}", daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> ServerThread:
        """Start serving; return once uvicorn accepts connections."""
        self._thread.start()
        if not wait_for(lambda: self.server.started or not self.alive, timeout, every=0.01):
            raise ServiceError(f"server on {self.url} did not start within {timeout:g} s")
        if not self.server.started:
            raise ConfigError(f"cannot serve on {self.host}:{self.port} (is the port in use?)")
        return self

    def serve_until(self, done: Callable[[], bool], *, every: float = 0.1) -> None:
        """Block until ``done()``; ServiceError if the server stops by itself first."""
        wait_for(lambda: done() or not self.alive, math.inf, every=every)
        if not self.alive:
            raise ServiceError("the API server stopped unexpectedly; see the logs above")

    def stop(self, *, hurry: Callable[[], bool] = _never) -> None:
        """Drain: stop accepting, let in-flight requests finish within ``graceful_s``.

        Once ``hurry()`` is true (a second SIGTERM, say) open requests are cut at once.
        """
        self.server.should_exit = True

        def stopped() -> bool:
            if hurry():
                self.server.force_exit = True
            return not self.alive

        if self._thread.ident is None:  # never started
            return
        if not wait_for(stopped, self.graceful_s + _FORCED_EXIT_S, every=0.1, sleep=self._join):
            self.server.force_exit = True
            self._thread.join(timeout=_FORCED_EXIT_S)

    def _join(self, seconds: float) -> None:
        self._thread.join(timeout=seconds)

    def __enter__(self) -> ServerThread:  # noqa: PYI034 - never subclassed
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
