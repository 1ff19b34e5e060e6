"""Handout latency and sign-mode throughput, side by side in one run.

    .venv/bin/python bench/handout.py [--rounds 3] [--copies 100] [--signs 500] [--quick]

Starts its own OpenBao dev server, the sandbox exchange (the daemons' liveness
checks go there, never to Backpack) and the daemon twice: in this process
(``ServerThread``, as the tests serve it) and as a separate process (as it is
deployed). In one process, the worker's client, the daemon and its background
wraps share one GIL, which taxes the daemon for Python work a real worker does
elsewhere; the separate process is the deployed shape, so the targets are
judged on it.

(a) copy: worker -> daemon /copy -> unwrap at Vault, against the floor: a raw
    KV read wrapped by Vault (``X-Vault-Wrap-TTL``) -> unwrap. Both sides go over
    the same kind of connection: the kept-alive HTTP/1.1 of ``backpack_vault.wire``
    that ``BrokerClient`` uses by default (so the client library's own cost is the
    same on both sides and the ratio is the daemon's hop against Vault's wrapped
    read). The same pair over httpx is printed too. Target: p50 ratio <= 1.0.
(b) signatures per second, one client, sequential: sign mode (worker -> daemon
    /sign) against Vault transit ed25519 (worker -> Vault, over the same kind of
    connection) and a local ``sign_request``. Target: sign mode >= 3x transit.

Samples alternate between variants in rounds, so drift on a noisy machine hits
all of them alike; compare ratios within one run, not absolute numbers. Every
signature carries the current timestamp (the daemon refuses one more than 60 s
off its clock). Targets are reported, never asserted: the exit status is 1 only
when a copy or a signature is wrong. ``--quick`` (what ``make test`` runs) takes
a few samples in one round: the same code and tables, too few to be a measurement.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from backpack_vault import sign_request
from backpack_vault.backpack.signing import signing_string
from backpack_vault.client.broker import BrokerClient
from backpack_vault.client.protocol import tls_context
from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.clock import iso_utc
from backpack_vault.core.keys import KeyPair, KeyRecord, KeyRef, Origin, Status, generate_pair
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread, free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.logging import configure
from backpack_vault.testing import sandbox
from backpack_vault.vault.client import Vault
from backpack_vault.wire import Pool

REF = KeyRef("main", "bench")
QUICK = {"rounds": 1, "copies": 10, "signs": 40}
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

    def run(self, op: Callable[[], object], count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            op()
            self.seconds.append(time.perf_counter() - started)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000

    @property
    def per_s(self) -> float:
        return len(self.seconds) / sum(self.seconds)


def rounds(variants: dict[str, Callable[[], object]], count: int, repeat: int) -> list[Samples]:
    results = {name: Samples(name) for name in variants}
    for op in variants.values():  # warm up: connections, caches, code paths
        for _ in range(min(20, count)):
            op()
    for _ in range(repeat):
        for name, op in variants.items():
            results[name].run(op, count)
    return list(results.values())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@contextmanager
def daemon_process(dev: DevVault, exchange: str) -> Iterator[str]:
    """The daemon as deployed: its own process, configured by environment variables."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),  # noqa: S108 - only if HOME is unset
        "VAULT_ADDR": dev.addr,
        "VAULT_TOKEN": dev.root_token.reveal(),
        "BACKPACK_VAULT_LISTEN": f"127.0.0.1:{port}",
        "BACKPACK_VAULT_BACKPACK_URL": exchange,
    }
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon process did not become ready")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copies", type=int, default=100, help="per variant per round")
    parser.add_argument("--signs", type=int, default=500, help="per variant per round")
    parser.add_argument("--quick", action="store_true", help=f"defaults for a smoke run: {QUICK}")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)  # flags given explicitly still win
    args = parser.parse_args()
    configure("console", "warning")
    started = time.monotonic()

    with DevVault() as dev, ServerThread(sandbox.create_app()) as exchange:
        root = dev.root_token
        settings = VaultSettings(addr=dev.addr, token=root)
        setup = Vault(settings)
        setup.login()
        pair = generate_pair()
        stored = iso_utc()
        setup.create_key(
            KeyRecord(
                ref=REF,
                api_key=pair.api_key,
                read_only=False,
                status=Status.ACTIVE,
                origin=Origin.BACKPACK_UI,
                created_at=stored,
                status_since=stored,
                exchange=exchange.url,
            ),
            pair.secret,
        )
        # Registered, so that the daemons' liveness checks find the key valid.
        httpx.post(
            f"{exchange.url}/_sandbox/keys", json={"api_key": pair.api_key}
        ).raise_for_status()
        headers = {"X-Vault-Token": root.reveal()}
        httpx.post(f"{dev.addr}/v1/sys/mounts/transit", headers=headers, json={"type": "transit"})
        httpx.post(
            f"{dev.addr}/v1/transit/keys/bench", headers=headers, json={"type": "ed25519"}
        ).raise_for_status()

        daemon = Daemon(
            Settings(settings, BrokerSettings(), CheckSettings(backpack_url=exchange.url))
        )
        with (
            daemon,
            ServerThread(daemon.app) as in_thread,
            daemon_process(dev, exchange.url) as separate,
            httpx.Client() as http,
        ):
            report = measure(http, dev.addr, root, in_thread.url, separate, pair, args)
            local = rounds(
                {
                    "local sign_request": lambda: sign_request(
                        pair.api_key, pair.secret, "orderExecute", ORDER, now_ms()
                    )
                },
                args.signs * 4,
                args.rounds,
            )
        setup.close()

    print_report(report, local[0], time.monotonic() - started)
    return 0


