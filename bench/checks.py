"""Liveness checks at scale: sweeps of N keys against their floor, memory, Vault writes, cutoff.

    .venv/bin/python bench/checks.py [--keys 10000] [--concurrency 4] [--rounds 3]
                                     [--interval SECONDS] [--quick]

Starts its own OpenBao dev server and the sandbox exchange as a separate
process (``python -m backpack_vault sandbox --listen ...``), stores N generated
keys in Vault (a thread pool of Vault clients) spread over enough sub-accounts
that the default per-sub-account budget (120 requests a minute) is not the
bottleneck (at most 50 keys each, and at most half the budget spent by the
daemon's schedule), and registers every public key at the sandbox. Then:

(a) sweep: a child process that does nothing else runs ``Checker.check_many``
    over every key, so its time and peak RSS (``VmHWM``: ``ru_maxrss`` would count
    the parent's, which a child started by vfork inherits) are the checker's
    alone. Target: <= 60 s for 10000 keys, <= 150 MB. Side by side, in rounds
    that alternate with it, its floor: another child process that does only
    what any check must (per key, a raw KV read of the secret, ``sign_request``
    and one signed ``GET /api/v1/account``) with as many threads. The table
    shows the medians of the rounds and the checker's ratio to the floor.
(b) Vault writes: every key's KV metadata (``updated_time``, versions and
    custom_metadata) before and after the sweeps. Nothing changed status, so
    0 keys written.
(c) daemon: ``python -m backpack_vault serve`` over the same N keys with the
    check interval ``--interval`` (by default about 166 checks a second: 60 s for
    10000 keys, 10 s at least). Once every key has its check job, a few keys
    are revoked at the sandbox and ``POST /copy`` is polled until it answers
    409 (target: one interval + 2 s); then one more key is revoked and reported
    by a worker (``POST /report``): time to 409 (target: 2 s). Then the daemon's
    peak RSS (``VmHWM`` from /proc; target <= 150 MB) and every key's metadata
    again: only the revoked keys were written.

Everything runs on loopback, every wait has a deadline, and every process
started here is stopped here. Targets are reported, never asserted: the exit
status is 1 only when a result is wrong (a verdict other than VALID, a key
written that should not be, a revoked key that is never cut off). ``--quick``
(what ``make test`` runs) takes 100 keys, a 2 s interval and one round: the same
code and table in a few seconds, too small to be a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import requests
import requests.adapters

from backpack_vault import sign_request
from backpack_vault.backpack.rest import Exchange
from backpack_vault.checks import DEFAULT_BUDGET_PER_MINUTE, Checker, RequestBudget
from backpack_vault.config import Secret, VaultSettings, load
from backpack_vault.core.keys import KeyPair, KeyRecord, KeyRef, Origin, Status, generate_pair
from backpack_vault.daemon.serving import free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.logging import configure
from backpack_vault.vault.client import Provisioner, Vault

T = TypeVar("T")
R = TypeVar("R")

PREFIX = "bench"
STAMP = "2025-01-01T00:00:00+00:00"
MAX_KEYS_PER_SUBACCOUNT = 50
SETUP_THREADS = 16
SWEEP_TARGET_S = 60.0
RSS_TARGET_MB = 150.0
REPORT_CUTOFF_TARGET_S = 2.0
CUTOFF_SLACK_S = 2.0
REVOKED_BY_SCHEDULE = 3
WORKER_POLICY = "bench-worker"
DAEMON_RATE = 166  # checks a second the daemon is asked for by the default interval
QUICK = {"keys": 100, "interval": 2.0, "rounds": 1}


# -- small helpers ------------------------------------------------------------------------


def parallel(func: Callable[[T], R], items: Sequence[T], threads: int = SETUP_THREADS) -> list[R]:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(func, items))


def wait_for(what: str, condition: Callable[[], bool], timeout: float, every: float = 0.1) -> float:
    """Poll ``condition`` until it holds; return the seconds it took; exit after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


