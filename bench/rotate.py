"""Rotation and failover drills, with figures: orders placed and failed, time to switch.

    .venv/bin/python bench/rotate.py [--trials 5] [--check-interval 2] [--copy-ttl 3] [--quick]

Starts its own OpenBao dev server, the sandbox exchange and one daemon (checks every
``--check-interval`` s) on loopback. Each trial stores a fresh key (registered at
the sandbox) and starts four workers, two in sign mode and two in copy mode, each
placing an immediate-or-cancel sandbox order every 20 ms through the daemon. Then:

    rotation   ``keys rotate`` (``Vault.store_next``, as the CLI does); the successor is
               registered at the sandbox (the operator, in the web UI) and the clock
               starts; the switch is the moment Vault's record names the successor;
               then every worker moves, the old key is deleted at the sandbox, and the
               trial waits until the old key is retired (its last copy has expired)
    failover   a standby is stored and registered; once the daemon has found it ready,
               the current key is revoked at the sandbox and the clock starts; the switch
               is the moment the record names the standby

Printed per kind: orders placed and failed, and failed among those sent after the
switch was visible in Vault (the target is none), and p50 and max of the time to
the switch, with its ratio to the target (two check intervals plus 2 s). Figures
are printed, never asserted: the exit status is 1 only when a switch never happens
or a rotation loses an order.
``--quick`` (what ``make test`` runs) does one trial of each kind with a 1 s interval.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from backpack_vault.client.broker import BrokerClient
from backpack_vault.config import BrokerSettings, CheckSettings, Settings, VaultSettings
from backpack_vault.core.clock import iso_utc
from backpack_vault.core.keys import KeyRef, Origin, generate_pair
from backpack_vault.core.rotation import NextKey, NextState, Role
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.logging import configure
from backpack_vault.testing import store_key
from backpack_vault.testing.drill import order_loops, totals, wait_all_on
from backpack_vault.testing.sandbox import SandboxAdmin, SandboxState, create_app
from backpack_vault.vault.client import Vault

KINDS = ("rotation", "failover")
QUICK = {"trials": 1, "check_interval": 1.0}
GIVE_UP_S = 60.0


@dataclass
class Trial:
    switch_s: float | None
    placed: int
    failed: int
    failed_after_switch: int


def poll(condition: Callable[[], bool], timeout: float = GIVE_UP_S) -> float | None:
    """Seconds until ``condition`` holds, or None after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.02)
    return None


class Bench:
    def __init__(self, vault: Vault, sandbox: SandboxAdmin, broker: BrokerClient) -> None:
        self.vault = vault
        self.sandbox = sandbox
        self.broker = broker

    def _fresh_key(self) -> tuple[KeyRef, str]:
        ref = KeyRef("main", f"bot-{uuid.uuid4().hex[:8]}")
        pair = store_key(self.vault, ref, exchange=self.sandbox.url)
        self.sandbox.register(pair.api_key)
        return ref, pair.api_key

    def _store_next(self, ref: KeyRef, role: Role) -> str:
        pair = generate_pair()
        nxt = NextKey(
            api_key=pair.api_key,
            role=role,
            state=NextState.PENDING,
            read_only=False,
            origin=Origin.GENERATED.value,
            created_at=iso_utc(),
            created_by="bench",
        )
        self.vault.store_next(ref, nxt, pair.secret)
        return pair.api_key

    def _named(self, ref: KeyRef, api_key: str) -> Callable[[], bool]:
        return lambda: self.vault.read_record(ref).api_key == api_key

    def rotation(self) -> Trial:
        ref, old = self._fresh_key()
        with order_loops(self.broker, ref, self.sandbox.url) as loops:
            wait_all_on(loops, old, GIVE_UP_S)
            successor = self._store_next(ref, Role.SUCCESSOR)
            self.sandbox.register(successor)
            switch_s = poll(self._named(ref, successor))
            switched_at = time.monotonic()
            if switch_s is not None:
                wait_all_on(loops, successor, GIVE_UP_S)
                self.sandbox.revoke(old)  # deleted in the web UI
                poll(lambda: _previous_status(self.vault, ref) == "retired")
        tally = totals(loops)
        return Trial(switch_s, tally.placed, tally.failed, tally.failed_since(switched_at))

    def failover(self) -> Trial:
        ref, old = self._fresh_key()
        standby = self._store_next(ref, Role.STANDBY)
        self.sandbox.register(standby)
        poll(lambda: _next_state(self.vault, ref) == "ready")
        with order_loops(self.broker, ref, self.sandbox.url) as loops:
            wait_all_on(loops, old, GIVE_UP_S)
            self.sandbox.revoke(old)
            switch_s = poll(self._named(ref, standby))
            switched_at = time.monotonic()
            if switch_s is not None:
                wait_all_on(loops, standby, GIVE_UP_S)
                time.sleep(1.0)  # orders after every worker moved
        tally = totals(loops)
        return Trial(switch_s, tally.placed, tally.failed, tally.failed_since(switched_at))


