"""Order placement through ccxt on the sandbox: a local key against copy mode and sign mode.

    .venv/bin/python bench/bots.py [--orders 500] [--rounds 5] [--quick]

Starts its own OpenBao dev server, the sandbox exchange and the daemon, each in
its own process as deployed (the daemon checks keys against the sandbox). One key
is stored in Vault and registered at the sandbox; the bot holds a worker token
whose policy grants a copy and the orderExecute / orderCancelAll signatures.
Four ``ccxt.backpack`` exchanges, rate limiter off, place resting limit orders
(SOL/USDC, far below the book) one after another:

    local key   ccxt signs by itself with the key in its config: the baseline
    copy mode   ``backpack_vault.ccxt.backpack(mode="copy")``: ccxt signs with the copy
    sign mode   ``backpack_vault.ccxt.backpack(mode="sign")``: the daemon signs each order
    bare hop    the local key, plus a ``GET /healthz`` to the daemon before each order:
                one round trip through uvicorn and the ASGI app that does no work (a
                signature from memory skips the app: ``daemon/quick.py``)

Each variant places ``--orders`` orders in all, split over ``--rounds`` rounds; in
a round the variants take turns order by order (all three trade on one account,
so they meet the same book), and drift on a noisy machine hits all of them alike;
after each round the orders are cancelled (not timed), so the book stays small.
Where sign mode's time goes is printed too: ``BrokerClient.sign`` alone, and the
floor under it, the same ``/sign`` request (and ``/healthz``) written by hand on
one kept socket, with no client library at all: what is left is the daemon's;
then both again 4 ms apart, as between orders, when the daemon idles in between.
Targets: copy mode adds nothing measurable (p50 within 5% of the local key's),
sign mode adds at most 0.5 ms at p50. Figures are printed, never asserted: the
exit status is 1 only when an order is not placed. ``--quick`` (what ``make
test`` runs) places a few orders in one round: the same code and table, too few
to be a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ccxt
import httpx

from backpack_vault.ccxt import backpack
from backpack_vault.client.broker import BrokerClient
from backpack_vault.config import Secret, VaultSettings
from backpack_vault.core.keys import KeyPair, KeyRef
from backpack_vault.daemon.serving import free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.logging import configure
from backpack_vault.testing import store_key
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.setup import render_worker_policy
from backpack_vault.wire import Pool

REF = KeyRef("main", "bench")
SYMBOL = "SOL/USDC"
QUICK = {"orders": 20, "rounds": 1}
WARMUP = 20  # per variant: connections, caches, the first copy, code paths
COPY_TARGET = 1.05  # p50 ratio to the local key
SIGN_TARGET_MS = 0.5  # p50 added
DAEMON_ALONE = "daemon alone"
SIGNED_BY_CCXT = ("local key", "copy mode")
BARE_HOP = "bare hop"
IDLE_S = 0.004  # between raw calls, for the idle floor: about an order's round trip
ORDER = {
    "symbol": "SOL_USDC",
    "side": "Bid",
    "orderType": "Limit",
    "price": "100",
    "quantity": "0.01",
}
LAUNCHER = (
    "import os, sys\n"
    "from backpack_vault.config import load\n"
    "from backpack_vault.daemon import Daemon\n"
    "from backpack_vault.logging import configure\n"
    "configure('json', 'warning')\n"
    "sys.exit(Daemon(load(os.environ)).run())\n"
)


@dataclass
class Samples:
    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


@contextmanager
def process(argv: list[str], env: dict[str, str], log: Path, ready_url: str) -> Iterator[None]:
    """A child process, ready when ``ready_url`` answers 200; stopped by its PID."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{argv[1:4]} did not become ready; see {log}")
            time.sleep(0.05)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def worker_token(vault: Vault) -> Secret:
    hcl = render_worker_policy(
        "backpack-broker",
        REF.subaccount,
        REF.name,
        ["orderExecute", "orderCancelAll", "orderQueryAll"],
        copy=True,
    )
    provisioner = Provisioner(vault)
    provisioner.ensure_policy("bench-bots", hcl)
    return provisioner.create_token(["bench-bots"])


class BareHop(ccxt.backpack):  # type: ignore[misc]
    """The local key, plus one bare round trip to the daemon (``GET /healthz``, over the
    connection the client keeps) before each private request: what any signing sidecar
    on this machine costs before it does any work."""

    def __init__(self, config: dict[str, Any], daemon_url: str) -> None:
        super().__init__(config)
        self.hop = Pool.for_url(daemon_url, timeout=5.0, tls=None, proxies=False)

    def sign(
        self,
        path: str,
        api: str = "public",
        method: str = "GET",
        params: Any = None,
        headers: Any = None,
        body: Any = None,
    ) -> Any:
        if api == "private" and self.hop is not None:
            self.hop.request("GET", "/healthz", None, "-")
        return super().sign(path, api, method, params or {}, headers, body)