def mb(kib: float) -> float:
    """Kibibytes (as Linux reports RSS) to megabytes."""
    return kib * 1024 / 1e6


class PerThread:
    """One client per worker thread, all closed at the end."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def get(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._make()
            with self._lock:
                self._all.append(client)
        return client

    def close(self) -> None:
        for client in self._all:
            client.close()


def pooled_session(size: int) -> requests.Session:
    """A requests session whose pool holds ``size`` connections (the default holds 10)."""
    session = requests.Session()
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=size)
    session.mount("http://", adapter)
    return session


# -- processes ----------------------------------------------------------------------------


def base_env(home: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": home}


@contextmanager
def process(
    argv: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool]
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a child process, wait until ``ready``, and stop exactly that process at the end."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise SystemExit(f"{argv[2:4]} exited with {proc.returncode}; see {log}")
            try:
                return ready()
            except httpx.TransportError:
                return False

        wait_for(f"{' '.join(argv[2:4])} to be ready", up, timeout=60, every=0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def vm_hwm_kib(pid: int) -> float:
    """Peak resident set size of a running process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    raise SystemExit("no VmHWM in /proc: this benchmark needs Linux")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time a running process has used so far, from /proc/<pid>/stat."""
    if pid is None:
        return math.nan
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- setup --------------------------------------------------------------------------------


@dataclass
class Keys:
    refs: list[KeyRef]
    pairs: dict[KeyRef, KeyPair]
    subaccounts: int


def keys_per_subaccount(interval: float) -> int:
    """At most half of the default budget per sub-account goes to the daemon's schedule."""
    fits = int(DEFAULT_BUDGET_PER_MINUTE / 2 * interval / 60)
    return max(1, min(MAX_KEYS_PER_SUBACCOUNT, fits))


def make_keys(count: int, per_subaccount: int) -> Keys:
    subaccounts = max(1, math.ceil(count / per_subaccount))
    refs = [KeyRef(f"sub-{i % subaccounts:04d}", f"key-{i:05d}") for i in range(count)]
    return Keys(refs, {ref: generate_pair() for ref in refs}, subaccounts)


def store_keys(settings: VaultSettings, keys: Keys, exchange: str) -> None:
    def client() -> Vault:
        vault = Vault(settings, session=pooled_session(2))
        vault.login()
        return vault

    clients = PerThread(client)

    def store(ref: KeyRef) -> None:
        pair = keys.pairs[ref]
        record = KeyRecord(
            ref=ref,
            api_key=pair.api_key,
            read_only=False,
            status=Status.ACTIVE,
            origin=Origin.BACKPACK_UI,
            created_at=STAMP,
            status_since=STAMP,
            exchange=exchange,  # the keys belong to the sandbox the daemon checks
        )
        clients.get().create_key(record, pair.secret)

    try:
        parallel(store, keys.refs)
    finally:
        clients.close()


def register_keys(sandbox: str, keys: Keys) -> None:
    clients = PerThread(lambda: httpx.Client(base_url=sandbox, timeout=10))

    def register(ref: KeyRef) -> None:
        answer = clients.get().post("/_sandbox/keys", json={"api_key": keys.pairs[ref].api_key})
        answer.raise_for_status()

    try:
        parallel(register, keys.refs)
    finally:
        clients.close()


Snapshot = dict[KeyRef, tuple[str, int, str]]


def snapshot(settings: VaultSettings, refs: Sequence[KeyRef]) -> Snapshot:
    """Each key's KV metadata as Vault reports it: updated_time, current_version, custom."""
    token = settings.token.reveal() if settings.token else ""
    clients = PerThread(
        lambda: httpx.Client(base_url=settings.addr, headers={"X-Vault-Token": token}, timeout=10)
    )

    def read(ref: KeyRef) -> tuple[str, int, str]:
        answer = clients.get().get(f"/v1/{settings.kv_mount}/metadata/{settings.kv_prefix}/{ref}")
        answer.raise_for_status()
        data = answer.json()["data"]
        custom = json.dumps(data.get("custom_metadata"), sort_keys=True)
        return str(data["updated_time"]), int(data["current_version"]), custom

    try:
        return dict(zip(refs, parallel(read, refs), strict=True))
    finally:
        clients.close()


