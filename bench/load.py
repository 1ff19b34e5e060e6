"""Sign mode against Vault transit under load, measured with a compiled load generator.

    .venv/bin/python bench/load.py [--workers 1,8,32,64] [--seconds 5] [--rounds 3] [--quick]

Starts its own OpenBao dev server (with transit and one ed25519 key), the sandbox
exchange (the daemon's liveness checks go there) and the daemon as a separate
process, as it is deployed. Then ``hey`` (a Go load generator: ``apt-get install
hey``) sends, for each concurrency, the same signing request both ways:

    sign mode   POST {daemon}/v1/keys/main/load/sign   {"instruction": "orderExecute", ...}
    transit     POST {vault}/v1/transit/sign/load      {"input": <the same signing string>}

with the same worker token (a policy granting both, nothing else). The sides
alternate in rounds, so drift on a noisy machine hits both alike; the table
gives requests/s, p50 and p99 for each side and the ratios (sign / transit),
medians over the rounds. Targets (reported, never asserted): sign mode at least
1.5x transit's requests/s at 32 workers, and a p99 no worse than transit's.
``--quick`` (what ``make test`` runs) does one short round at 1 and 8 workers.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass

import httpx

from backpack_vault.backpack.signing import signing_string
from backpack_vault.config import VaultSettings
from backpack_vault.core.keys import KeyRef, generate_pair
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.testing import sandbox, store_key
from backpack_vault.vault.client import Provisioner, Vault
from handout import daemon_process  # the deployed shape: the daemon in its own process

REF = KeyRef("main", "load")
ORDER = {"symbol": "SOL_USDC", "side": "Bid", "orderType": "Limit", "price": "1", "quantity": "1"}
POLICY = """
path "backpack-broker/main/load/sign/orderExecute" { capabilities = ["update"] }
path "transit/sign/load" { capabilities = ["update"] }
"""
QUICK = {"workers": "1,8", "seconds": 1.0, "rounds": 1}
HEY = shutil.which("hey") or "hey"


@dataclass(frozen=True)
class Run:
    per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def hey(url: str, token: str, body: dict[str, object], workers: int, seconds: float) -> Run:
    """One hey run; its summary parsed (requests/s, latency percentiles, non-2xx count)."""
    done = subprocess.run(
        [
            HEY, "-z", f"{seconds}s", "-c", str(workers), "-m", "POST",
            "-H", f"X-Vault-Token: {token}", "-T", "application/json",
            "-d", json.dumps(body), url,
        ],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    )  # fmt: skip
    out = done.stdout

    def number(pattern: str) -> float:
        found = re.search(pattern, out)
        return float(found.group(1)) if found else float("nan")

    statuses = re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
    errors = sum(int(n) for code, n in statuses if not code.startswith("2"))
    return Run(
        per_s=number(r"Requests/sec:\s+([\d.]+)"),
        p50_ms=number(r"50% in ([\d.]+) secs") * 1000,
        p99_ms=number(r"99% in ([\d.]+) secs") * 1000,
        errors=errors,
    )


def median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one short round at 1 and 8")
    args = parser.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            if parser.get_default(name) == getattr(args, name):
                setattr(args, name, value)
    if shutil.which("hey") is None:
        print("bench/load.py needs hey, a Go load generator: apt-get install hey", file=sys.stderr)
        return 2
    concurrency = [int(c) for c in str(args.workers).split(",")]

    with DevVault() as dev, ServerThread(sandbox.create_app()) as exchange:
        root = {"X-Vault-Token": dev.root_token.reveal()}
        vault = Vault(VaultSettings(addr=dev.addr, token=dev.root_token))
        vault.login()
        pair = store_key(vault, REF, pair=generate_pair(), exchange=exchange.url)
        httpx.post(f"{exchange.url}/_sandbox/keys", json={"api_key": pair.api_key})
        httpx.post(f"{dev.addr}/v1/sys/mounts/transit", headers=root, json={"type": "transit"})
        # The same key in transit (BYOK is longer to set up; a fresh ed25519 key signs alike).
        httpx.post(
            f"{dev.addr}/v1/transit/keys/load", headers=root, json={"type": "ed25519"}
        ).raise_for_status()
        provisioner = Provisioner(vault)
        provisioner.ensure_policy("bench-load-worker", POLICY)
        token = provisioner.create_token(["bench-load-worker"]).reveal()
        message = signing_string("orderExecute", ORDER, 1_700_000_000_000, 5000)
        transit_body = {"input": base64.b64encode(message.encode()).decode()}
        sign_body = {"instruction": "orderExecute", "params": ORDER}
        with daemon_process(dev, exchange.url) as daemon:
            sides = {
                "transit": (f"{dev.addr}/v1/transit/sign/load", transit_body),
                "sign mode": (f"{daemon}/v1/keys/main/load/sign", sign_body),
            }
            for name, (url, body) in sides.items():  # warm up: caches, connections
                hey(url, token, body, 2, 0.5)
                del name
            results: dict[tuple[str, int], list[Run]] = {}
            for workers in concurrency:
                for round_no in range(args.rounds):
                    order = list(sides) if round_no % 2 == 0 else list(reversed(sides))
                    for name in order:
                        url, body = sides[name]
                        run = hey(url, token, body, workers, args.seconds)
                        results.setdefault((name, workers), []).append(run)
        vault.close()

    print(
        f"sign mode vs Vault transit, hey -z {args.seconds:g}s, {args.rounds} round(s), "
        "medians; one OpenBao dev server, the daemon in its own process"
    )
    print(
        f"{'workers':>7}  {'transit req/s':>13} {'p50':>7} {'p99':>7}   "
        f"{'sign req/s':>10} {'p50':>7} {'p99':>7}   {'req/s ratio':>11} {'p99 ratio':>9}  errors"
    )
    for workers in concurrency:
        t, s = results[("transit", workers)], results[("sign mode", workers)]
        errors = sum(r.errors for r in t + s)
        print(
            f"{workers:>7}  {median(t, 'per_s'):>13.0f} {median(t, 'p50_ms'):>7.2f} "
            f"{median(t, 'p99_ms'):>7.2f}   {median(s, 'per_s'):>10.0f} "
            f"{median(s, 'p50_ms'):>7.2f} {median(s, 'p99_ms'):>7.2f}   "
            f"{median(s, 'per_s') / median(t, 'per_s'):>10.2f}x "
            f"{median(s, 'p99_ms') / median(t, 'p99_ms'):>8.2f}x  {errors}"
        )
    print("targets: req/s ratio >= 1.5 at 32 workers; p99 ratio <= 1.0 at every concurrency")
    failed = sum(r.errors for runs in results.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
