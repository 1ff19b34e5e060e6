"""Run an ASGI app on uvicorn: blocking until told to stop, or in a background thread.

The daemon, the sandbox exchange, ``backpack-vault dev`` and the tests all serve
the same way, so SIGTERM handling and readiness waiting live here once.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from backpack_vault.errors import ServiceError

__all__ = ["ServerThread", "free_port", "make_server"]


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


class ServerThread:
    """Serve ``app`` on ``host:port`` in a daemon thread; ``with ServerThread(app, port=p):``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        if port == 0:
            port = free_port()
        self.host = host
        self.port = port
        self.server = make_server(app, host, port, graceful_s=2)
        self._thread = threading.Thread(target=self.server.run, name=f"asgi:{port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServiceError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:  # noqa: PYI034 - never subclassed
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