def written(before: Snapshot, after: Snapshot) -> list[KeyRef]:
    return sorted(ref for ref in before if before[ref] != after.get(ref))


# -- (a) the sweeps, each in a process of its own -----------------------------------------


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sweep_child(concurrency: int) -> int:
    """Run one sweep over every stored key; print one JSON line; nothing else in this process."""
    with Path(os.devnull).open("w", encoding="utf-8") as devnull:
        configure("json", "info", stream=devnull)  # the daemon logs every verdict at info too
        settings = load(os.environ)
        vault = Vault(settings.vault, session=pooled_session(concurrency + 4))
        vault.login()
        started = time.monotonic()
        refs = vault.list_refs()
        listed = time.monotonic()
        limits = httpx.Limits(max_connections=concurrency + 4)
        with httpx.Client(timeout=settings.checks.timeout, limits=limits) as http:
            exchange = Exchange(
                http, settings.checks.backpack_url, timeout_s=settings.checks.timeout
            )
            checker = Checker(
                vault, exchange, budget=RequestBudget(settings.checks.subaccount_budget_per_minute)
            )
            swept = time.monotonic()
            cpu_before = cpu_self()
            results = checker.check_many(refs, concurrency=concurrency)
            done = time.monotonic()
        vault.close()
    report = {
        "keys": len(refs),
        "list_s": listed - started,
        "sweep_s": done - swept,
        "verdicts": Counter(r.label for r in results),
        "changed": sum(r.changed for r in results),
        "probes": sum(r.probes for r in results),
        "hwm_kib": vm_hwm_kib(os.getpid()),
        "cpu_s": cpu_self() - cpu_before,
    }
    print(json.dumps(report))
    return 0


def floor_child(concurrency: int) -> int:
    """The floor of a sweep: per key only a raw KV read, sign_request and one signed probe."""
    settings = load(os.environ)
    vs = settings.vault
    vault = Vault(vs)
    vault.login()
    refs = vault.list_refs()  # listed as the checker's sweep lists, and like it not timed
    vault.close()
    token = vs.token.reveal() if vs.token else ""
    limits = httpx.Limits(max_connections=concurrency + 4)
    with (
        httpx.Client(
            base_url=vs.addr, headers={"X-Vault-Token": token}, limits=limits, timeout=10
        ) as kv,
        httpx.Client(base_url=settings.checks.backpack_url, limits=limits, timeout=10) as exchange,
    ):

        def probe(ref: KeyRef) -> int:
            data = kv.get(f"/v1/{vs.kv_mount}/data/{vs.kv_prefix}/{ref}").json()["data"]["data"]
            signed = sign_request(data["api_key"], data["api_secret"], "accountQuery", {}, now_ms())
            return exchange.get("/api/v1/account", headers=signed).status_code

        swept = time.monotonic()
        cpu_before = cpu_self()
        statuses = parallel(probe, refs, threads=concurrency)
        done = time.monotonic()
    report = {
        "keys": len(refs),
        "sweep_s": done - swept,
        "accepted": statuses.count(200),
        "hwm_kib": vm_hwm_kib(os.getpid()),
        "cpu_s": cpu_self() - cpu_before,
    }
    print(json.dumps(report))
    return 0


def run_child(env: dict[str, str], child: str, concurrency: int, log: Path) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", child, "--concurrency", str(concurrency)]
    with log.open("ab") as err:
        done = subprocess.run(
            argv, env=env, stdout=subprocess.PIPE, stderr=err, timeout=900, check=False
        )
    if done.returncode != 0:
        raise SystemExit(f"the {child} process failed ({done.returncode}); see {log}")
    report: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return report


