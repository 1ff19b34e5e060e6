"""Profile the daemon's hot path under load: py-spy on the daemon process while it serves.

    .venv/bin/python scripts/profile.py [--routes sign,handout,copy] [--seconds 10]
                                        [--workers 32] [--rounds 1] [--top 12] [--rate 100]
                                        [--daemon NAME=SOURCE[:no-uvloop] ...]
                                        [--log-level info] [--measure-only] [--no-pin]
                                        [--all-threads] [--nonblocking] [--raw-dir DIR]

Starts its own OpenBao dev server, the sandbox exchange (the daemons' liveness
checks go there) and the daemon as a separate process, as it is deployed (JSON
logs at ``--log-level``, written to a file as they would be to a log
collector); stores one key and makes a worker token granted ``copy`` and
``sign/orderExecute`` on it. Then, for each route, the daemon is driven for
``--seconds`` twice: once to measure (requests/s, p50, the daemon's CPU time
per request), once with ``py-spy record`` attached:

    sign      hey -c WORKERS: POST {daemon}/v1/keys/main/profile/sign  {"instruction": ...}
    handout   one sequential client (this process, httpx): POST .../copy, then unwrap
              the copy at Vault, again and again: what bench/handout.py times
    copy      hey -c WORKERS: POST {daemon}/v1/keys/main/profile/copy

``--daemon NAME=SOURCE`` (repeatable) runs a daemon from another checkout's
``service`` directory (``PYTHONPATH``) with this environment's packages;
``:no-uvloop`` hides uvloop from it, so that uvicorn's "auto" loop falls back to
asyncio, as on an install without uvloop; ``NAME=.`` is this checkout. With two
daemons or more, they run side by side on the same OpenBao server and take turns
(``--rounds``, the order reversed every other round), so that a change in the
machine's load hits them alike; the summary gives medians and each one's ratio
to the first, and the tables put their profiles side by side.

The tables: the top functions by own samples (the function itself was running)
and by inclusive samples (it was anywhere on the stack), in percent of all the
daemon's samples, and ``us/req``, the sampled time per request (comparable
between daemons of one run; py-spy slows the daemon, so not with the CPU time
measured without it). py-spy samples only the thread holding the GIL
(``--gil``): the daemon's Python work is serialised on it, and a thread waiting
on a lock or a socket is not counted (``--all-threads``: every thread py-spy
does not think idle). The inclusive table leaves out the plumbing every request
passes through (threading, asyncio, anyio, uvicorn and starlette frames): their
own time is in the other table. ``--raw-dir`` keeps py-spy's folded stacks;
``--measure-only`` runs no py-spy.

The daemons run on the first CPU and everything else on the others
(``--no-pin``: all share every CPU). On a small machine a daemon that shares
its CPU with hey is preempted whenever it wakes hey up, in the middle of a
socket write, and the samples then show the scheduler rather than the daemon.

Needs ``hey`` (``apt-get install hey``) and py-spy (``pip install py-spy``),
which must be allowed to read another process's memory (root, or
``kernel.yama.ptrace_scope`` 0). A tool, not a benchmark: not part of ``make
test``, and its numbers vary with the machine and its load. Every server it
starts it stops, by its process id (the daemons, and OpenBao through DevVault)
or in process (the sandbox).
"""

# ruff: noqa: T201, S603, PLR2004, INP001

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backpack_vault.config import VaultSettings
from backpack_vault.core.clock import wait_for
from backpack_vault.core.keys import KeyRef, generate_pair
from backpack_vault.daemon.serving import ServerThread, free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.logging import configure
from backpack_vault.testing import sandbox, store_key
from backpack_vault.vault.client import Provisioner, Vault