def exchanges(sandbox_url: str, pair: KeyPair, broker: BrokerClient) -> dict[str, Any]:
    config = {
        "enableRateLimit": False,
        "urls": {"api": {"public": sandbox_url, "private": sandbox_url}},
    }
    credentials = {"apiKey": pair.api_key, "secret": pair.secret.reveal()}
    return {
        "local key": ccxt.backpack(config | credentials),
        "copy mode": backpack(config, broker=broker, key=REF, mode="copy"),
        "sign mode": backpack(config, broker=broker, key=REF, mode="sign"),
        BARE_HOP: BareHop(config | credentials, broker.url),
    }


def place(exchange: Any, count: int, into: list[float] | None = None) -> None:
    """``count`` resting buys, timed one by one into ``into``; then cancel them (untimed)."""
    for _ in range(count):
        started = time.perf_counter()
        order = exchange.create_order(SYMBOL, "limit", "buy", 0.01, 100.0)
        elapsed = time.perf_counter() - started
        if order["status"] != "open":
            raise SystemExit(f"an order was not placed: {order['status']}")
        if into is not None:
            into.append(elapsed)
    exchange.cancel_all_orders(SYMBOL)


def measure(variants: dict[str, Any], orders: int, rounds: int) -> list[Samples]:
    """The three variants' orders, taking turns order by order, then the daemon's signature
    alone, in rounds; the book is emptied after each round (not timed)."""
    broker = variants["sign mode"].key_handle.broker
    results = {name: Samples(name) for name in [*variants, DAEMON_ALONE]}
    for exchange in variants.values():
        exchange.load_markets()
        place(exchange, min(WARMUP, orders))
    per_round = max(1, orders // rounds)
    for _ in range(rounds):
        # One account, one book: taking turns, every variant meets the same book and the
        # same moment of a noisy machine.
        for _ in range(per_round):
            for name, exchange in variants.items():
                place_one(exchange, results[name].seconds)
        next(iter(variants.values())).cancel_all_orders(SYMBOL)
        results[DAEMON_ALONE].seconds.extend(daemon_alone(broker, per_round))
    return list(results.values())


def place_one(exchange: Any, into: list[float]) -> None:
    started = time.perf_counter()
    order = exchange.create_order(SYMBOL, "limit", "buy", 0.01, 100.0)
    into.append(time.perf_counter() - started)
    if order["status"] != "open":
        raise SystemExit(f"an order was not placed: {order['status']}")


def daemon_alone(broker: BrokerClient, count: int) -> list[float]:
    """``BrokerClient.sign`` for an order like the ones placed: one round trip to the daemon."""
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        broker.sign(REF, "orderExecute", ORDER, timestamp=time.time_ns() // 1_000_000)
        seconds.append(time.perf_counter() - started)
    return seconds


def sign_alone_us(exchange: Any, count: int) -> float:
    """p50 of ccxt's ``sign()`` for one order, no network: what copy mode adds to it."""
    request = exchange.create_order_request(SYMBOL, "limit", "buy", 0.01, 100.0)
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        exchange.sign("api/v1/order", "private", "POST", request)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1e6


def raw_round_trips(daemon_url: str, token: Secret, count: int) -> list[Samples]:
    """The floor: ``/healthz`` and ``/sign`` written by hand on one kept socket."""
    parts = urlsplit(daemon_url)
    body = json.dumps({"instruction": "orderExecute", "params": ORDER}).encode()
    wires = {
        "raw /healthz": b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n",
        "raw /sign": (
            f"POST /v1/keys/{REF}/sign HTTP/1.1\r\nHost: bench\r\n"
            f"X-Vault-Token: {token.reveal()}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body,
    }
    results = []
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock.makefile("rb") as reader:

            def once(wire: bytes) -> None:
                sock.sendall(wire)
                if not reader.readline().startswith(b"HTTP/1.1 200"):
                    raise SystemExit("the daemon refused a raw request")
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                reader.read(length)

            for name, wire, idle_s in (
                *((name, wire, 0.0) for name, wire in wires.items()),
                ("raw /healthz, 4 ms apart", wires["raw /healthz"], IDLE_S),
                ("raw /sign, 4 ms apart", wires["raw /sign"], IDLE_S),
            ):
                for _ in range(WARMUP):
                    once(wire)
                sample = Samples(name)
                for _ in range(count):
                    if idle_s:
                        time.sleep(idle_s)  # as between orders: the daemon sleeps meanwhile
                    started = time.perf_counter()
                    once(wire)
                    sample.seconds.append(time.perf_counter() - started)
                results.append(sample)
    return results


@dataclass
class Report:
    orders: list[Samples]  # local key, copy mode, sign mode, bare hop
    daemon: Samples  # BrokerClient.sign alone
    sign_us: dict[str, float]  # ccxt's sign() alone: local key, copy mode
    raw: list[Samples]  # /healthz and /sign on a raw socket, then both after idling


def print_report(report: Report, elapsed: float) -> None:
    local, copy, sign, hop = report.orders
    print()
    print("(a) order placement through ccxt on the sandbox (create_order, rate limiter off)")
    print(
        f"    {'variant':<12} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'p50 ratio':>10} {'p50 added ms':>13} {'p99 ratio':>10}"
    )
    for sample in report.orders:
        print(
            f"    {sample.name:<12} {len(sample.seconds):>5} {sample.p50_ms:>8.3f} "
            f"{sample.p99_ms:>8.3f} {sample.p50_ms / local.p50_ms:>9.2f}x "
            f"{sample.p50_ms - local.p50_ms:>+13.3f} {sample.p99_ms / local.p99_ms:>9.2f}x"
        )
    print()
    print("(b) where the added time goes")
    us = report.sign_us
    print(
        f"    copy mode: ccxt's sign() alone p50 {us['copy mode']:.1f} us, "
        f"{us['copy mode'] - us['local key']:+.1f} us over the local key's {us['local key']:.1f}"
    )
    print(
        f"    sign mode: the daemon's signature alone (BrokerClient.sign) p50 "
        f"{report.daemon.p50_ms:.3f} ms, p99 {report.daemon.p99_ms:.3f} ms"
    )
    health, raw_sign, idle, idle_sign = report.raw
    print(
        f"    the floor, no client library (one raw socket): /healthz p50 "
        f"{health.p50_ms:.3f} ms, /sign p50 {raw_sign.p50_ms:.3f} ms, p99 {raw_sign.p99_ms:.3f} ms"
    )
    print(
        f"    the same {IDLE_S * 1000:.0f} ms apart (the daemon idle in between, as between "
        f"orders): /healthz p50 {idle.p50_ms:.3f} ms, /sign p50 {idle_sign.p50_ms:.3f} ms"
    )
    print(
        f"    so BrokerClient.sign spends {report.daemon.p50_ms - raw_sign.p50_ms:+.3f} ms in the "
        f"client; /healthz goes through the ASGI app, a /sign from memory is answered in the "
        f"daemon's HTTP protocol (daemon/quick.py)"
    )
    copy_ratio, sign_added = copy.p50_ms / local.p50_ms, sign.p50_ms - local.p50_ms
    copy_ok, sign_ok = copy_ratio <= COPY_TARGET, sign_added <= SIGN_TARGET_MS
    print()
    print(
        f"copy mode: p50 {copy_ratio:.2f}x the local key (target <= {COPY_TARGET:.2f}x) -> "
        f"{'meets' if copy_ok else 'MISSES'} target"
    )
    print(
        f"sign mode: p50 {sign_added:+.3f} ms over the local key (target <= "
        f"{SIGN_TARGET_MS} ms) -> {'meets' if sign_ok else 'MISSES'} target"
    )
    print(
        f"  the bare hop to the daemon (GET /healthz) adds {hop.p50_ms - local.p50_ms:+.3f}"
        f" ms; sign mode against the bare hop: {sign.p50_ms - hop.p50_ms:+.3f} ms"
    )
    print(f"(finished in {elapsed:.1f} s)")


def run(args: argparse.Namespace, work: Path) -> Report:
    sandbox_port, daemon_port = free_port(), free_port()
    sandbox_url, daemon_url = f"http://127.0.0.1:{sandbox_port}", f"http://127.0.0.1:{daemon_port}"
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(work)}
    sandbox_argv = [
        sys.executable, "-m", "backpack_vault", "sandbox", "--listen", f"127.0.0.1:{sandbox_port}",
    ]  # fmt: skip
    with ExitStack() as stack:
        dev = stack.enter_context(DevVault(log_path=work / "bao.log"))
        stack.enter_context(
            process(sandbox_argv, base, work / "sandbox.log", f"{sandbox_url}/api/v1/ping")
        )
        vault = Vault(VaultSettings(addr=dev.addr, token=dev.root_token))
        vault.login()
        stack.callback(vault.close)
        pair = store_key(vault, REF, exchange=sandbox_url)
        httpx.post(f"{sandbox_url}/_sandbox/keys", json={"api_key": pair.api_key})
        daemon_env = base | {
            "VAULT_ADDR": dev.addr,
            "VAULT_TOKEN": dev.root_token.reveal(),
            "BACKPACK_VAULT_LISTEN": f"127.0.0.1:{daemon_port}",
            "BACKPACK_VAULT_BACKPACK_URL": sandbox_url,
        }
        launcher = [sys.executable, "-c", LAUNCHER]
        stack.enter_context(
            process(launcher, daemon_env, work / "daemon.log", f"{daemon_url}/readyz")
        )
        token = worker_token(vault)
        broker = stack.enter_context(BrokerClient(daemon_url, vault_addr=dev.addr, token=token))
        variants = exchanges(sandbox_url, pair, broker)
        if variants["sign mode"].secret or not variants["copy mode"].fetch_balance():
            raise SystemExit("sign mode holds a secret, or copy mode cannot trade")
        samples = measure(variants, args.orders, args.rounds)
        sign_us = {name: sign_alone_us(variants[name], args.orders * 6) for name in SIGNED_BY_CCXT}
        raw = raw_round_trips(daemon_url, token, args.orders)
        return Report(samples[:4], samples[4], sign_us, raw)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=500, help="per variant, in all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help=f"defaults for a smoke run: {QUICK}")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)  # flags given explicitly still win
    args = parser.parse_args()
    configure("console", "warning")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-bots-") as work:
        report = run(args, Path(work))
    print_report(report, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
