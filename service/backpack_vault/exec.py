"""``backpack-vault exec SUB/NAME -- CMD ARGS...``: a bot that reads its key from the environment.

The Vault Agent exec / envconsul pattern: fetch a copy, start CMD with the key in
its environment (or in a 0600 file, ``--file``), forward SIGTERM, SIGINT and
SIGHUP, exit with CMD's code. The key is watched; what a change does is
``--on-change [EVENT=]ACTION`` (events ``rotated``, ``retired``, ``revoked``,
``refresh``; actions ``restart``, ``stop``, ``signal:NAME``, ``ignore``).

A revoked key whose name has a ready standby is a failover in the making: with
the default ``revoked=stop``, exec stops CMD at once, waits (at most
``--failover-wait``, 60 s) for the daemon to switch the name to the standby, and
starts CMD again with it; only if no switch comes does it exit as for a revoke.

Exit codes: CMD's own (128+N when a signal N ended it); 6 when exec stopped CMD
because the key was retired or revoked, or the key is not usable at start; 2
settings; 4 the worker's Vault login or grant refused; 5 unknown key; 8 the
daemon or Vault unreachable; 126 CMD cannot run, 127 CMD not found.

Rules: the secret never reaches argv or a log line; the worker's own Vault
credentials (``VAULT_TOKEN``, secret-id) are not passed to CMD.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from backpack_vault.client.broker import BrokerClient, Copy
from backpack_vault.client.copies import CopyKeeper
from backpack_vault.client.watch import FINAL_STATUSES
from backpack_vault.core.keys import KeyRef
from backpack_vault.errors import ConfigError, KeyNotUsable, ServiceError

__all__ = ["EXIT_KEY_GONE", "PRESETS", "ExecOptions", "parse_on_change", "run"]

PRESETS: Final = {
    "default": ("BACKPACK_API_KEY", "BACKPACK_API_SECRET"),
    "freqtrade": ("FREQTRADE__EXCHANGE__KEY", "FREQTRADE__EXCHANGE__SECRET"),
    # ccxt reads no variables itself; its examples and docs use these names.
    "ccxt": ("CCXT_APIKEY", "CCXT_SECRET"),
}
EVENTS: Final = ("rotated", "retired", "revoked", "refresh")
DEFAULT_ACTIONS: Final = {
    "rotated": "restart",
    "refresh": "restart",
    "retired": "stop",
    "revoked": "stop",
}
EXIT_KEY_GONE: Final = KeyNotUsable.exit_code  # 6: stopped because the key was retired/revoked
# Not handed to the child: the worker's own Vault credentials.
_WITHHELD: Final = (
    "VAULT_TOKEN",
    "BACKPACK_VAULT_WORKER_SECRET_ID",
    "BACKPACK_VAULT_WORKER_ROLE_ID",
)
_FORWARDED: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_TICK_S: Final = 0.5
_STOPPING: Final = frozenset({signal.SIGTERM, signal.SIGINT})
_ASK_EVERY_S: Final = 2.0  # waiting for a failover: how often the daemon is asked directly


def parse_on_change(values: Sequence[str], *, file_sink: bool = False) -> dict[str, str]:
    """``[EVENT=]ACTION`` items over the defaults (no EVENT: rotated and refresh)."""
    actions = dict(DEFAULT_ACTIONS)
    if file_sink:
        actions["refresh"] = "ignore"  # the file is rewritten; the bot re-reads it
    for value in values:
        event, _, action = value.rpartition("=")
        events = (event,) if event else ("rotated", "refresh")
        if event and event not in EVENTS:
            raise ConfigError(f"--on-change: unknown event {event!r} ({', '.join(EVENTS)})")
        if action not in ("restart", "stop", "ignore"):
            name = action.removeprefix("signal:")
            if not action.startswith("signal:") or _signal(name) is None:
                raise ConfigError(
                    f"--on-change: unknown action {action!r} (restart, stop, ignore, signal:NAME)"
                )
        for one in events:
            actions[one] = action
    return actions


def _signal(name: str) -> signal.Signals | None:
    name = name.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    return getattr(signal.Signals, name, None)


@dataclass(frozen=True, slots=True)
class ExecOptions:
    key: KeyRef
    command: Sequence[str]
    key_env: str = PRESETS["default"][0]
    secret_env: str = PRESETS["default"][1]
    file: Path | None = None
    file_format: Literal["json", "env"] = "json"
    actions: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    grace_s: float = 10.0
    failover_wait_s: float = 60.0  # a revoke with a ready standby: how long to wait for it


def render(copy: Copy, options: ExecOptions) -> str:
    """The file sink's contents."""
    if options.file_format == "env":
        return (
            f"{options.key_env}={shlex.quote(copy.api_key)}\n"
            f"{options.secret_env}={shlex.quote(copy.api_secret.reveal())}\n"
        )
    return json.dumps(
        {
            "api_key": copy.api_key,
            "api_secret": copy.api_secret.reveal(),
            "key": str(copy.key),
            "version": copy.version,
            "expires_at": copy.expires_at,
        }
    )