REF = KeyRef("main", "profile")
ORDER = {"symbol": "SOL_USDC", "side": "Bid", "orderType": "Limit", "price": "1", "quantity": "1"}
POLICY = """
path "backpack-broker/main/profile/copy" { capabilities = ["read"] }
path "backpack-broker/main/profile/sign/orderExecute" { capabilities = ["update"] }
"""
SIGN_BODY: dict[str, object] = {"instruction": "orderExecute", "params": ORDER}
ROUTES = ("sign", "handout", "copy")  # handout before copy: a ledger of its own copies only
# argv: log format, log level, "uvloop" or "no-uvloop", the CPUs to run on ("" for any)
LAUNCHER = (
    "import os, sys\n"
    "if sys.argv[4]:  # before any thread starts: every thread runs there\n"
    "    os.sched_setaffinity(0, {int(c) for c in sys.argv[4].split(',')})\n"
    "if sys.argv[3] == 'no-uvloop':\n"
    "    sys.modules['uvloop'] = None  # import uvloop raises ImportError\n"
    "from backpack_vault.config import load\n"
    "from backpack_vault.daemon import Daemon\n"
    "from backpack_vault.logging import configure\n"
    "configure(sys.argv[1], sys.argv[2])\n"
    "sys.exit(Daemon(load(os.environ)).run())\n"
)
# Frames every request passes through, left out of the inclusive table: "func (file)".
PLUMBING = ("(threading.py)", "(queue.py)", "(selectors.py)")
PLUMBING_DIRS = ("asyncio/", "anyio/", "uvicorn/", "starlette/", "concurrent/futures/")
_THREAD = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\): (?P<name>.*)$")


# -- folded stacks -> tables ------------------------------------------------------------------


@dataclass
class Profile:
    """py-spy's folded stacks, counted: own (leaf) and inclusive (anywhere on the stack)."""

    total: int = 0
    own: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)
    requests: int = 0  # answered while py-spy sampled
    rate: int = 100

    def add(self, lines: Iterable[str]) -> None:
        """``frame;frame;...;leaf count`` lines, the first frame a thread with ``--threads``."""
        for raw in lines:
            stack, _, count = raw.strip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            thread = "(no thread)"
            found = _THREAD.match(frames[0])
            if found:  # "asgi:8280" and "ThreadPoolExecutor-0_1" counted by kind
                thread = re.sub(r"[:_-]?\d+(_\d+)?$", "", found["name"]) or "(unnamed)"
                frames = frames[1:]
            samples = int(count)
            self.total += samples
            self.threads[thread] += samples
            if frames:
                self.own[frames[-1]] += samples
            for frame in set(frames):  # once per sample, however deep the recursion
                self.inclusive[frame] += samples

    def share(self, samples: int) -> str:
        return f"{100 * samples / self.total:5.1f}%" if self.total else "    - "

    def us_per_request(self, samples: int) -> float:
        return 1e6 * samples / self.rate / max(1, self.requests)

    def plumbing(self) -> set[str]:
        return {
            f
            for f in self.inclusive
            if f.endswith(PLUMBING) or any(f"({d}" in f for d in PLUMBING_DIRS)
        }


def tables(names: Sequence[str], profiles: Sequence[Profile], counter: str, top: int) -> str:
    """The top ``top`` functions of each profile, with their share and cost in every one."""
    skip = set().union(*(p.plumbing() for p in profiles)) if counter == "inclusive" else set()
    counts: list[Counter[str]] = [getattr(p, counter) for p in profiles]
    chosen = {f for c in counts for f in [f for f, _ in c.most_common() if f not in skip][:top]}

    def weight(frame: str) -> float:
        return max(c[frame] / (p.total or 1) for c, p in zip(counts, profiles, strict=True))

    rows = ["    " + " ".join(f"{n[:13]:>13}" for n in names)]
    rows.append("    " + " ".join(f"{'%':>6} {'us/req':>6}" for _ in names) + "  function (file)")
    for frame in sorted(chosen, key=weight, reverse=True):
        cells = [
            f"{p.share(c[frame])} {p.us_per_request(c[frame]):>6.0f}"
            for c, p in zip(counts, profiles, strict=True)
        ]
        rows.append("    " + " ".join(cells) + f"  {frame}")
    return "\n".join(rows)


# -- the daemons and the drivers --------------------------------------------------------------


@dataclass(frozen=True)
class DaemonSpec:
    name: str
    source: str | None  # a service directory, or None for this checkout
    uvloop: bool = True

    @classmethod
    def parse(cls, text: str) -> DaemonSpec:
        name, _, rest = text.partition("=")
        source, _, option = rest.partition(":")
        if not name or not source or option not in ("", "no-uvloop"):
            raise argparse.ArgumentTypeError(
                f"{text!r}: write NAME=SOURCE or NAME=SOURCE:no-uvloop"
            )
        return cls(name, None if source == "." else source, uvloop=option != "no-uvloop")


