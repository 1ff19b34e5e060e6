"""Rotation without downtime, and standby keys that take over when a key is revoked.

Real OpenBao (the session's dev server), the sandbox exchange on loopback, the CLI as
an operator runs it, and the daemon with its scheduler (checks every second), worker
API and change feed. Workers are real ``BrokerClient`` auths placing sandbox orders
in sign and copy mode. Every expectation is polled with a generous bound, never
timed; the timings are bench/rotate.py's.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from backpack_vault.cli import cli
from backpack_vault.client.broker import BrokerClient
from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyPair, KeyRef, Status, generate_pair, switch_patch
from backpack_vault.core.rotation import (
    HISTORY_KEEP,
    HistoryEntry,
    NextKey,
    NextState,
    Role,
    history_from_metadata,
    history_patch,
)
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import UnknownKey, WriteConflict
from backpack_vault.events import Event, KeyRotated, KeyStatusChanged, PredecessorRetired
from backpack_vault.testing import make_record, store_key, wait_until
from backpack_vault.testing.drill import order_loops, totals, wait_all_on
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.ui.render import gather, page
from backpack_vault.vault.client import Vault

PROBE = "GET /api/v1/account"  # what a liveness check asks Backpack
REF = KeyRef("main", "bot-a")
INTERVAL = 1.0  # the daemon checks every key every second here
COPY_TTL = 3  # copies live 3 s: the old key retires soon after a switch
BOUND = 30.0  # generous: two check intervals plus scheduling on a busy 2-core machine


def cli_env(settings: VaultSettings, sandbox: SandboxAdmin) -> dict[str, str]:
    token = settings.token
    return {
        "VAULT_ADDR": settings.addr,
        "VAULT_TOKEN": token.reveal() if token else "",
        "BACKPACK_VAULT_KV_PREFIX": settings.kv_prefix,
        "BACKPACK_VAULT_BACKPACK_URL": sandbox.url,
        "BACKPACK_VAULT_LOG_LEVEL": "warning",
    }


def run_cli(env: dict[str, str], *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, input=stdin)


@dataclass
class Seen:
    """Every event the daemon's bus carried."""

    events: list[Event]

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def revoked(self) -> list[KeyStatusChanged]:
        return [
            e for e in self.events if isinstance(e, KeyStatusChanged) and e.new is Status.REVOKED
        ]


@dataclass
class Running:
    daemon: Daemon
    url: str
    seen: Seen
    broker: BrokerClient


@pytest.fixture
def running(
    vault_settings: VaultSettings, dev_vault: DevVault, sandbox: SandboxAdmin
) -> Iterator[Running]:
    """A daemon checking every second against the sandbox, serving on loopback."""
    settings = Settings(
        vault_settings,
        BrokerSettings(copy_ttl=COPY_TTL),
        CheckSettings(backpack_url=sandbox.url, interval=INTERVAL, jitter=0.0, lease_ttl=5.0),
    )
    daemon = Daemon(
        settings,
        confirm_delay_s=0,
        feed_interval_s=0.1,
        key_sync_interval_s=0.3,
        watch_heartbeat_s=0.5,
    )
    seen = Seen([])
    daemon.events.subscribe(seen)
    with daemon, ServerThread(daemon.app) as server:
        broker = BrokerClient(server.url, vault_addr=dev_vault.addr, token=dev_vault.root_token)
        try:
            yield Running(daemon, server.url, seen, broker)
        finally:
            broker.close()


def with_ready_standby(
    vault: Vault, vault_settings: VaultSettings, sandbox: SandboxAdmin
) -> tuple[KeyPair, dict[str, str], str]:
    """A key at the sandbox with a generated standby Backpack accepts (``ready``): the
    key's pair, the CLI's environment and the standby's API key."""
    pair = stored_in_sandbox(vault, sandbox)
    env = cli_env(vault_settings, sandbox)
    made = run_cli(env, "keys", "generate", str(REF), "--standby")
    assert made.exit_code == 0, made.output
    standby = made.stdout.strip()
    sandbox.register(standby)
    wait_until(lambda: _next_state(vault) == "ready", timeout=BOUND)
    return pair, env, standby


