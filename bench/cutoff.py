"""Cutoff: from a command's return to the moment both replicas refuse the key.

    .venv/bin/python bench/cutoff.py [--trials 20] [--check-interval 2] [--confirm-delay 1]
                                     [--quick]

Starts its own OpenBao dev server, the sandbox exchange (its own process) and two
daemons (replicas, each ``backpack-vault serve`` in its own process, as deployed)
on loopback, all on one Vault. Each trial stores a fresh key (it belongs to the
sandbox, which accepts it), waits until both replicas hand it out, takes one
wrapped copy from each replica and leaves it unclaimed, and sets workers
hammering both replicas: per replica one worker fetching and unwrapping copies
(``BrokerClient.copy``) and one asking for signatures, each every 20 ms. Then
one command, and the clock starts when it returns:

    retire    ``Vault.set_status(RETIRED)``, what ``keys retire`` does
    revoke    ``Vault.set_status(REVOKED, reason=...)``, what ``keys revoke`` does
    report    the key is revoked at the sandbox first; a worker reports the
              rejection to replica A (``POST /report``): A checks it at once
    sandbox   the key is revoked at the sandbox; the leader's scheduled check
              (every ``--check-interval`` s) finds it

The cutoff of a trial is the latest of: per replica and per handout kind, the end
of the first refused request after which none succeeded; per replica, the moment
its unclaimed wrapping token no longer looks up (``sys/wrapping/lookup``). The
table gives p50, p99 and max per kind, and the handouts that succeeded although
their request started after the command returned. The report and sandbox kinds
include the checks' confirmation (``--confirm-delay``, the daemon's default 1 s)
and, for sandbox, the wait for the next scheduled check. Figures are printed,
never asserted: the exit status is 1 only when a key is never cut off.
``--quick`` (what ``make test`` runs) takes two trials of each kind, a 1 s check
interval and a 0.2 s confirmation: the same code and table, too few to measure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backpack_vault.client.broker import BrokerClient
from backpack_vault.config import Secret, VaultSettings
from backpack_vault.core.keys import KeyRef, Status
from backpack_vault.daemon.serving import free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import ServiceError
from backpack_vault.logging import configure
from backpack_vault.testing import now_iso, store_key
from backpack_vault.vault.client import Vault

KINDS = ("retire", "revoke", "report", "sandbox")
QUICK = {"trials": 2, "check_interval": 1.0, "confirm_delay": 0.2}
PACE_S = 0.02  # each worker sends a request at most every 20 ms
GIVE_UP_S = 20.0  # a key not cut off by then counts as never cut off
TARGET_S = 1.0  # operator actions: every replica within 1 s (p99)
LAUNCHER = (
    "import os, sys\n"
    "from backpack_vault.config import load\n"
    "from backpack_vault.daemon import Daemon\n"
    "from backpack_vault.logging import configure\n"
    "configure('json', 'warning')\n"
    "daemon = Daemon(load(os.environ), confirm_delay_s=float(os.environ['BENCH_CONFIRM_DELAY']))\n"
    "sys.exit(daemon.run())\n"
)


# -- processes ------------------------------------------------------------------------------


def wait_for(what: str, condition: Callable[[], bool], timeout: float, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout:g} s")
        time.sleep(every)


@contextmanager
def process(argv: list[str], env: dict[str, str], log: Path, url: str) -> Iterator[str]:
    """A child process serving ``url``; ready when ``url`` answers 200; stopped by its PID."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise SystemExit(f"{argv[1:4]} exited with {proc.returncode}; see {log}")
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(f"{url} to answer", up, 60)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def daemon_env(
    dev: DevVault, sandbox_url: str, port: int, args: argparse.Namespace
) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),  # noqa: S108 - only if HOME is unset
        "VAULT_ADDR": dev.addr,
        "VAULT_TOKEN": dev.root_token.reveal(),
        "BACKPACK_VAULT_LISTEN": f"127.0.0.1:{port}",
        "BACKPACK_VAULT_BACKPACK_URL": sandbox_url,
        "BACKPACK_VAULT_CHECK_INTERVAL": str(args.check_interval),
        "BACKPACK_VAULT_LEASE_TTL": "3",
        "BENCH_CONFIRM_DELAY": str(args.confirm_delay),
    }


# -- one trial ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attempt:
    stream: str  # "A copy", "B sign", ...
    started: float
    ended: float
    ok: bool


