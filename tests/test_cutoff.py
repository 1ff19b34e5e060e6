"""Operator cutoff on every replica: the change feed, polled by each daemon.

Two daemons (replicas) share the session's OpenBao dev server and one KV prefix,
and serve real loopback HTTP. The replica that is asked afterwards caches keys
for an hour and sweeps once an hour, so only the feed can tell it of a change.
Every expectation is polled with a generous bound; the figures are bench/cutoff.py's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import structlog

from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyRef, Status
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.feed import FeedPoller
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import VaultUnavailable
from backpack_vault.events import Cause, Event, KeyStatusChanged
from backpack_vault.testing import now_iso, rotate_now, store_key, wait_until
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.vault.client import Vault
from backpack_vault.vault.port import Change

REF = KeyRef("main", "bot-a")
BOUND = 10.0  # generous: the feed is polled every 0.2 s


@dataclass
class Replica:
    daemon: Daemon
    url: str
    token: Secret

    def post(self, action: str, body: object = None) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/keys/{REF}/{action}",
            headers={"X-Vault-Token": self.token.reveal()},
            json=body,
        )

    def copy(self) -> httpx.Response:
        return self.post("copy")

    def sign(self) -> httpx.Response:
        return self.post("sign", {"instruction": "accountQuery"})


def wrap_token_alive(addr: str, wrap_token: str) -> bool:
    answer = httpx.post(f"{addr}/v1/sys/wrapping/lookup", json={"token": wrap_token})
    return answer.status_code == 200


@pytest.fixture
def replicas(
    vault_settings: VaultSettings, dev_vault: DevVault, sandbox: SandboxAdmin
) -> Iterator[tuple[Replica, Replica]]:
    """A and B on one Vault and prefix; B caches keys for an hour and sweeps hourly."""
    checks = CheckSettings(backpack_url=sandbox.url)
    slow = BrokerSettings(secret_cache_s=3600, decision_cache_s=3600)
    a = Daemon(Settings(vault_settings, BrokerSettings(), checks), confirm_delay_s=0)
    b = Daemon(Settings(vault_settings, slow, checks), sweep_interval_s=3600)
    with a, b, ServerThread(a.app) as server_a, ServerThread(b.app) as server_b:
        yield (
            Replica(a, server_a.url, dev_vault.root_token),
            Replica(b, server_b.url, dev_vault.root_token),
        )


def _revoke_by_operator(vault: Vault, a: Replica, sandbox: SandboxAdmin, api_key: str) -> None:
    vault.set_status(REF, Status.REVOKED, now=now_iso(), reason="leaked", actor="operator")


def _retire_by_operator(vault: Vault, a: Replica, sandbox: SandboxAdmin, api_key: str) -> None:
    vault.set_status(REF, Status.RETIRED, now=now_iso())  # what `keys retire` does


def _revoke_by_a_check(vault: Vault, a: Replica, sandbox: SandboxAdmin, api_key: str) -> None:
    sandbox.revoke(api_key)
    result = a.daemon.run_check(REF)
    assert result is not None
    assert result.new_status is Status.REVOKED


class TestCutoff:
    @pytest.mark.parametrize(
        ("change", "status"),
        [
            (_retire_by_operator, "retired"),
            (_revoke_by_operator, "revoked"),
            (_revoke_by_a_check, "revoked"),
        ],
        ids=["keys-retire", "keys-revoke", "check-on-replica-a"],
    )
    def test_a_change_is_refused_by_the_second_replica(
        self,
        replicas: tuple[Replica, Replica],
        vault: Vault,
        sandbox: SandboxAdmin,
        dev_vault: DevVault,
        change: object,
        status: str,
    ) -> None:
        """Copies and signatures of the key are refused by B (409), and B's unclaimed
        wrapping token no longer unwraps: B learned it from the feed alone."""
        a, b = replicas
        pair = store_key(vault, REF, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        assert b.sign().status_code == 200  # B now holds the key for an hour
        unclaimed = b.copy().json()["wrap_token"]
        assert wrap_token_alive(dev_vault.addr, unclaimed)

        change(vault, a, sandbox, pair.api_key)  # type: ignore[operator]

        wait_until(lambda: b.sign().status_code == 409, BOUND, "B refuses signatures")
        wait_until(lambda: not wrap_token_alive(dev_vault.addr, unclaimed), BOUND, "B revokes")
        refused = b.copy()
        assert refused.status_code == 409
        assert refused.json()["error"]["status"] == status
        assert b.sign().json()["error"]["status"] == status
        assert a.copy().status_code == 409

    def test_a_deleted_key_is_cut_off_too(
        self, replicas: tuple[Replica, Replica], vault: Vault, dev_vault: DevVault
    ) -> None:
        """`keys delete` lands on the feed as retired: B revokes its unclaimed copies."""
        _, b = replicas
        store_key(vault, REF)
        assert b.sign().status_code == 200
        unclaimed = b.copy().json()["wrap_token"]
        vault.delete_key(REF)
        wait_until(lambda: not wrap_token_alive(dev_vault.addr, unclaimed), BOUND, "B revokes")
        wait_until(lambda: b.sign().status_code == 404, BOUND, "B forgets the key")


class _Seen:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.changes: list[Change] = []
        self.rechecks = 0
        self.lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    def notify(self, changes: object) -> None:
        with self.lock:
            self.changes.extend(changes)  # type: ignore[arg-type]

    def recheck(self) -> None:
        self.rechecks += 1


class TestFeedPoller:
    def _poller(self, vault: Vault) -> tuple[FeedPoller, _Seen]:
        seen = _Seen()
        poller = FeedPoller(vault, emit=seen.emit, notify=seen.notify, recheck=seen.recheck)
        return poller, seen

    def test_the_first_poll_only_remembers_the_seq(self, vault: Vault) -> None:
        """Changes before the daemon started are not replayed as events."""
        store_key(vault, REF)
        vault.set_status(REF, Status.RETIRED, now=now_iso())
        poller, seen = self._poller(vault)
        poller.poll()
        assert poller.seq == vault.read_changes().seq
        assert seen.events == []
        assert seen.changes == []

    def test_each_changed_key_is_one_event_with_its_record(self, vault: Vault) -> None:
        """Two changes of one key and one of another: two events, the records as they are now."""
        other = KeyRef("main", "bot-b")
        store_key(vault, REF)
        store_key(vault, other)
        poller, seen = self._poller(vault)
        poller.poll()
        vault.set_status(REF, Status.REVOKED, now=now_iso())
        vault.set_status(other, Status.RETIRED, now=now_iso())
        vault.set_status(REF, Status.ACTIVE, now=now_iso(), reason="reinstated")
        poller.poll()
        changed = [(e.ref, e.new, e.cause) for e in seen.events if isinstance(e, KeyStatusChanged)]
        assert changed == [
            (other, Status.RETIRED, Cause.OBSERVED),
            (REF, Status.ACTIVE, Cause.OBSERVED),
        ]
        assert [(c.ref, c.status) for c in seen.changes] == [
            (REF, Status.REVOKED),
            (other, Status.RETIRED),
            (REF, Status.ACTIVE),
        ]
        poller.poll()
        assert len(seen.events) == 2  # nothing new: nothing emitted again

    def test_a_switch_is_told_to_the_streams_only_after_it_is_applied(self, vault: Vault) -> None:
        """A worker that hears ``rotated`` asks for a copy at once: by then this replica's
        broker must know the successor. Status news before it is told first (the cutoff);
        the streams get every entry once, in seq order."""
        other = KeyRef("main", "bot-b")
        store_key(vault, REF)
        store_key(vault, other)
        order: list[str] = []
        poller = FeedPoller(
            vault,
            emit=lambda event: order.append(f"emit {type(event).__name__} {event.ref}"),
            notify=lambda changes: order.extend(f"notify {c.name} {c.ref}" for c in changes),
        )
        poller.poll()
        vault.set_status(other, Status.REVOKED, now=now_iso())
        rotate_now(vault, REF)
        vault.set_status(other, Status.ACTIVE, now=now_iso(), reason="reinstated")
        poller.poll()
        told = [line for line in order if line.startswith("notify")]
        assert told == [
            "notify revoked main/bot-b",
            "notify rotated main/bot-a",
            "notify active main/bot-b",
        ]
        assert order[0] == "notify revoked main/bot-b"  # before any event is applied
        applied = order.index("emit KeyRotated main/bot-a")
        assert order.index("notify rotated main/bot-a") > applied
        assert "emit KeyStatusChanged main/bot-b" in order

    def test_a_switch_not_applied_is_not_told_until_it_is(self, vault: Vault) -> None:
        """Vault fails the record read of a rotated key: the streams hear nothing of the
        switch yet; the next poll applies it and tells it, once."""
        store_key(vault, REF)
        failing = {"read_record": 0}

        class Flaky:
            def __getattr__(self, name: str) -> Any:
                method = getattr(vault, name)
                if failing.get(name):
                    failing[name] -= 1

                    def fail(*_args: object, **_kwargs: object) -> None:
                        raise VaultUnavailable("Vault is sealed")

                    return fail
                return method

        poller, seen = self._poller(Flaky())  # type: ignore[arg-type]

        def told() -> list[str]:
            return [c.name for c in seen.changes]

        def emitted() -> list[str]:
            return [type(e).__name__ for e in seen.events]

        poller.poll()
        rotate_now(vault, REF)
        failing["read_record"] = 1
        poller.poll()
        assert (told(), emitted()) == ([], [])
        poller.poll()
        assert (told(), emitted()) == (["rotated"], ["KeyRotated"])
        poller.poll()
        assert told() == ["rotated"]

    def test_a_deleted_key_is_retired_with_cause_deleted(self, vault: Vault) -> None:
        store_key(vault, REF)
        poller, seen = self._poller(vault)
        poller.poll()
        vault.delete_key(REF)
        poller.poll()
        assert seen.events == [KeyStatusChanged(REF, None, Status.RETIRED, Cause.DELETED)]

    def test_a_pruned_feed_rechecks_everything(self, vault: Vault) -> None:
        """When the feed no longer holds the last seq seen, the replica re-reads what it holds."""
        store_key(vault, REF)
        poller, seen = self._poller(vault)
        poller.poll()
        data, cas = vault.read_document("changes") or ({}, 0)
        far = int(data.get("seq", 0)) + 500
        stale = Change(far, REF, Status.RETIRED, now_iso())
        vault.write_document("changes", {"seq": far, "entries": [stale.as_dict()]}, cas=cas)
        with structlog.testing.capture_logs() as logs:
            poller.poll()
        assert seen.rechecks == 1
        assert [e["event"] for e in logs] == ["feed.gap"]
        assert poller.seq == far

    def test_a_vault_error_tick_marks_nothing(self) -> None:
        """Vault hangs for a tick: logged once, the seq kept; the change arrives afterwards."""
        with DevVault() as own:
            settings = VaultSettings(
                addr=own.addr, token=own.root_token, kv_prefix="feed", timeout=0.5
            )
            vault = Vault(settings)
            vault.login()
            store_key(vault, REF)
            poller, seen = self._poller(vault)
            poller.poll()
            before = poller.seq
            vault.set_status(REF, Status.RETIRED, now=now_iso())
            own.pause()
            try:
                with structlog.testing.capture_logs() as logs:
                    poller.poll()
                    poller.poll()
            finally:
                own.resume()
            assert poller.seq == before
            assert seen.events == []
            warned = [e["event"] for e in logs if e["log_level"] == "warning"]
            assert warned == ["feed.unavailable"]  # once, not at every tick
            with structlog.testing.capture_logs() as logs:
                poller.poll()
            assert [e["event"] for e in logs] == ["feed.recovered"]
            assert [e.new for e in seen.events if isinstance(e, KeyStatusChanged)] == [
                Status.RETIRED
            ]
            assert poller.seq == vault.read_changes().seq
            vault.close()