def _previous_status(vault: Vault, ref: KeyRef) -> str:
    previous = vault.read_record(ref).previous
    return previous.status if previous else ""


def _next_state(vault: Vault, ref: KeyRef) -> str:
    nxt = vault.read_record(ref).next
    return nxt.state.value if nxt else ""


def print_table(results: dict[str, list[Trial]], interval: float) -> None:
    target = 2 * interval + 2
    print(f"rotation drill: 4 workers (2 sign, 2 copy), checks every {interval:g} s")
    print(f"{'kind':<10} {'trials':>6} {'placed':>7} {'failed':>7} {'after switch':>13} "
          f"{'switch p50':>11} {'max':>7} {'p50/target':>11}")  # fmt: skip
    for kind, trials in results.items():
        times = [t.switch_s for t in trials if t.switch_s is not None]
        p50 = statistics.median(times) if times else float("nan")
        top = max(times) if times else float("nan")
        print(
            f"{kind:<10} {len(trials):>6} {sum(t.placed for t in trials):>7} "
            f"{sum(t.failed for t in trials):>7} {sum(t.failed_after_switch for t in trials):>13} "
            f"{p50:>10.2f}s {top:>6.2f}s {p50 / target:>10.2f}x"
        )
    print(f"target: the switch within two check intervals plus 2 s = {target:g} s (ratio <= 1)")
    print("rotation: the old key stays valid until it is retired, so no order may fail;")
    print("failover: orders fail between the revocation and the switch, none after it")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="per kind")
    parser.add_argument("--check-interval", type=float, default=2.0, help="seconds")
    parser.add_argument("--copy-ttl", type=int, default=3, help="copy lifetime, seconds")
    parser.add_argument("--quick", action="store_true", help=f"defaults for a smoke run: {QUICK}")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    configure("console", "warning")
    started = time.monotonic()
    results: dict[str, list[Trial]] = {kind: [] for kind in KINDS}
    with (
        DevVault() as dev,
        ServerThread(create_app(SandboxState(seed=1))) as exchange,
        httpx.Client(base_url=exchange.url, timeout=10) as sandbox_http,
    ):
        sandbox = SandboxAdmin(sandbox_http)
        vault_settings = VaultSettings(addr=dev.addr, token=dev.root_token)
        settings = Settings(
            vault_settings,
            BrokerSettings(copy_ttl=args.copy_ttl),
            CheckSettings(
                backpack_url=exchange.url, interval=args.check_interval, jitter=0.0, lease_ttl=5
            ),
        )
        vault = Vault(vault_settings)
        vault.login()
        daemon = Daemon(settings, key_sync_interval_s=0.3, feed_interval_s=0.2)
        with (
            daemon,
            ServerThread(daemon.app) as served,
            BrokerClient(served.url, vault_addr=dev.addr, token=dev.root_token) as broker,
        ):
            bench = Bench(vault, sandbox, broker)
            for _ in range(args.trials):
                for kind in KINDS:  # kinds alternate, so drift hits both alike
                    results[kind].append(getattr(bench, kind)())
        vault.close()
    print_table(results, args.check_interval)
    print(f"(finished in {time.monotonic() - started:.1f} s)")
    never = sum(1 for trials in results.values() for t in trials if t.switch_s is None)
    lost = sum(t.failed for t in results["rotation"])
    if never or lost:
        print(f"WRONG: {never} switch(es) never happened, {lost} order(s) failed in rotations")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