@dataclass
class Trial:
    kind: str
    t0: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    tokens_dead: dict[str, float] = field(default_factory=dict)  # replica -> when
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def record(self, attempt: Attempt) -> None:
        with self.lock:
            self.attempts.append(attempt)

    def stream_cutoff(self, stream: str) -> float | None:
        """When ``stream`` refused for good: the end of its first refusal after its last
        success (both started after the command returned); None while not yet."""
        with self.lock:
            after = [a for a in self.attempts if a.stream == stream and a.started >= self.t0]
        last_ok = max((a.started for a in after if a.ok), default=self.t0)
        refused = [a.ended for a in after if not a.ok and a.started >= last_ok]
        return min(refused) if refused else None

    def cutoff(self, streams: list[str], replicas: list[str]) -> float | None:
        """Seconds from the command's return until every stream refused and every token died."""
        times = [self.stream_cutoff(s) for s in streams]
        times += [self.tokens_dead.get(r) for r in replicas]
        if any(t is None for t in times):
            return None
        return max(t for t in times if t is not None) - self.t0

    def leaked(self) -> int:
        with self.lock:
            return sum(1 for a in self.attempts if a.ok and a.started >= self.t0)


def hammer(trial: Trial, stream: str, op: Callable[[], object]) -> None:
    """One worker: ``op`` every PACE_S until the trial stops; every attempt recorded."""
    while not trial.stop.is_set():
        started = time.monotonic()
        try:
            op()
            ok = True
        except ServiceError:
            ok = False
        ended = time.monotonic()
        trial.record(Attempt(stream, started, ended, ok))
        trial.stop.wait(max(0.0, PACE_S - (ended - started)))


def watch_token(trial: Trial, replica: str, vault_addr: str, wrap_token: str) -> None:
    """Poll sys/wrapping/lookup (it does not use the token up) until the token is gone."""
    with httpx.Client(timeout=5) as http:
        while not trial.stop.is_set():
            answer = http.post(f"{vault_addr}/v1/sys/wrapping/lookup", json={"token": wrap_token})
            if answer.status_code != 200:
                trial.tokens_dead[replica] = time.monotonic()  # maybe before the command returned
                return
            trial.stop.wait(0.005)


@dataclass
class Bench:
    args: argparse.Namespace
    dev: DevVault
    vault: Vault  # the operator's own client, as the CLI makes it
    sandbox: httpx.Client
    replicas: dict[str, str]  # name -> URL
    clients: dict[str, BrokerClient]
    counter: int = 0

    def run_trial(self, kind: str) -> tuple[float | None, int]:
        self.counter += 1
        ref = KeyRef("main", f"{kind}-{self.counter}")
        pair = store_key(self.vault, ref, exchange=self.args.sandbox_url)
        self.sandbox.post("/_sandbox/keys", json={"api_key": pair.api_key}).raise_for_status()
        for name, client in self.clients.items():
            wait_for(f"{name} hands out {ref}", lambda c=client: _works(c, ref), 10)
        if kind == "sandbox":  # the leader has scheduled the key: it was probed once
            wait_for(f"a check of {ref}", lambda: self._probes(pair.api_key) > 0, 30)
        trial = Trial(kind)
        threads = []
        for name, client in self.clients.items():
            wrap = httpx.post(
                f"{self.replicas[name]}/v1/keys/{ref}/copy",
                headers={"X-Vault-Token": self.dev.root_token.reveal()},
            ).json()["wrap_token"]
            threads.append(
                threading.Thread(target=watch_token, args=(trial, name, self.dev.addr, wrap))
            )
            threads.append(
                threading.Thread(
                    target=hammer, args=(trial, f"{name} copy", lambda c=client: c.copy(ref))
                )
            )
            threads.append(
                threading.Thread(
                    target=hammer,
                    args=(trial, f"{name} sign", lambda c=client: c.sign(ref, "accountQuery")),
                )
            )
        for thread in threads:
            thread.start()
        time.sleep(0.1)  # the workers are under way
        self.command(kind, ref, pair.api_key)
        trial.t0 = time.monotonic()
        streams = [f"{r} {h}" for r in self.replicas for h in ("copy", "sign")]
        deadline = trial.t0 + GIVE_UP_S
        cutoff = None
        while time.monotonic() < deadline:
            cutoff = trial.cutoff(streams, list(self.replicas))
            if cutoff is not None:
                break
            time.sleep(0.01)
        time.sleep(0.1)  # a handout after the cutoff would show now
        trial.stop.set()
        for thread in threads:
            thread.join(10)
        if cutoff is not None:
            cutoff = trial.cutoff(streams, list(self.replicas))  # with the late attempts too
        return cutoff, trial.leaked()

    def command(self, kind: str, ref: KeyRef, api_key: str) -> None:
        """The action whose return starts the clock."""
        if kind == "retire":
            self.vault.set_status(ref, Status.RETIRED, now=now_iso())
        elif kind == "revoke":
            self.vault.set_status(
                ref, Status.REVOKED, now=now_iso(), reason="bench: leaked", actor="bench"
            )
        else:
            revoked = self.sandbox.post("/_sandbox/keys/revoke", json={"api_key": api_key})
            revoked.raise_for_status()
            if kind == "report":
                self.clients["A"].report(ref, "Backpack answered 401 UNAUTHORIZED")

    def _probes(self, api_key: str) -> int:
        stats = self.sandbox.get("/_sandbox/stats").json()
        return int(stats["keys"].get(api_key, {}).get("GET /api/v1/account", 0))