@dataclass
class Sweeps:
    """Rounds of the floor and the checker, alternating; medians across rounds."""

    floors: list[dict[str, Any]] = field(default_factory=list)
    sweeps: list[dict[str, Any]] = field(default_factory=list)

    def median(self, of: str, key: str, per_key: bool = False) -> float:
        runs = self.floors if of == "floor" else self.sweeps
        return statistics.median(r[key] / (r["keys"] if per_key else 1) for r in runs)

    def worst(self, of: str, key: str) -> float:
        return max(r[key] for r in (self.floors if of == "floor" else self.sweeps))


def run_sweeps(
    env: dict[str, str],
    args: argparse.Namespace,
    sandbox: httpx.Client,
    pids: tuple[int | None, int | None],
    work: Path,
) -> Sweeps:
    """``args.rounds`` times: a floor sweep, then a checker sweep (sandbox and Vault CPU too)."""
    found = Sweeps()
    for round_no in range(1, args.rounds + 1):
        floor = run_child(env, "floor", args.concurrency, work / "floor.log")
        found.floors.append(floor)
        cpu = (cpu_seconds(pids[0]), cpu_seconds(pids[1]))
        requests_before = sandbox.get("/_sandbox/stats").json()["total"]
        sweep = run_child(env, "sweep", args.concurrency, work / "sweep.log")
        sweep["exchange_requests"] = (
            sandbox.get("/_sandbox/stats").json()["total"] - requests_before
        )
        sweep["sandbox_cpu_s"] = cpu_seconds(pids[0]) - cpu[0]
        sweep["vault_cpu_s"] = cpu_seconds(pids[1]) - cpu[1]
        found.sweeps.append(sweep)
        print(
            f"round {round_no}: floor {floor['sweep_s']:.2f} s, checker {sweep['sweep_s']:.2f} s "
            f"({sweep['sweep_s'] / floor['sweep_s']:.2f}x); sweep {json.dumps(sweep)}",
            flush=True,
        )
    return found


# -- (c) the daemon -----------------------------------------------------------------------


@dataclass
class DaemonRun:
    sync_s: float = 0.0
    hwm_kib: float = 0.0
    schedule_cutoffs: list[float] = field(default_factory=list)
    report_cutoff: float = math.nan
    written: list[KeyRef] = field(default_factory=list)
    revoked: list[KeyRef] = field(default_factory=list)


_CHECKED_KEYS = re.compile(rb"^backpack_vault_checked_keys (\S+)$", re.MULTILINE)


def checked_keys(http: httpx.Client) -> int:
    found = _CHECKED_KEYS.search(http.get("/metrics").content)
    return int(float(found.group(1))) if found else 0


def poll_copy_until_409(
    http: httpx.Client, token: Secret, refs: Sequence[KeyRef], timeout: float
) -> dict[KeyRef, float]:
    """Poll ``POST /copy`` of every key in turn until each answers 409; seconds to each 409."""
    started = time.monotonic()
    headers = {"X-Vault-Token": token.reveal()}
    cut: dict[KeyRef, float] = {}
    while len(cut) < len(refs):
        for ref in refs:
            if ref in cut:
                continue
            status = http.post(f"/v1/keys/{ref}/copy", headers=headers).status_code
            if status == 409:
                cut[ref] = time.monotonic() - started
            elif status != 200:
                raise SystemExit(f"POST /v1/keys/{ref}/copy answered {status} before 409")
        if time.monotonic() - started > timeout:
            raise SystemExit(f"keys still handed out {timeout:.0f} s after revocation")
        time.sleep(0.05)
    return cut


