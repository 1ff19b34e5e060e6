"""``backpack-vault dev``: the embedded default; ``dev --tour``: a scripted revocation.

::

    run()
      capture SIGTERM/SIGINT (the handler only sets a flag; every wait below polls it)
      Vault      an OpenBao dev server (DevVault), or the one --vault-addr names explicitly
      setup      vault.setup.setup; a daemon token (daemon policy) and a demo worker token
      sandbox    `python -m backpack_vault sandbox` child on 8300 (else a free port)
      daemon     `python -m backpack_vault serve` child on 8280 (else a free port); /readyz
      demo       1. main/demo generated and stored pending   2. registered at the sandbox,
                 active once the daemon's check sees it accepted   3. order placed with a
                 wrapped copy   4. order placed with daemon signatures
      dev        print what runs and what to try; wait for Ctrl-C or SIGTERM
      --tour     5. revoke at the sandbox   6. the daemon's checks notice   7. the cutoff
      stop       every process started here, by PID, in reverse order (one ExitStack)
    return 0

Child processes log to files in a temporary directory (kept when something failed); this
process prints readable lines to stdout. The only secrets printed are the throwaway dev
server's root token and the demo worker's token.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

import httpx

from backpack_vault.client.broker import BrokerClient
from backpack_vault.config import FIELDS, Secret, Settings, VaultSettings, environ_snapshot
from backpack_vault.core.clock import iso_utc, wait_for
from backpack_vault.core.keys import KeyRef
from backpack_vault.daemon import capture_signals
from backpack_vault.daemon.serving import free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import DevError, Interrupted, ServiceError
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.setup import DAEMON_POLICY, render_worker_policy, setup

__all__ = ["DevError", "DevOptions", "Interrupted", "run"]

DEFAULT_LISTEN: Final = "127.0.0.1:8280"
DAEMON_PORT: Final = 8280
SANDBOX_PORT: Final = 8300
DEV_CHECK_INTERVAL: Final = 10.0
TOUR_CHECK_INTERVAL: Final = 1.0
DEMO_KEY: Final = KeyRef("main", "demo")
WORKER_POLICY: Final = "backpack-vault-dev-worker"
DEMO_INSTRUCTIONS: Final = (
    "accountQuery",
    "balanceQuery",
    "orderCancel",
    "orderExecute",
    "orderQuery",
    "orderQueryAll",
)
DEMO_ORDER: Final = {
    "symbol": "SOL_USDC",
    "side": "Bid",
    "orderType": "Limit",
    "price": "140.50",
    "quantity": "1",
}
TOKEN_TTL: Final = "24h"  # noqa: S105 - a duration
CHILD_STOP_S: Final = 15.0
_LOG_TAIL_LINES: Final = 5


@dataclass(frozen=True, slots=True)
class DevOptions:
    tour: bool = False
    listen: str | None = None  # the daemon's HOST:PORT, exactly; None: 8280, else a free port
    sandbox_port: int | None = None  # exactly; None: 8300, else a free port
    check_interval: float | None = None  # None: 10 s, or 1 s with the tour
    logs: Path | None = None  # kept; None: a temporary directory, removed on a clean exit
    # An existing Vault to use instead of a dev server: only when given explicitly
    # (--vault-addr). An exported VAULT_ADDR/VAULT_TOKEN is never used: it is often the
    # team's real Vault, and dev writes a policy, a demo key and tokens.
    vault_addr: str | None = None


# -- small helpers ----------------------------------------------------------------------


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now (uvicorn sets SO_REUSEADDR too)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _preferred_port(port: int) -> int:
    return port if port_free(port) else free_port()


def _now_iso() -> str:
    return iso_utc()


def _connect_host(host: str) -> str:
    """Where a client reaches a server listening on ``host``."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - a listen address, compared, not bound
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment a child ``backpack-vault`` needs to see ``settings`` (never secrets)."""
    env: dict[str, str] = {}
    for f in FIELDS:
        if f.env is None or f.secret:
            continue
        holder: Any = getattr(settings, f.section) if f.section else settings
        value = getattr(holder, f.attr)
        if value is not None:
            env[f.env] = str(value)
    return env


def _clean_environ() -> dict[str, str]:
    """This process's environment without any Vault or backpack-vault setting."""
    return {
        k: v
        for k, v in environ_snapshot().items()
        if not k.startswith(("VAULT_", "BAO_", "BACKPACK_VAULT_"))
    }