ORDER = {
    "symbol": "SOL_USDC",
    "side": "Bid",
    "orderType": "Limit",
    "price": "141.5",
    "quantity": "1",
}


def measure(
    http: httpx.Client,
    vault_addr: str,
    root: Secret,
    in_thread: str,
    separate: str,
    pair: KeyPair,
    args: argparse.Namespace,
) -> dict[str, list[Samples]]:
    token = {"X-Vault-Token": root.reveal()}
    path = f"/v1/secret/data/backpack/{REF.subaccount}/{REF.name}"
    tls = tls_context(verify=True)
    vault = Pool.for_url(vault_addr, timeout=5.0, tls=tls, proxies=False)
    if vault is None:
        raise SystemExit(f"cannot reach {vault_addr} over plain HTTP")

    def floor() -> object:
        """A KV v2 read, wrapped whole, and its unwrap: over the connections the client keeps."""
        wrap_ttl = {"X-Vault-Wrap-TTL": "60s"}
        wrapped = ok(vault.request("GET", path, None, root.reveal(), wrap_ttl))
        wrap_token = wrapped["wrap_info"]["token"]
        answer = ok(vault.request("POST", "/v1/sys/wrapping/unwrap", None, wrap_token))
        return answer["data"]["data"]["api_secret"]

    def floor_httpx() -> object:
        wrapped = http.get(vault_addr + path, headers=token | {"X-Vault-Wrap-TTL": "60s"}).json()
        answer = http.post(
            f"{vault_addr}/v1/sys/wrapping/unwrap",
            headers={"X-Vault-Token": wrapped["wrap_info"]["token"]},
        )
        return answer.json()["data"]["data"]["api_secret"]

    # As a bot gets them: the client's own connections to the daemon and to Vault.
    process_client = BrokerClient(separate, vault_addr=vault_addr, token=root)
    thread_client = BrokerClient(in_thread, vault_addr=vault_addr, token=root)
    # Handed an httpx.Client, the client sends everything through it, as the httpx floor does.
    httpx_client = BrokerClient(separate, vault_addr=vault_addr, token=root, http=http)
    # What is timed must be right: the same secret and the same signatures everywhere.
    for client in (process_client, thread_client, httpx_client):
        if client.copy(REF).api_secret != pair.secret:
            raise SystemExit("copies do not hold the stored secret")
        stamp = now_ms()
        expected = sign_request(pair.api_key, pair.secret, "orderExecute", ORDER, stamp)
        if client.sign(REF, "orderExecute", ORDER, stamp) != expected:
            raise SystemExit("sign mode does not produce sign_request's headers")
    if floor() != pair.secret.reveal() or floor_httpx() != pair.secret.reveal():
        raise SystemExit("the floor does not read the stored secret")
    copies = rounds(
        {
            "floor: wrapped KV read + unwrap": floor,
            "copy, daemon process": lambda: process_client.copy(REF),
            "copy, daemon in-thread": lambda: thread_client.copy(REF),
            "floor over httpx": floor_httpx,
            "copy over httpx, daemon process": lambda: httpx_client.copy(REF),
        },
        args.copies,
        args.rounds,
    )

    def transit() -> object:
        message = signing_string("orderExecute", ORDER, now_ms(), 5000)
        payload = json.dumps({"input": base64.b64encode(message.encode()).decode()}).encode()
        answer = ok(vault.request("POST", "/v1/transit/sign/bench", payload, root.reveal()))
        return base64.b64decode(answer["data"]["signature"].split(":")[2])

    signs = rounds(
        {
            "Vault transit ed25519": transit,
            "sign mode, daemon process": lambda: process_client.sign(
                REF, "orderExecute", ORDER, now_ms()
            ),
            "sign mode, daemon in-thread": lambda: thread_client.sign(
                REF, "orderExecute", ORDER, now_ms()
            ),
        },
        args.signs,
        args.rounds,
    )
    for client in (process_client, thread_client, httpx_client):
        client.close()
    vault.close()
    return {"copies": copies, "signs": signs}