def run_daemon(
    env: dict[str, str],
    vault: Vault,
    sandbox: httpx.Client,
    keys: Keys,
    interval: float,
    log: Path,
) -> DaemonRun:
    run = DaemonRun()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = env | {
        "BACKPACK_VAULT_LISTEN": f"127.0.0.1:{port}",
        "BACKPACK_VAULT_CHECK_INTERVAL": str(interval),
        "BACKPACK_VAULT_LOG_FORMAT": "json",
    }
    provisioner = Provisioner(vault)
    provisioner.ensure_policy(
        WORKER_POLICY, 'path "backpack-broker/+/+/copy" { capabilities = ["read"] }'
    )
    worker = provisioner.create_token([WORKER_POLICY])
    picks = random.Random(7).sample(keys.refs, REVOKED_BY_SCHEDULE + 1)  # noqa: S311
    scheduled, reported = picks[:-1], picks[-1]
    run.revoked = sorted(picks)
    before = snapshot(vault.settings, keys.refs)
    argv = [sys.executable, "-m", "backpack_vault", "serve"]
    with (
        httpx.Client(base_url=url, timeout=30) as http,
        process(argv, env, log, lambda: http.get("/readyz").status_code == 200) as proc,
    ):
        run.sync_s = wait_for(
            "the daemon to schedule every key",
            lambda: checked_keys(http) >= len(keys.refs),
            timeout=300,
            every=0.5,
        )
        print(
            f"daemon: every key scheduled after {run.sync_s:.1f} s; revoking {len(scheduled)} "
            f"keys at the sandbox (409 expected within {interval:g} s)",
            flush=True,
        )
        for ref in scheduled:
            sandbox.post("/_sandbox/keys/revoke", json={"api_key": keys.pairs[ref].api_key})
        cut = poll_copy_until_409(http, worker, scheduled, timeout=interval * 1.5 + 30)
        run.schedule_cutoffs = [cut[ref] for ref in scheduled]
        sandbox.post("/_sandbox/keys/revoke", json={"api_key": keys.pairs[reported].api_key})
        started = time.monotonic()
        answer = http.post(
            f"/v1/keys/{reported}/report",
            headers={"X-Vault-Token": worker.reveal()},
            json={"reason": "Backpack answered 401 UNAUTHORIZED"},
        )
        if answer.status_code != 202:
            raise SystemExit(f"the report answered {answer.status_code}")
        poll_copy_until_409(http, worker, [reported], timeout=30)
        run.report_cutoff = time.monotonic() - started
        run.hwm_kib = vm_hwm_kib(proc.pid)
    run.written = written(before, snapshot(vault.settings, keys.refs))
    return run


# -- the report ---------------------------------------------------------------------------


@dataclass
class Row:
    what: str
    target: str
    measured: str
    ok: bool | None = None


def print_table(rows: list[Row]) -> None:
    widths = [max(len(getattr(r, name)) for r in rows) for name in ("what", "target", "measured")]
    head = ("", "target", "measured")
    print(f"{head[0]:<{widths[0]}}  {head[1]:<{widths[1]}}  {head[2]:<{widths[2]}}  ok")
    for row in rows:
        ok = "" if row.ok is None else ("yes" if row.ok else "NO")
        print(
            f"{row.what:<{widths[0]}}  {row.target:<{widths[1]}}  {row.measured:<{widths[2]}}  {ok}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    # The checker is CPU-bound under one GIL: a few threads overlap the round trips, more
    # only contend (measured with 2000 keys: 1 thread 400/s, 4 threads 425/s, 16 fewer).
    parser.add_argument("--concurrency", type=int, default=4, help="sweep threads")
    parser.add_argument(
        "--rounds", type=int, default=3, help="sweeps of the floor and the checker, alternating"
    )
    parser.add_argument(
        "--interval",
        type=float,
        help="the daemon's check interval, seconds (default: keys/166 within 10..300, so the "
        "daemon checks about 166 keys a second: 60 s for 10000 keys)",
    )
    parser.add_argument("--quick", action="store_true", help=f"defaults for a smoke run: {QUICK}")
    parser.add_argument("--child", choices=("sweep", "floor"), help=argparse.SUPPRESS)
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)  # flags given explicitly still win
    args = parser.parse_args()
    if args.child == "sweep":
        return sweep_child(args.concurrency)
    if args.child == "floor":
        return floor_child(args.concurrency)
    if args.interval is None:
        args.interval = float(min(300, max(10, round(args.keys / DAEMON_RATE))))
    configure("console", "warning")
    work = Path(tempfile.mkdtemp(prefix="bench-checks-"))
    print(f"logs in {work} (removed unless a result is wrong)", flush=True)
    rows, wrong = run(args, work)
    print()
    print(f"medians of {args.rounds} round(s); targets are reported, not asserted")
    print_table(rows)
    missed = [row.what for row in rows if row.ok is False]
    if missed:
        print(f"targets missed: {'; '.join(missed)}")
    if wrong:
        print(f"WRONG: {'; '.join(wrong)} (logs kept in {work})")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