def stored_in_sandbox(vault: Vault, sandbox: SandboxAdmin, **options: object) -> KeyPair:
    pair = store_key(vault, REF, exchange=sandbox.url, **options)  # type: ignore[arg-type]
    sandbox.register(pair.api_key)
    return pair


def json_out(text: str) -> Any:
    """The CLI's ``--json`` document: the daemon's threads may log into the same stdout."""
    return json.loads(text[text.index("{\n") : text.rindex("\n}") + 2])


def rotate(env: dict[str, str]) -> str:
    """``keys rotate --json``; the successor's public key."""
    result = run_cli(env, "keys", "rotate", str(REF), "--json")
    assert result.exit_code == 0, result.output
    out = json_out(result.stdout)
    assert out == {"api_key": out["api_key"], "name": str(REF), "status": "pending"}
    return str(out["api_key"])


def show(env: dict[str, str]) -> dict[str, object]:
    result = run_cli(env, "keys", "show", str(REF), "--json")
    assert result.exit_code == 0, result.output
    shown: dict[str, object] = json_out(result.stdout)
    return shown


# -- keys rotate, keys show, --abort ---------------------------------------------------------------


class TestRotateCommand:
    def test_rotate_stores_a_pending_successor_under_the_same_name(
        self, vault: Vault, vault_settings: VaultSettings, sandbox: SandboxAdmin
    ) -> None:
        pair = stored_in_sandbox(vault, sandbox, read_only=True)
        env = cli_env(vault_settings, sandbox)
        result = run_cli(env, "keys", "rotate", str(REF))
        assert result.exit_code == 0, result.output
        successor = result.stdout.strip()
        assert successor != pair.api_key
        # The exact steps in the Backpack UI, with Read Only as the current key's.
        assert 'Paste the public key above into the "Public Key" field' in result.stderr
        assert "switch Read Only ON" in result.stderr
        assert "sub-account 'main'" in result.stderr
        record = vault.read_record(REF)
        assert record.api_key == pair.api_key  # workers keep the current key
        assert record.status is Status.ACTIVE
        assert record.next is not None
        assert (record.next.api_key, record.next.role, record.next.state) == (
            successor,
            Role.SUCCESSOR,
            NextState.PENDING,
        )
        assert record.next.read_only is True

    def test_keys_show_displays_both_keys(
        self, vault: Vault, vault_settings: VaultSettings, sandbox: SandboxAdmin
    ) -> None:
        pair = stored_in_sandbox(vault, sandbox)
        env = cli_env(vault_settings, sandbox)
        successor = rotate(env)
        shown = show(env)
        assert shown["api_key"] == pair.api_key
        assert isinstance(shown["next"], dict)
        assert shown["next"]["api_key"] == successor
        assert shown["next"]["status"] == "pending"
        human = run_cli(env, "keys", "show", str(REF))
        assert pair.api_key in human.stdout
        assert successor in human.stdout
        assert "successor:" in human.stdout

    def test_an_aborted_rotation_leaves_no_trace(
        self, vault: Vault, vault_settings: VaultSettings, sandbox: SandboxAdmin
    ) -> None:
        stored_in_sandbox(vault, sandbox)
        env = cli_env(vault_settings, sandbox)
        before = show(env)
        successor = rotate(env)
        result = run_cli(env, "keys", "rotate", str(REF), "--abort")
        assert result.exit_code == 0, result.output
        assert successor in result.stdout
        assert show(env) == before  # the same record, version and history
        with pytest.raises(WriteConflict):  # the successor's pair is gone from Vault
            vault.read_next_secret(REF, successor)
        again = run_cli(env, "keys", "rotate", str(REF), "--abort")
        assert again.exit_code == 0
        assert "nothing to drop" in again.stdout

    def test_two_operators_rotating_at_once_one_wins(
        self, vault: Vault, vault_settings: VaultSettings, sandbox: SandboxAdmin
    ) -> None:
        stored_in_sandbox(vault, sandbox)
        env = cli_env(vault_settings, sandbox)
        argv = [sys.executable, "-m", "backpack_vault", "keys", "rotate", str(REF), "--json"]
        start = threading.Barrier(2)
        outcomes: list[subprocess.CompletedProcess[str]] = []

        def operator() -> None:
            start.wait()
            outcomes.append(
                subprocess.run(
                    argv, check=False, env=env, capture_output=True, text=True, timeout=60
                )
            )

        threads = [threading.Thread(target=operator) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(o.returncode for o in outcomes)
        assert codes == [0, 6], [o.stderr for o in outcomes]
        loser = next(o for o in outcomes if o.returncode == 6)
        assert "was not written" in loser.stderr
        assert "Traceback" not in loser.stderr
        winner = json.loads(next(o for o in outcomes if o.returncode == 0).stdout)
        record = vault.read_record(REF)
        assert record.next is not None
        assert record.next.api_key == winner["api_key"]

    def test_a_retired_key_cannot_be_rotated_and_an_unknown_one_is_unknown(
        self, vault: Vault, vault_settings: VaultSettings, sandbox: SandboxAdmin
    ) -> None:
        store_key(vault, REF, status=Status.RETIRED, exchange=sandbox.url)
        env = cli_env(vault_settings, sandbox)
        retired = run_cli(env, "keys", "rotate", str(REF))
        assert retired.exit_code == 6
        assert "it is retired" in retired.stderr
        unknown = run_cli(env, "keys", "rotate", "main/nobody")
        assert unknown.exit_code == 5
        with pytest.raises(UnknownKey):
            vault.read_record(KeyRef("main", "nobody"))

    def test_a_standby_must_match_read_only(
        self, vault: Vault, vault_settings: VaultSettings, sandbox: SandboxAdmin
    ) -> None:
        stored_in_sandbox(vault, sandbox, read_only=True)
        standby = generate_pair()
        env = cli_env(vault_settings, sandbox)
        args = ("keys", "add", str(REF), "--standby", "--api-key", standby.api_key)
        refused = run_cli(env, *args, stdin=standby.secret.reveal())
        assert refused.exit_code == 3
        assert "add --read-only" in refused.stderr
        assert vault.read_record(REF).next is None
        accepted = run_cli(env, *args, "--read-only", stdin=standby.secret.reveal())
        assert accepted.exit_code == 0, accepted.output
        record = vault.read_record(REF)
        assert record.next is not None
        assert (record.next.role, record.next.api_key) == (Role.STANDBY, standby.api_key)


class TestOperatorPage:
    def test_the_page_shows_the_successor_and_when_the_old_key_may_go(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        running: Running,
    ) -> None:
        pair = stored_in_sandbox(vault, sandbox)
        env = cli_env(vault_settings, sandbox)
        successor = rotate(env)
        source = running.daemon._ui_source()
        state = gather(source, "operator", time.time() + 60, time.time())
        [row] = state["rotations"]  # type: ignore[misc]
        assert row["next"]["api_key"] == successor
        assert f"the public key {successor}" in row["advice"]
        sandbox.register(successor)
        wait_until(lambda: _previous_status(vault) == "retiring", timeout=BOUND)

        def shown() -> dict[str, Any]:
            return gather(source, "operator", time.time() + 60, time.time())

        # The page reads keys again when the feed moves, or after a few seconds.
        wait_until(lambda: shown()["rotations"][0]["previous"] is not None, timeout=BOUND)
        state = shown()
        [row] = state["rotations"]
        assert row["previous"]["api_key"] == pair.api_key
        assert row["advice"].startswith(f"Delete {pair.api_key} in the Backpack UI after")
        html = page(state)
        assert "Rotations, standbys and old keys" in html
        assert pair.api_key in html
        assert successor in html


# -- the switch ------------------------------------------------------------------------------------


class TestSwitch:
    def test_a_successor_backpack_never_accepts_stays_pending(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        running: Running,
    ) -> None:
        pair = stored_in_sandbox(vault, sandbox)
        env = cli_env(vault_settings, sandbox)
        successor = rotate(env)
        for _ in range(3):
            running.daemon.run_check(REF)
        record = vault.read_record(REF)
        assert record.api_key == pair.api_key
        assert record.next is not None
        assert (record.next.api_key, record.next.state) == (successor, NextState.PENDING)
        assert record.next.last_verdict.startswith("REJECTED")  # it was asked about
        signed = running.broker.sign(REF, "accountQuery")
        assert signed["X-API-Key"] == pair.api_key
        assert running.broker.copy(REF).api_key == pair.api_key
        assert not running.seen.of(KeyRotated)

    def test_the_watch_stream_sends_rotated_with_the_new_public_key(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        running: Running,
        root_token: Secret,
    ) -> None:
        pair = stored_in_sandbox(vault, sandbox)
        env = cli_env(vault_settings, sandbox)
        successor = rotate(env)
        frames: list[tuple[str, dict[str, object]]] = []
        connected = threading.Event()

        def follow() -> None:
            url = f"{running.url}/v1/keys/{REF}/watch"
            headers = {"X-Vault-Token": root_token.reveal()}
            with httpx.stream("GET", url, headers=headers, timeout=BOUND) as stream:
                event = ""
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        frames.append((event, json.loads(line[6:])))
                        connected.set()
                        if event == "rotated":
                            return

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        assert connected.wait(BOUND)
        sandbox.register(successor)
        reader.join(BOUND)
        rotated = [data for event, data in frames if event == "rotated"]
        assert rotated, frames
        assert rotated[0]["api_key"] == successor
        assert rotated[0]["status"] == "active"
        record = vault.read_record(REF)
        assert rotated[0]["version"] == record.version
        assert record.previous is not None
        assert (record.previous.api_key, record.previous.status) == (pair.api_key, "retiring")

    def test_a_switch_that_stopped_between_its_writes_is_finished(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        running: Running,
    ) -> None:
        pair = stored_in_sandbox(vault, sandbox)
        env = cli_env(vault_settings, sandbox)
        successor = rotate(env)
        record = vault.read_record(REF)
        secret = vault.read_next_secret(REF, successor)
        # The pair's write alone, as a daemon stopped right after it would leave things.
        vault._client.secrets.kv.v2.create_or_update_secret(
            path=f"{vault_settings.kv_prefix}/{REF}",
            secret={"api_key": successor, "api_secret": secret.reveal()},
            cas=record.version,
            mount_point="secret",
        )
        sandbox.register(successor)
        # Meanwhile every handout already uses the successor, which the pair now is.
        assert running.broker.sign(REF, "accountQuery")["X-API-Key"] == successor
        wait_until(lambda: vault.read_record(REF).api_key == successor, timeout=BOUND)
        finished = vault.read_record(REF)
        assert finished.next is None
        assert finished.previous is not None
        assert finished.previous.api_key == pair.api_key


# -- the drills ------------------------------------------------------------------------------------


class TestDrills:
    def test_rotation_drill_counts_zero_failed_orders(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        running: Running,
    ) -> None:
        """Four workers (two sign, two copy) trade through a whole rotation."""
        pair = stored_in_sandbox(vault, sandbox)
        env = cli_env(vault_settings, sandbox)
        with order_loops(running.broker, REF, sandbox.url) as loops:
            assert wait_all_on(loops, pair.api_key, BOUND)
            successor = rotate(env)
            assert wait_all_on(loops, pair.api_key, BOUND)  # still the current key
            sandbox.register(successor)  # the operator creates it in the UI
            wait_until(lambda: vault.read_record(REF).api_key == successor, timeout=BOUND)
            assert wait_all_on(loops, successor, BOUND)  # every worker moved, without error
            sandbox.revoke(pair.api_key)  # the operator deletes the old key in the UI
            wait_until(lambda: _previous_status(vault) == "retired", timeout=BOUND)
            moved = totals(loops).placed
            wait_until(lambda: totals(loops).placed > moved + 20, timeout=BOUND)
        tally = totals(loops)
        assert tally.failed == 0, tally.errors
        assert tally.by_key[pair.api_key] > 0
        assert tally.by_key[successor] > 0
        record = vault.read_record(REF)
        assert (record.status, record.api_key) == (Status.ACTIVE, successor)
        assert [e.event for e in record.history] == ["rotated", "retired"]
        assert not running.seen.revoked  # the old key's deletion is no revocation
        assert len(running.seen.of(PredecessorRetired)) == 1
        assert running.daemon.checker.outage_since is None  # nor an outage

    def test_failover_drill_moves_workers_to_the_standby(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        running: Running,
    ) -> None:
        pair = stored_in_sandbox(vault, sandbox)
        standby = generate_pair()
        sandbox.register(standby.api_key)  # created in the web UI
        env = cli_env(vault_settings, sandbox)
        added = run_cli(
            env,
            "keys",
            "add",
            str(REF),
            "--standby",
            "--api-key",
            standby.api_key,
            stdin=standby.secret.reveal(),
        )
        assert added.exit_code == 0, added.output
        wait_until(lambda: _next_state(vault) == "ready", timeout=BOUND)
        with order_loops(running.broker, REF, sandbox.url) as loops:
            assert wait_all_on(loops, pair.api_key, BOUND)
            sandbox.revoke(pair.api_key)  # revoked in the web UI (or leaked and deleted)
            wait_until(lambda: vault.read_record(REF).api_key == standby.api_key, timeout=BOUND)
            confirmed = time.monotonic()  # the daemon's confirmation is written by now
            assert wait_all_on(loops, standby.api_key, BOUND)
            placed = totals(loops).placed
            wait_until(lambda: totals(loops).placed > placed + 20, timeout=BOUND)
        tally = totals(loops)
        # Orders sent before the confirmation may fail (the key was dead); none after it.
        assert tally.failed_since(confirmed) == 0, tally.errors
        record = vault.read_record(REF)
        assert (record.status, record.api_key, record.next) == (
            Status.ACTIVE,
            standby.api_key,
            None,
        )
        assert record.previous is not None
        assert (record.previous.api_key, record.previous.status) == (pair.api_key, "revoked")
        assert [e.event for e in record.history] == ["failover"]
        rotations = running.seen.of(KeyRotated)
        assert rotations
        assert all(e.failover for e in rotations)  # type: ignore[attr-defined]
        assert not running.seen.revoked  # workers saw "rotated", not an outage

    def test_an_operator_revoke_fails_over_to_a_ready_standby(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        running: Running,
    ) -> None:
        pair, env, standby = with_ready_standby(vault, vault_settings, sandbox)
        revoked = run_cli(env, "keys", "revoke", str(REF), "--reason", "leaked")
        assert revoked.exit_code == 0, revoked.output
        wait_until(lambda: vault.read_record(REF).api_key == standby, timeout=BOUND)
        record = vault.read_record(REF)
        assert record.status is Status.ACTIVE
        assert record.previous is not None
        assert (record.previous.api_key, record.previous.status) == (pair.api_key, "revoked")
        assert running.broker.sign(REF, "accountQuery")["X-API-Key"] == standby

    def test_exec_follows_an_operator_revoke_to_the_ready_standby(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        running: Running,
        exec_runner: Any,
    ) -> None:
        """A revoke with a ready standby: exec stops the bot at once and, once the leader
        has switched the name, starts it on the standby, where it used to exit 6."""
        pair, env, standby = with_ready_standby(vault, vault_settings, sandbox)
        bot = exec_runner(running.url, REF)
        try:
            wait_until(lambda: _story(bot) == [f"start {pair.api_key}"], BOUND, "the bot")
            revoked = run_cli(env, "keys", "revoke", str(REF), "--reason", "leaked")
            assert revoked.exit_code == 0, revoked.output
            wait_until(lambda: len(_story(bot)) == 3, BOUND, "the bot on the standby")
            assert _story(bot) == [f"start {pair.api_key}", "stop", f"start {standby}"]
            assert bot.process.poll() is None
        finally:
            bot.process.send_signal(signal.SIGTERM)
            code, err = bot.wait()
        assert code == 42  # the bot's own code: exec forwarded SIGTERM to it
        assert "has a ready standby" in err

    def test_exec_exits_as_for_a_revoke_when_the_standby_is_refused_too(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        running: Running,
        exec_runner: Any,
    ) -> None:
        """The standby Backpack no longer accepts never takes over: the bot stops at the
        revoke and exec exits 6 (at the latest after --failover-wait)."""
        pair, env, standby = with_ready_standby(vault, vault_settings, sandbox)
        bot = exec_runner(running.url, REF, "--failover-wait", "3")
        wait_until(lambda: _story(bot) == [f"start {pair.api_key}"], BOUND, "the bot")
        sandbox.revoke(standby)  # leaked with the key, say
        probes = sandbox.count(PROBE, standby)
        assert run_cli(env, "keys", "revoke", str(REF), "--reason", "leaked").exit_code == 0
        code, err = bot.wait()  # exec_runner kills it at the end should it not exit
        assert code == 6, err
        assert _story(bot) == [f"start {pair.api_key}", "stop"]
        # The revoked name is probed no more: a probe of the standby is the leader trying it.
        wait_until(lambda: sandbox.count(PROBE, standby) > probes, BOUND, "the standby tried")
        assert vault.read_record(REF).api_key == pair.api_key

    def test_a_revocation_without_a_ready_standby_is_a_revocation(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        running: Running,
    ) -> None:
        """A standby Backpack never accepted does not hide a real revocation."""
        pair = stored_in_sandbox(vault, sandbox)
        env = cli_env(vault_settings, sandbox)
        made = run_cli(env, "keys", "generate", str(REF), "--standby")
        assert made.exit_code == 0, made.output
        sandbox.revoke(pair.api_key)
        wait_until(lambda: vault.read_record(REF).status is Status.REVOKED, timeout=BOUND)
        record = vault.read_record(REF)
        assert record.api_key == pair.api_key
        assert record.next is not None
        assert record.next.state is NextState.PENDING
        assert not running.seen.of(KeyRotated)


def _previous_status(vault: Vault) -> str:
    previous = vault.read_record(REF).previous
    return previous.status if previous else ""


def _story(run: Any) -> list[str]:
    """What the stand-in bot under exec went through: "start KEY" per start, "stop" per
    SIGTERM (on which it exits 42)."""
    return [f"start {line['key']}" if "start" in line else "stop" for line in run.lines()]


def _next_state(vault: Vault) -> str:
    nxt = vault.read_record(REF).next
    return nxt.state.value if nxt else ""


# -- the pure parts: what the metadata holds -------------------------------------------------------


class TestMetadata:
    def test_history_keeps_the_newest_entries_in_order(self) -> None:
        entries: tuple[HistoryEntry, ...] = ()
        for i in range(HISTORY_KEEP + 3):
            patch = history_patch(
                entries, HistoryEntry(f"2026-12-01T00:00:{i:02d}Z", "rotated", f"k{i}")
            )
            entries = history_from_metadata({k: v for k, v in patch.items() if v is not None})
        assert len(entries) == HISTORY_KEEP
        assert [e.api_key for e in entries] == [f"k{i}" for i in range(3, HISTORY_KEEP + 3)]

    def test_a_long_note_is_cut_to_vaults_limit_never_the_keys(self) -> None:
        entry = HistoryEntry("2026-12-01T00:00:00Z", "failover", "A" * 44, "B" * 44, note="x" * 900)
        text = entry.encode()
        assert len(text) <= 512
        decoded = HistoryEntry.decode(text)
        assert decoded is not None
        assert (decoded.api_key, decoded.previous) == ("A" * 44, "B" * 44)

    def test_a_switch_patch_makes_the_next_key_current_and_forgets_it(self) -> None:
        nxt = NextKey(
            api_key="N" * 43 + "=",
            role=Role.SUCCESSOR,
            state=NextState.READY,
            read_only=True,
            origin="generated",
            created_at="t0",
        )
        record = dataclasses.replace(make_record(REF, "O" * 43 + "="), next=nxt, version=4)
        patch = switch_patch(
            record, now="t1", failover=False, safe_at="t2", verdict="VALID", actor="check"
        )
        assert patch["api_key"] == nxt.api_key
        assert patch["read_only"] == "true"
        assert patch["next_api_key"] is None  # the successor's fields go
        assert patch["previous_api_key"] == record.api_key
        assert patch["previous_status"] == "retiring"
        assert patch["previous_version"] == "4"
        assert patch["previous_safe_at"] == "t2"
        failover = switch_patch(
            record, now="t1", failover=True, safe_at="t2", verdict="REJECTED", actor="check"
        )
        assert failover["previous_status"] == "revoked"
        assert failover.get("previous_safe_at") is None
