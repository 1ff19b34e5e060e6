"""The uvicorn Server lifecycle: start, serve until told to stop, drain; and signal capture.

The daemon, the sandbox exchange, ``backpack-vault dev`` and the tests all serve
the same way, so readiness waiting and draining live here once::

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
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any, Final

import uvicorn

from backpack_vault.core.clock import wait_for
from backpack_vault.errors import ConfigError, ServiceError

__all__ = ["HANDLED_SIGNALS", "ServerThread", "capture_signals", "free_port", "make_server"]

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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def make_server(app: Any, host: str, port: int, *, graceful_s: int = 10) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_s,
        ws="none",
    )
    return uvicorn.Server(config)


def _never() -> bool:
    return False


class ServerThread:
    """Serve ``app`` on ``host:port`` in a daemon thread; ``with ServerThread(app, port=p):``."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, *, graceful_s: int = 2
    ) -> None:
        if port == 0:
            port = free_port()
        self.host = host
        self.port = port
        self.graceful_s = graceful_s
        self.server = make_server(app, host, port, graceful_s=graceful_s)
        self._thread = threading.Thread(target=self.server.run, name=f"asgi:{port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