def run(args: argparse.Namespace, work: Path) -> tuple[list[Row], list[str]]:
    """Set up, sweep, run the daemon; the table's rows and what came out wrong."""
    started = time.monotonic()
    sandbox_port = free_port()
    sandbox_listen = f"127.0.0.1:{sandbox_port}"
    sandbox_url = f"http://{sandbox_listen}"

    with (
        DevVault(log_path=work / "bao.log") as dev,
        httpx.Client(base_url=sandbox_url, timeout=30) as sandbox,
        process(
            [sys.executable, "-m", "backpack_vault", "sandbox", "--listen", sandbox_listen],
            base_env(str(work)),
            work / "sandbox.log",
            lambda: sandbox.get("/api/v1/ping").status_code == 200,
        ) as sandbox_proc,
    ):
        settings = VaultSettings(addr=dev.addr, token=dev.root_token, kv_prefix=PREFIX)
        env = base_env(str(work)) | {
            "VAULT_ADDR": dev.addr,
            "VAULT_TOKEN": dev.root_token.reveal(),
            "BACKPACK_VAULT_KV_PREFIX": PREFIX,
            "BACKPACK_VAULT_BACKPACK_URL": sandbox_url,
        }
        per_sub = keys_per_subaccount(args.interval)
        keys = make_keys(args.keys, per_sub)
        print(
            f"{args.keys} keys over {keys.subaccounts} sub-accounts, {per_sub} each; budget "
            f"{DEFAULT_BUDGET_PER_MINUTE} requests/min per sub-account (the default): a sweep "
            f"spends {per_sub}, the daemon's {args.interval:g} s schedule "
            f"{per_sub * 60 / args.interval:.0f} a minute",
            flush=True,
        )
        t = time.monotonic()
        store_keys(settings, keys, sandbox_url)
        register_keys(sandbox_url, keys)
        print(f"setup: stored and registered in {time.monotonic() - t:.1f} s", flush=True)

        vault = Vault(settings)
        vault.login()
        before = snapshot(settings, keys.refs)
        sweeps = run_sweeps(env, args, sandbox, (sandbox_proc.pid, dev.pid), work)
        sweep_writes = written(before, snapshot(settings, keys.refs))
        daemon = run_daemon(env, vault, sandbox, keys, args.interval, work / "daemon.log")
        vault.close()

    wrong = [
        f"floor: {floor['accepted']} of {args.keys} probes accepted"
        for floor in sweeps.floors
        if floor["accepted"] != args.keys
    ]
    wrong += [
        f"sweep: verdicts {sweep['verdicts']} for {args.keys} keys"
        for sweep in sweeps.sweeps
        if sweep["verdicts"].get("VALID", 0) != args.keys
    ]
    if sweep_writes:
        wrong.append(f"keys written to Vault by the unchanged sweeps: {len(sweep_writes)}")
    if daemon.written != daemon.revoked:
        wrong.append(f"the daemon wrote {daemon.written}, not just the revoked {daemon.revoked}")

    floor_s, sweep_s = sweeps.median("floor", "sweep_s"), sweeps.median("sweep", "sweep_s")
    keys_swept = sweeps.sweeps[0]["keys"]
    cutoff_target = args.interval + CUTOFF_SLACK_S
    worst = max(daemon.schedule_cutoffs)
    cuts = ", ".join(f"{c:.1f}" for c in daemon.schedule_cutoffs)
    sweep_rss, floor_rss = (
        mb(sweeps.worst("sweep", "hwm_kib")),
        mb(sweeps.worst("floor", "hwm_kib")),
    )
    rows = [
        Row(
            f"floor: KV read + sign_request + 1 probe a key, {args.concurrency} threads",
            "",
            f"{floor_s:.2f} s ({keys_swept / floor_s:.0f} /s)",
        ),
        Row(
            f"sweep of {keys_swept} keys, concurrency {args.concurrency}",
            f"<= {SWEEP_TARGET_S:.0f} s",
            f"{sweep_s:.2f} s ({keys_swept / sweep_s:.0f} /s)",
            sweep_s <= SWEEP_TARGET_S,
        ),
        Row("sweep / floor", "", f"{sweep_s / floor_s:.2f}x"),
        Row(
            "requests to the exchange per check",
            "",
            f"{sweeps.median('sweep', 'exchange_requests', per_key=True):.2f}"
            f" ({sweeps.median('sweep', 'probes', per_key=True):.2f} signed)",
        ),
        Row(
            "CPU per check: checker / sandbox / Vault",
            "",
            " / ".join(
                f"{sweeps.median('sweep', k, per_key=True) * 1000:.2f}"
                for k in ("cpu_s", "sandbox_cpu_s", "vault_cpu_s")
            )
            + f" ms (floor {sweeps.median('floor', 'cpu_s', per_key=True) * 1000:.2f})",
        ),
        Row(
            "peak RSS, sweep process (VmHWM, worst)",
            f"<= {RSS_TARGET_MB:.0f} MB",
            f"{sweep_rss:.0f} MB ({sweep_rss / floor_rss:.2f}x the floor's {floor_rss:.0f})",
            sweep_rss <= RSS_TARGET_MB,
        ),
        Row(
            f"peak RSS, daemon, {args.keys} check jobs (VmHWM)",
            f"<= {RSS_TARGET_MB:.0f} MB",
            f"{mb(daemon.hwm_kib):.0f} MB",
            mb(daemon.hwm_kib) <= RSS_TARGET_MB,
        ),
        Row(
            "keys written to Vault by the unchanged sweeps",
            "0",
            f"{len(sweep_writes)} of {len(keys.refs)}",
            not sweep_writes,
        ),
        Row("daemon: time to schedule every key", "", f"{daemon.sync_s:.1f} s"),
        Row(
            f"cutoff after revocation, worst of {REVOKED_BY_SCHEDULE}",
            f"<= {cutoff_target:g} s",
            f"{worst:.1f} s ({cuts}; {worst / args.interval:.2f}x the interval)",
            worst <= cutoff_target,
        ),
        Row(
            "cutoff after a worker report",
            f"<= {REPORT_CUTOFF_TARGET_S:g} s",
            f"{daemon.report_cutoff:.2f} s",
            daemon.report_cutoff <= REPORT_CUTOFF_TARGET_S,
        ),
        Row(
            "keys written by the daemon",
            f"the {len(daemon.revoked)} revoked",
            f"{len(daemon.written)}",
            daemon.written == daemon.revoked,
        ),
    ]
    rows.append(Row("wall time of the whole benchmark", "", f"{time.monotonic() - started:.0f} s"))
    return rows, wrong


if __name__ == "__main__":
    sys.exit(main())