def _works(client: BrokerClient, ref: KeyRef) -> bool:
    try:
        client.sign(ref, "accountQuery")
        client.copy(ref)
    except ServiceError:
        return False
    return True


# -- the report -----------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def print_table(
    results: dict[str, list[tuple[float | None, int]]], args: argparse.Namespace
) -> None:
    print()
    print(
        f"cutoff: command returned -> both replicas refuse copy and sign and their unclaimed "
        f"wrapping tokens are revoked (feed polled every 0.2 s; checks every "
        f"{args.check_interval:g} s, confirmation {args.confirm_delay:g} s)"
    )
    print(
        f"    {'kind':<8} {'trials':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'never':>6} {'handouts after return':>22}"
    )
    for kind, trials in results.items():
        times = [t * 1000 for t, _ in trials if t is not None]
        never = sum(1 for t, _ in trials if t is None)
        leaked = [n for _, n in trials]
        row = (
            f"{statistics.median(times):>8.0f} {percentile(times, 0.99):>8.0f} {max(times):>8.0f}"
            if times
            else f"{'-':>8} {'-':>8} {'-':>8}"
        )
        print(
            f"    {kind:<8} {len(trials):>6} {row} {never:>6} "
            f"{sum(leaked):>10} (max {max(leaked)}/trial)"
        )
    operator = [t for k in ("retire", "revoke") for t, _ in results.get(k, []) if t is not None]
    if operator:
        p99 = percentile(operator, 0.99)
        verdict = "meets" if p99 <= TARGET_S else "MISSES"
        print(f"operator actions: p99 {p99 * 1000:.0f} ms -> {verdict} the 1 s target")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="per kind")
    parser.add_argument("--check-interval", type=float, default=2.0, help="seconds")
    parser.add_argument("--confirm-delay", type=float, default=1.0, help="seconds")
    parser.add_argument("--quick", action="store_true", help=f"defaults for a smoke run: {QUICK}")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)  # flags given explicitly still win
    args = parser.parse_args()
    configure("console", "warning")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-cutoff-"))
    sandbox_port, ports = free_port(), {"A": free_port(), "B": free_port()}
    args.sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(work)}
    sandbox_argv = [
        sys.executable, "-m", "backpack_vault", "sandbox", "--listen", f"127.0.0.1:{sandbox_port}",
    ]  # fmt: skip
    results: dict[str, list[tuple[float | None, int]]] = {kind: [] for kind in KINDS}
    with (
        DevVault(log_path=work / "bao.log") as dev,
        process(sandbox_argv, base, work / "sandbox.log", f"{args.sandbox_url}/api/v1/ping"),
        httpx.Client(base_url=args.sandbox_url, timeout=10) as sandbox,
    ):
        replicas: dict[str, str] = {}
        with contextlib.ExitStack() as stack:
            for name, port in ports.items():
                env = daemon_env(dev, args.sandbox_url, port, args)
                url = f"http://127.0.0.1:{port}"
                argv = [sys.executable, "-c", LAUNCHER]
                stack.enter_context(
                    process(argv, env, work / f"daemon-{name}.log", f"{url}/readyz")
                )
                replicas[name] = url
            vault = Vault(VaultSettings(addr=dev.addr, token=dev.root_token))
            vault.login()
            clients = {
                name: stack.enter_context(
                    BrokerClient(url, vault_addr=dev.addr, token=Secret(dev.root_token.reveal()))
                )
                for name, url in replicas.items()
            }
            bench = Bench(args, dev, vault, sandbox, replicas, clients)
            for _ in range(args.trials):
                for kind in KINDS:  # kinds alternate, so drift hits all of them alike
                    results[kind].append(bench.run_trial(kind))
            vault.close()
    print_table(results, args)
    print(f"(finished in {time.monotonic() - started:.1f} s)")
    never = sum(1 for trials in results.values() for t, _ in trials if t is None)
    if never:
        print(f"WRONG: {never} key(s) never cut off within {GIVE_UP_S:g} s (logs kept in {work})")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