@dataclass(frozen=True)
class Running:
    spec: DaemonSpec
    url: str
    pid: int


@contextmanager
def daemon_process(
    dev: DevVault, exchange: str, spec: DaemonSpec, args: argparse.Namespace, log_file: Path
) -> Iterator[Running]:
    """One daemon in its own process; stopped by its process id."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", tempfile.gettempdir()),
        "VAULT_ADDR": dev.addr,
        "VAULT_TOKEN": dev.root_token.reveal(),
        "BACKPACK_VAULT_LISTEN": f"127.0.0.1:{port}",
        "BACKPACK_VAULT_BACKPACK_URL": exchange,
    }
    if spec.source:
        env["PYTHONPATH"] = str(Path(spec.source).resolve())
    loop = "uvloop" if spec.uvloop else "no-uvloop"
    cpus = ",".join(str(c) for c in sorted(args.daemon_cpus))
    argv = [sys.executable, "-c", LAUNCHER, "json", args.log_level, loop, cpus]
    with log_file.open("ab") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:  # or gone: nothing to wait for then
        try:
            return proc.poll() is not None or httpx.get(f"{url}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        if not wait_for(ready, 30) or proc.poll() is not None:
            tail = log_file.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise SystemExit(f"daemon {spec.name} did not become ready; its log ends:\n{tail}")
        yield Running(spec, url, proc.pid)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass(frozen=True)
class Load:
    per_s: float
    p50_ms: float
    statuses: dict[str, int]
    cpu_s: float = float("nan")  # the daemon's, user + system, while it ran

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / self.answered if self.answered else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hey(url: str, token: str, body: dict[str, object] | None, workers: int, seconds: float) -> Load:
    """One hey run; its summary parsed (requests/s, p50, responses by status)."""
    argv = [
        shutil.which("hey") or "hey", "-z", f"{seconds}s", "-c", str(workers), "-m", "POST",
        "-H", f"X-Vault-Token: {token}",
    ]  # fmt: skip
    if body is not None:
        argv += ["-T", "application/json", "-d", json.dumps(body)]
    done = subprocess.run(
        [*argv, url], capture_output=True, text=True, check=True, timeout=seconds + 60
    )

    def number(pattern: str) -> float:
        found = re.search(pattern, done.stdout)
        return float(found.group(1)) if found else float("nan")

    found = re.findall(r"\[(\d{3})\]\s+(\d+) responses", done.stdout)
    return Load(
        per_s=number(r"Requests/sec:\s+([\d.]+)"),
        p50_ms=number(r"50% in ([\d.]+) secs") * 1000,
        statuses={code: int(n) for code, n in found},
    )


def handout(url: str, vault_addr: str, token: str, seconds: float) -> Load:
    """Copy, then unwrap at Vault, sequentially for ``seconds``."""
    took: list[float] = []
    statuses: Counter[str] = Counter()
    unwrap = f"{vault_addr}/v1/sys/wrapping/unwrap"
    with httpx.Client(headers={"X-Vault-Token": token}) as http:
        deadline = time.perf_counter() + seconds
        while (started := time.perf_counter()) < deadline:
            answer = http.post(url)
            statuses[str(answer.status_code)] += 1
            if answer.status_code == 200:
                wrap_token = answer.json()["wrap_token"]
                http.post(unwrap, headers={"X-Vault-Token": wrap_token}).raise_for_status()
            took.append(time.perf_counter() - started)
    took.sort()
    return Load(len(took) / seconds, took[len(took) // 2] * 1000, dict(statuses))


def py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("scripts/profile.py needs py-spy: .venv/bin/pip install py-spy")
    return found


def measured(pid: int, drive: Callable[[], Load]) -> Load:
    """``drive`` without py-spy, with the daemon's CPU time meanwhile."""
    before = cpu_seconds(pid)
    load = drive()
    return dataclasses.replace(load, cpu_s=cpu_seconds(pid) - before)