COPY_TARGET = 1.0


def ok(answer: tuple[int, dict[str, str], bytes]) -> Any:
    """Vault's JSON answer; a refusal ends the run (what is timed must be right)."""
    status, _, body = answer
    if status != 200:
        raise SystemExit(f"Vault answered {status}: {body[:200]!r}")
    return json.loads(body)


SIGN_TARGET = 3.0


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def print_report(report: dict[str, list[Samples]], local: Samples, elapsed: float) -> None:
    copies, signs = report["copies"], report["signs"]
    floor = copies[0]
    print()
    print(f"(a) copy handout vs the floor (p50 ratio target <= {COPY_TARGET:.2f})")
    print(f"    {'variant':<36} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'p50 ratio':>10}")
    for sample in copies:
        ratio = sample.p50_ms / floor.p50_ms
        print(
            f"    {sample.name:<36} {len(sample.seconds):>5} {sample.p50_ms:>8.2f} "
            f"{sample.p99_ms:>8.2f} {ratio:>9.2f}x"
        )
    print()
    transit = signs[0]
    print(
        f"(b) signatures per second, one sequential client (target: sign mode >= "
        f"{SIGN_TARGET:.0f}x transit)"
    )
    print(f"    {'variant':<36} {'n':>5} {'p50 ms':>8} {'per s':>9} {'vs transit':>11}")
    for sample in [*signs, local]:
        ratio = sample.per_s / transit.per_s
        print(
            f"    {sample.name:<36} {len(sample.seconds):>5} {sample.p50_ms:>8.3f} "
            f"{sample.per_s:>9.0f} {ratio:>10.2f}x"
        )
    copy_ratio = copies[1].p50_ms / floor.p50_ms
    httpx_ratio = copies[4].p50_ms / copies[3].p50_ms
    sign_ratio = signs[1].per_s / transit.per_s
    print()
    copy_ok, sign_ok = copy_ratio <= COPY_TARGET, sign_ratio >= SIGN_TARGET
    print(f"copy, daemon process:      p50 {copy_ratio:.2f}x the floor -> {verdict(copy_ok)}")
    print(f"  the same over httpx:     p50 {httpx_ratio:.2f}x the httpx floor")
    print(f"sign mode, daemon process: {sign_ratio:.2f}x transit     -> {verdict(sign_ok)}")
    print(f"(finished in {elapsed:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