def write_atomically(path: Path, text: str) -> None:
    """A 0600 file that is either the old or the new one, never a part: temp, fsync, rename."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        Path(temp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(temp).unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class _Runner:
    def __init__(
        self, broker: BrokerClient, options: ExecOptions, environ: Mapping[str, str]
    ) -> None:
        self.broker = broker
        self.options = options
        self.environ = {k: v for k, v in environ.items() if k not in _WITHHELD}
        self.events: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        # The keeper fetches, refreshes and watches the copy; its watcher thread only
        # queues what it saw, and this loop acts on it.
        self.keeper = CopyKeeper(
            broker, options.key, on_change=lambda event: self.events.put(("change", event.event))
        )
        self.child: subprocess.Popen[bytes] | None = None
        self.copy: Copy | None = None

    # -- the child ---------------------------------------------------------------------

    def _child_env(self, copy: Copy) -> dict[str, str]:
        env = dict(self.environ)
        if self.options.file is None:
            env[self.options.key_env] = copy.api_key
            env[self.options.secret_env] = copy.api_secret.reveal()
        else:
            env["BACKPACK_VAULT_KEY_FILE"] = str(self.options.file)
        return env

    def _provide(self, copy: Copy) -> None:
        self.copy = copy
        if self.options.file is not None:
            write_atomically(self.options.file, render(copy, self.options))

    def _start(self) -> None:
        if self.copy is None:  # pragma: no cover - a copy is fetched first
            raise ServiceError("no copy to start with")
        self.child = subprocess.Popen(self.options.command, env=self._child_env(self.copy))  # noqa: S603 - the operator's command

    def _terminate(self) -> int:
        """SIGTERM, wait up to the grace period, then SIGKILL; the child's code."""
        child = self.child
        if child is None:
            return 0
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(self.options.grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
        return child.wait()

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._provide(self.keeper.current())
            code = self._start_or_code()
            if code is not None:
                return code
            with _forwarding(self.events):
                return self._loop()
        finally:
            self._terminate()
            _remove(self.options.file)
            self.keeper.close()
            self.broker.close()

    def _start_or_code(self) -> int | None:
        """Start CMD; exec's exit code when it cannot be run (126, 127), else None."""
        try:
            self._start()
        except FileNotFoundError:
            why, code = "not found", 127
        except PermissionError:
            why, code = "cannot run", 126
        else:
            return None
        print(f"backpack-vault exec: {self.options.command[0]}: {why}", file=sys.stderr)  # noqa: T201
        return code

    def _loop(self) -> int:
        while True:
            child = self.child
            if child is not None and child.poll() is not None:
                return _exit_code(child.returncode)
            try:
                kind, value = self.events.get(timeout=_TICK_S)
            except queue.Empty:
                kind, value = "tick", None
            code = None
            if kind == "signal" and child is not None and child.poll() is None:
                child.send_signal(int(value))  # type: ignore[call-overload]
            elif kind == "change":
                code = self._follow(watched=True)
            elif kind == "tick" and self.keeper.due():
                code = self._follow(watched=False)
            if code is not None:
                return code

    def _follow(self, *, watched: bool) -> int | None:
        """Bring the child up to date with the keeper's copy, or with the key's end.

        A copy of another key or version is a rotation; a fresh copy of the same one is
        a ``refresh`` when it was due, and nothing when the watch made it (an ``active``
        change, say, that turned out to name the same key).
        """
        held = self.copy
        try:
            fresh = self.keeper.current()
        except KeyNotUsable as exc:
            return self._ended(exc.status) if exc.status in FINAL_STATUSES else None
        except ServiceError:
            return None  # the daemon may be back before the copy expires: next tick
        if fresh is held:
            return None  # the daemon could not answer: the copy held serves on
        self._provide(fresh)
        if held is not None and (fresh.api_key, fresh.version) == (held.api_key, held.version):
            return None if watched else self._apply("refresh")
        return self._apply("rotated")

    def _ended(self, status: str) -> int | None:
        """The key was retired or revoked: act on it (a revoke may be a failover)."""
        if status == "revoked":
            _remove(self.options.file)
            waits = self.options.failover_wait_s > 0
            if waits and self.options.actions.get("revoked") == "stop" and self._standby_ready():
                return self._await_failover()
        return self._apply(status)

    def _standby_ready(self) -> bool:
        """Whether the revoked key's name has a standby Backpack accepts, or has already
        switched to it: then the daemon's leader fails over within a check interval."""
        try:
            info = self.broker.info(self.options.key)
        except ServiceError:
            return False
        if info.get("status") == "active":
            return True  # switched already (or reinstated): the next copy serves
        standby = info.get("next") or {}
        return (
            info.get("status") == "revoked"
            and isinstance(standby, dict)
            and standby.get("role") == "standby"
            and standby.get("status") == "ready"
        )

    def _await_failover(self) -> int | None:
        """A revoke with a ready standby: stop the child (its key is dead) and start it
        again on the standby once the name has switched; exit as for a revoke if that
        does not happen within ``--failover-wait``: the daemon's leader switches within one
        check interval of the revoke, unless Backpack refuses the standby too."""
        self._terminate()
        self.child = None
        print(  # noqa: T201 - exec's own word on stderr; no key material
            f"backpack-vault exec: {self.options.key} was revoked and has a ready standby: "
            f"waiting up to {self.options.failover_wait_s:g} s for the switch",
            file=sys.stderr,
        )
        deadline = time.monotonic() + self.options.failover_wait_s
        ask_at = time.monotonic() + _ASK_EVERY_S
        while time.monotonic() < deadline:
            try:
                kind, value = self.events.get(timeout=_TICK_S)
            except queue.Empty:
                kind, value = "tick", None
            if kind == "signal" and isinstance(value, int) and value in _STOPPING:
                return 128 + value  # as if the child had been stopped by it
            try:
                fresh = self.keeper.current()
            except KeyNotUsable as exc:
                if exc.status == "retired":
                    return EXIT_KEY_GONE
                if time.monotonic() >= ask_at:  # the watch may be away: ask, now and then
                    ask_at = time.monotonic() + _ASK_EVERY_S
                    with contextlib.suppress(ServiceError):
                        self.keeper.recheck()
                continue  # revoked still: the switch has not reached us yet
            except ServiceError:
                continue  # the daemon is away for a moment
            self._provide(fresh)
            return self._start_or_code()
        return EXIT_KEY_GONE

    def _apply(self, event: str) -> int | None:
        action = self.options.actions.get(event, "ignore")
        final = event in FINAL_STATUSES
        if action == "stop":
            self._terminate()
            return EXIT_KEY_GONE if final else 0
        if action == "restart" and not final:
            self._terminate()
            return self._start_or_code()  # CMD removed meanwhile: 127, as at the start
        if action.startswith("signal:"):
            signum = _signal(action.removeprefix("signal:"))
            if self.child is not None and signum is not None and self.child.poll() is None:
                self.child.send_signal(signum)
        return None


@contextlib.contextmanager
def _forwarding(events: queue.SimpleQueue[tuple[str, object]]) -> Iterator[None]:
    """Signal handlers that only queue the signal; the old ones come back on exit."""

    def handler(signum: int, _frame: object) -> None:
        events.put(("signal", signum))

    previous = {sig: signal.signal(sig, handler) for sig in _FORWARDED}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(broker: BrokerClient, options: ExecOptions, environ: Mapping[str, str]) -> int:
    """Run the command under the key until it exits; its exit code (module docstring)."""
    if not options.command:
        raise ConfigError("exec needs a command after --")
    return _Runner(broker, options, environ).run()