def _write(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()


def _cli_command() -> str:
    """How the user runs this CLI from another terminal."""
    if shutil.which("backpack-vault"):
        return "backpack-vault"
    script = Path(sys.executable).parent / "backpack-vault"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m backpack_vault"


class Child:
    """A ``python -m backpack_vault ...`` child; output to a log file; stopped by its PID."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "backpack_vault", *self.args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        if self._proc is None:  # pragma: no cover - read only after start()
            raise DevError(f"the {self.name} was never started")
        return self._proc.pid

    def exit_code(self) -> int | None:
        """None while it runs; its exit code once it has exited."""
        return None if self._proc is None else self._proc.poll()

    def require_running(self) -> None:
        code = self.exit_code()
        if code is not None:
            raise DevError(
                f"the {self.name} (pid {self.pid}) exited with {code}; its log "
                f"{self.log_path} ends with:\n{self.tail()}"
            )

    def tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "  (no log)"
        return "\n".join(f"  {line}" for line in text.splitlines()[-lines:]) or "  (empty)"

    def stop(self) -> None:
        """SIGTERM, wait; SIGKILL when it does not exit in time. Safe to call twice."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=CHILD_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the environment --------------------------------------------------------------------


class DevEnv:
    """Starts everything onto one ExitStack, runs the demo and the tour; ``run()`` drives it."""

    def __init__(
        self,
        settings: Settings,
        options: DevOptions,
        stack: ExitStack,
        stop: threading.Event,
        logs: Path,
        out: TextIO,
    ) -> None:
        self.settings = settings
        self.options = options
        self.stack = stack
        self.stop = stop
        self.logs = logs
        self.out = out
        self.interval = options.check_interval or (
            TOUR_CHECK_INTERVAL if options.tour else DEV_CHECK_INTERVAL
        )
        self.dev_vault: DevVault | None = None
        self.children: list[Child] = []
        self.vault: Vault
        self.vault_settings: VaultSettings
        self.sandbox_url = ""
        self.daemon_url = ""
        self.daemon_token = Secret("")
        self.worker_token = Secret("")
        self.key = DEMO_KEY
        self.api_key = ""
        self.sandbox: SandboxAdmin
        self.broker: BrokerClient
        self.copy_client: httpx.Client
        self.sign_client: httpx.Client
        self.http: httpx.Client

    # -- output and waiting -------------------------------------------------------------

    def say(self, line: str = "") -> None:
        _write(self.out, line)

    def _check(self) -> None:
        if self.stop.is_set():
            raise Interrupted
        for child in self.children:
            child.require_running()

    def poll(self, condition: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
        """Call ``condition`` until it holds (True) or ``timeout`` passes (False)."""

        def check() -> bool:
            self._check()
            return condition()

        return wait_for(check, timeout, every=every, sleep=self.stop.wait)

    # -- servers ------------------------------------------------------------------------

    def start_vault(self) -> None:
        s = self.settings
        if self.options.vault_addr is not None:
            self.vault_settings = dataclasses.replace(s.vault, addr=self.options.vault_addr)
            where = f"{self.options.vault_addr} (--vault-addr; nothing is started)"
        else:
            server = DevVault(log_path=self.logs / "openbao.log")
            self.stack.callback(server.stop)
            server.start()
            self.dev_vault = server
            self.vault_settings = dataclasses.replace(
                s.vault,
                addr=server.addr,
                token=server.root_token,
                auth="token",
                cacert=None,
                namespace=None,
            )
            where = f"{server.addr}  pid {server.pid}  (in memory: gone on exit)"
        self.vault = Vault(self.vault_settings)
        self.stack.callback(self.vault.close)
        self.vault.login()
        self.service("OpenBao dev server" if self.dev_vault else "Vault", where)
        self._check()

    def vault_setup(self) -> None:
        settings = dataclasses.replace(self.settings, vault=self.vault_settings)
        report = setup(self.vault, settings)
        policies = sum(1 for item in report.items if item.kind == "policy")
        self.service(
            "vault setup",
            f"KV mount {self.vault_settings.kv_mount}/, {policies} policies, "
            f"worker policy {WORKER_POLICY}",
        )
        provisioner = Provisioner(self.vault)
        self.daemon_token = self._token(provisioner, DAEMON_POLICY, "backpack-vault dev daemon")
        hcl = render_worker_policy(
            self.vault_settings.grant_prefix,
            self.key.subaccount,
            self.key.name,
            DEMO_INSTRUCTIONS,
            copy=True,
        )
        provisioner.ensure_policy(WORKER_POLICY, hcl)
        self.worker_token = self._token(provisioner, WORKER_POLICY, "backpack-vault dev worker")
        self._check()

    def _token(self, provisioner: Provisioner, policy: str, purpose: str) -> Secret:
        token = provisioner.create_token([policy], ttl=TOKEN_TTL, meta={"purpose": purpose})
        if self.dev_vault is None:  # a real Vault: leave no live token behind
            self.stack.callback(self._revoke_quietly, token)
        return token

    def _revoke_quietly(self, token: Secret) -> None:
        with suppress(ServiceError):
            self.vault.revoke_accessor(self.vault.lookup_caller(token).accessor)

    def _spawn(self, name: str, args: list[str], env: dict[str, str], log: str) -> Child:
        child = Child(name, args, env, self.logs / log)
        self.stack.callback(child.stop)
        self.children.append(child.start())
        return child

    def start_sandbox(self) -> None:
        port = self.options.sandbox_port or _preferred_port(SANDBOX_PORT)
        self.sandbox_url = f"http://127.0.0.1:{port}"
        child = self._spawn(
            "sandbox exchange",
            ["sandbox", "--listen", f"127.0.0.1:{port}"],
            _clean_environ(),
            "sandbox.log",
        )

        def answers() -> bool:
            try:
                return httpx.get(f"{self.sandbox_url}/api/v1/ping", timeout=1).text == "pong"
            except httpx.HTTPError:
                return False

        if not self.poll(answers, timeout=20):
            raise DevError(f"the sandbox exchange did not answer on {self.sandbox_url} in 20 s")
        self.service("sandbox exchange", f"{self.sandbox_url}  pid {child.pid}")
        admin_http = httpx.Client(base_url=self.sandbox_url, timeout=5)
        self.stack.callback(admin_http.close)
        self.sandbox = SandboxAdmin(admin_http)

    def start_daemon(self) -> None:
        listen = self.options.listen or (
            self.settings.listen if self.settings.listen != DEFAULT_LISTEN else None
        )
        if listen is None:
            listen = f"127.0.0.1:{_preferred_port(DAEMON_PORT)}"
        settings = dataclasses.replace(
            self.settings,
            vault=self.vault_settings,
            listen=listen,
            checks=dataclasses.replace(
                self.settings.checks, backpack_url=self.sandbox_url, interval=self.interval
            ),
        )
        host, port = settings.listen_host_port
        self.daemon_url = f"http://{_connect_host(host)}:{port}"
        env = _clean_environ() | settings_env(settings)
        env |= {
            "VAULT_TOKEN": self.daemon_token.reveal(),
            "BACKPACK_VAULT_AUTH": "token",
            "BACKPACK_VAULT_LOG_FORMAT": "json",
            # the contract's names, spelled out (settings_env wrote them too)
            "VAULT_ADDR": self.vault_settings.addr,
            "BACKPACK_VAULT_BACKPACK_URL": self.sandbox_url,
            "BACKPACK_VAULT_LISTEN": listen,
            "BACKPACK_VAULT_CHECK_INTERVAL": f"{self.interval:g}",
        }
        child = self._spawn("daemon", ["serve"], env, "daemon.log")

        def ready() -> bool:
            try:
                return httpx.get(f"{self.daemon_url}/readyz", timeout=1).status_code == 200  # noqa: PLR2004
            except httpx.HTTPError:
                return False

        if not self.poll(ready, timeout=30):
            raise DevError(
                f"the daemon was not ready on {self.daemon_url}/readyz in 30 s; its log "
                f"{child.log_path} ends with:\n{child.tail()}"
            )
        self.service(
            "daemon", f"{self.daemon_url}  pid {child.pid}  (checks every {self.interval:g} s)"
        )
        self.broker = BrokerClient(
            self.daemon_url, vault_addr=self.vault_settings.addr, token=self.worker_token
        )
        self.stack.callback(self.broker.close)
        self.copy_client = self._exchange_client("copy")
        self.sign_client = self._exchange_client("sign")
        self.http = httpx.Client(timeout=5)
        self.stack.callback(self.http.close)

    def _exchange_client(self, mode: str) -> httpx.Client:
        auth = self.broker.auth(self.key, mode="copy" if mode == "copy" else "sign")
        client = httpx.Client(base_url=self.sandbox_url, auth=auth, timeout=10)
        self.stack.callback(client.close)
        return client

    def service(self, name: str, where: str) -> None:
        self.say(f"  {name:<19} {where}")

    # -- the demo, steps 1-4 ----------------------------------------------------------


# -- entry ----------------------------------------------------------------------------


def run(
    settings: Settings,
    options: DevOptions,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``backpack-vault dev [--tour]``: the exit code; everything started is stopped."""
    out = out or sys.stdout
    err = err or sys.stderr
    started = time.monotonic()
    stop = threading.Event()
    logs = options.logs or Path(tempfile.mkdtemp(prefix="backpack-vault-dev-"))
    logs.mkdir(parents=True, exist_ok=True)
    code = 0

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    with ExitStack() as stack:
        stack.enter_context(capture_signals(on_signal))
        env = DevEnv(settings, options, stack, stop, logs, out)
        what = "the tour" if options.tour else "the embedded default"
        if options.vault_addr is not None:
            env.say(
                f"backpack-vault dev: USING THE EXISTING VAULT AT {options.vault_addr} "
                "(--vault-addr): it writes a dev policy, a demo key and tokens there"
            )
        env.say(
            f"backpack-vault dev: starting {what} (Vault, sandbox exchange, daemon, demo worker)"
        )
        try:
            env.start_vault()
            env.vault_setup()
            env.start_sandbox()
            env.start_daemon()
            from backpack_vault.dev.demo import Demo  # noqa: PLC0415 - the demo builds on env

            demo = Demo(env)
            demo.demo()
            if options.tour:
                demo.tour()
                env.say(f"tour complete in {time.monotonic() - started:.1f} s")
            else:
                demo.banner(time.monotonic() - started)
                demo.wait()
        except Interrupted as exc:
            _write(err, exc.message)
            code = exc.exit_code
        except ServiceError as exc:
            _write(err, f"error: {exc.message}")
            code = exc.exit_code
        env.say("stopping everything...")
    if options.logs is None and code in (0, Interrupted.exit_code):
        shutil.rmtree(logs, ignore_errors=True)
    elif code:
        _write(err, f"logs kept in {logs}")
    env.say("stopped" if code == 0 else f"stopped (exit {code})")
    return code