def profiled(pid: int, raw: Path, args: argparse.Namespace, drive: Callable[[], Load]) -> Load:
    """``drive`` with py-spy on ``pid``; py-spy is stopped (SIGINT) when it is done."""
    argv = [
        py_spy(), "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw",
        "--nolineno", "--threads", "--output", str(raw),
    ]  # fmt: skip
    if not args.all_threads:
        argv.append("--gil")
    if args.nonblocking:
        argv.append("--nonblocking")
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # attached before the load starts
        if spy.poll() is not None:
            said = spy.stderr.read().decode() if spy.stderr else ""
            raise SystemExit(f"py-spy did not attach to the daemon: {said[-500:]}")
        return drive()
    finally:
        if spy.poll() is None:
            os.kill(spy.pid, signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(spy.pid, signal.SIGKILL)
            spy.wait()


# -- the report -------------------------------------------------------------------------------


@dataclass
class Results:
    """Per route and daemon: the measured runs, and the profile of the profiled ones."""

    loads: dict[tuple[str, str], list[Load]] = field(default_factory=dict)
    profiles: dict[tuple[str, str], Profile] = field(default_factory=dict)


def summary(route: str, names: Sequence[str], results: Results) -> list[str]:
    rows = [f"    {'daemon':<13} {'req/s':>7} {'p50 ms':>7} {'CPU us/req':>10}  {'responses'}"]
    first = results.loads[(route, names[0])]
    for name in names:
        loads = results.loads[(route, name)]
        statuses: Counter[str] = Counter()
        for load in loads:
            statuses.update(load.statuses)
        row = (
            f"    {name[:13]:<13} {statistics.median(x.per_s for x in loads):>7.0f} "
            f"{statistics.median(x.p50_ms for x in loads):>7.2f} "
            f"{statistics.median(x.cpu_us_per_request for x in loads):>10.0f}  "
            f"{dict(sorted(statuses.items()))}"
        )
        if name != names[0]:
            ratios = [x.per_s / y.per_s for x, y in zip(loads, first, strict=True)]
            row += f"  req/s {statistics.median(ratios):.2f}x {names[0]}"
        if not any(code.startswith("2") for code in statuses):
            row += "  (NO 2xx ANSWERS: the profile shows errors)"
        rows.append(row)
    return rows


def report(route: str, names: Sequence[str], results: Results, args: argparse.Namespace) -> None:
    driver = "one client: copy, then unwrap" if route == "handout" else f"hey -c {args.workers}"
    print()
    print(f"== {route} ({driver}; {args.rounds} x {args.seconds:g} s; medians)")
    print("\n".join(summary(route, names, results)))
    if args.measure_only:
        return
    profiles = [results.profiles[(route, name)] for name in names]
    what = "thread holding the GIL" if not args.all_threads else "thread not idle"
    ticks = args.rate * args.seconds * args.rounds
    busy = " ".join(f"{p.total / ticks:>13.0%}" for p in profiles)
    print(f"   py-spy, {args.rate}/s, samples of the {what}, by thread:")
    held = "the GIL held" if not args.all_threads else "samples per tick"
    print(f"    {busy}  of the time under load: {held}")
    threads = sorted({t for p in profiles for t in p.threads})
    for thread in threads:
        cells = [p.share(p.threads[thread]) for p in profiles]
        print("    " + " ".join(f"{c:>13}" for c in cells) + f"  {thread}")
    print(f"   top {args.top} by own samples:")
    print(tables(names, profiles, "own", args.top))
    print(f"   top {args.top} by inclusive samples (no plumbing):")
    print(tables(names, profiles, "inclusive", args.top))


# -- main -------------------------------------------------------------------------------------


def pin() -> set[int]:
    """The daemons get the first CPU, and this process (OpenBao, hey, the client) the others."""
    if not hasattr(os, "sched_getaffinity"):
        return set()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set()
    os.sched_setaffinity(0, set(cpus[1:]))  # inherited by what starts from here on
    return {cpus[0]}


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", default=",".join(ROUTES), help="of: sign, handout, copy")
    parser.add_argument("--seconds", type=float, default=10.0, help="of load per run")
    parser.add_argument("--workers", type=int, default=32, help="hey's concurrent workers")
    parser.add_argument("--rounds", type=int, default=1, help="turns of every daemon")
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument(
        "--daemon", type=DaemonSpec.parse, action="append", help="NAME=SOURCE[:no-uvloop]"
    )
    parser.add_argument("--log-level", default="info", help="the daemons' (deployed: info)")
    parser.add_argument("--measure-only", action="store_true", help="no py-spy: load and CPU")
    parser.add_argument("--no-pin", action="store_true", help="the daemons share the CPUs")
    parser.add_argument("--all-threads", action="store_true", help="not only the GIL holder")
    parser.add_argument("--nonblocking", action="store_true", help="py-spy does not pause it")
    parser.add_argument("--raw-dir", help="keep py-spy's folded stacks here")
    return parser


def main() -> int:
    parser = arguments()
    args = parser.parse_args()
    specs: list[DaemonSpec] = args.daemon or [DaemonSpec("this", None)]
    names = [s.name for s in specs]
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if unknown := sorted(set(routes) - set(ROUTES)):
        parser.error(f"unknown route(s) {', '.join(unknown)}; choose from {', '.join(ROUTES)}")
    if len(set(names)) != len(names):
        parser.error("every --daemon needs a name of its own")
    if shutil.which("hey") is None and set(routes) - {"handout"}:
        raise SystemExit("scripts/profile.py needs hey, a Go load generator: apt-get install hey")
    if not args.measure_only:
        py_spy()
    configure("console", "warning")
    args.daemon_cpus = set() if args.no_pin else pin()

    with (
        tempfile.TemporaryDirectory(prefix="bv-profile-") as scratch,
        DevVault() as dev,
        ServerThread(sandbox.create_app()) as exchange,
        ExitStack() as daemons,
    ):
        raw_dir = Path(args.raw_dir or scratch)
        raw_dir.mkdir(parents=True, exist_ok=True)
        vault = Vault(VaultSettings(addr=dev.addr, token=dev.root_token))
        vault.login()
        pair = store_key(vault, REF, pair=generate_pair(), exchange=exchange.url)
        httpx.post(
            f"{exchange.url}/_sandbox/keys", json={"api_key": pair.api_key}
        ).raise_for_status()
        provisioner = Provisioner(vault)
        provisioner.ensure_policy("profile-worker", POLICY)
        token = provisioner.create_token(["profile-worker"]).reveal()
        vault.close()
        running = [
            daemons.enter_context(
                daemon_process(dev, exchange.url, spec, args, Path(scratch) / f"{spec.name}.log")
            )
            for spec in specs
        ]

        def driver(daemon: Running, route: str, workers: int, seconds: float) -> Callable[[], Load]:
            base = f"{daemon.url}/v1/keys/{REF.subaccount}/{REF.name}"
            if route == "handout":
                return lambda: handout(f"{base}/copy", dev.addr, token, seconds)
            body = SIGN_BODY if route == "sign" else None
            return lambda: hey(f"{base}/{route}", token, body, workers, seconds)

        for daemon in running:  # warm up: caches, connections, code paths
            for route in routes:
                driver(daemon, route, 2, 1.0)()
        for route in routes:
            results = take_turns(running, route, driver, args, raw_dir)
            report(route, names, results, args)
    return 0


Driver = Callable[[Running, str, int, float], Callable[[], Load]]


def take_turns(
    running: Sequence[Running], route: str, driver: Driver, args: argparse.Namespace, raw_dir: Path
) -> Results:
    """Every daemon in turn, ``--rounds`` times, the order reversed every other round."""
    results = Results()
    for round_no in range(args.rounds):
        for daemon in running if round_no % 2 == 0 else running[::-1]:
            name = daemon.spec.name
            drive = driver(daemon, route, args.workers, args.seconds)
            results.loads.setdefault((route, name), []).append(measured(daemon.pid, drive))
            if args.measure_only:
                continue
            raw = raw_dir / f"{name}-{route}-{round_no + 1}.txt"
            spied = profiled(daemon.pid, raw, args, drive)
            profile = results.profiles.setdefault((route, name), Profile(rate=args.rate))
            profile.requests += spied.answered
            with raw.open(encoding="utf-8") as lines:
                profile.add(lines)
    return results


if __name__ == "__main__":
    sys.exit(main())
