"""The daemon's scheduled liveness checks, end to end.

Real OpenBao (the session's dev server), the sandbox exchange on loopback, the
daemon's own scheduler and its worker API over HTTP; nothing is mocked. Checks
run every second, so every expectation is polled with a deadline measured in
check intervals, never asserted after a fixed sleep. That something stopped
(probes of a revoked key, a second alert) is judged against a key that keeps
being checked.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backpack_vault.client.broker import BrokerClient, KeyRevoked
from backpack_vault.config import Secret, Settings, VaultSettings, load
from backpack_vault.core.keys import KeyRef, Origin, Status, generate_pair
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.leader import Lease
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.logging import configure
from backpack_vault.testing import NOW, FakeClock, store_key, wait_until
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.vault.client import Provisioner, Vault

pytestmark = pytest.mark.slow

INTERVAL = 1.0  # seconds between two checks of one key
LEASE_TTL = 2.0
KEY_SYNC = 0.3  # how often the leader looks for keys added, retired or deleted in Vault
SLACK = 3.0  # scheduling, the confirming probe and Vault writes on a busy 2-core machine
PROBE = "GET /api/v1/account"
REF = KeyRef("main", "bot-a")


# -- helpers ------------------------------------------------------------------------------


def settings_for(
    dev_vault: DevVault,
    kv_prefix: str,
    backpack_url: str,
    *,
    interval: float = INTERVAL,
    webhook_url: str | None = None,
    exchange_timeout: float | None = None,
) -> Settings:
    """Settings as an operator writes them: environment variables only."""
    env = {
        "VAULT_ADDR": dev_vault.addr,
        "VAULT_TOKEN": dev_vault.root_token.reveal(),
        "BACKPACK_VAULT_KV_PREFIX": kv_prefix,
        "BACKPACK_VAULT_GRANT_PREFIX": f"{kv_prefix}-broker",
        "BACKPACK_VAULT_BACKPACK_URL": backpack_url,
        "BACKPACK_VAULT_CHECK_INTERVAL": str(interval),
        "BACKPACK_VAULT_LEASE_TTL": str(LEASE_TTL),
    }
    if webhook_url is not None:
        env["BACKPACK_VAULT_WEBHOOK_URL"] = webhook_url
    settings = load(env)
    if exchange_timeout is not None:  # no environment variable sets it: Settings does
        checks = dataclasses.replace(settings.checks, timeout=exchange_timeout)
        settings = dataclasses.replace(settings, checks=checks)
    return settings


@dataclass
class Running:
    """A started daemon (scheduler and lease) and the URL of its worker API."""

    daemon: Daemon
    url: str

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics").text

    def verdicts(self, ref: KeyRef = REF) -> Counter[str]:
        """How many checks of ``ref`` ended in each label: VALID, UNKNOWN(maintenance), ..."""
        counted: Counter[str] = Counter()
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "backpack_vault_checks_total" and labels["key"] == str(ref):
                    reason = labels["reason"]
                    label = "VALID" if reason == "accepted" else f"{labels['verdict']}({reason})"
                    counted[label] += int(sample.value)
        return counted

    def leader_gauge(self) -> float:
        for family in text_string_to_metric_families(self.metrics()):
            if family.name == "backpack_vault_checks_leader":
                return float(family.samples[0].value)
        return -1.0

    def post(self, ref: KeyRef, action: str, token: Secret, body: Any = None) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/keys/{ref}/{action}",
            headers={"X-Vault-Token": token.reveal()},
            json=body,
        )

    def job(self, ref: KeyRef = REF) -> Any:
        return self.daemon.scheduler.get_job(f"check:{ref}")


@contextmanager
def running(settings: Settings) -> Iterator[Running]:
    """The daemon as `serve` runs it, in this process: scheduler started, API on loopback."""
    daemon = Daemon(settings, key_sync_interval_s=KEY_SYNC, confirm_delay_s=0.1)
    daemon.start()
    try:
        with ServerThread(daemon.app) as server:
            yield Running(daemon, server.url)
    finally:
        daemon.stop()


def crash(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop a daemon as a crash would: the scheduler dies, the lease is never released."""
    monkeypatch.setattr(daemon.lease, "release", lambda: None)
    daemon.scheduler.shutdown(wait=False)
    daemon._started = False  # the later stop() only closes clients


def unwraps(vault_addr: str, wrap_token: str) -> bool:
    answer = httpx.post(f"{vault_addr}/v1/sys/wrapping/lookup", json={"token": wrap_token})
    return answer.status_code == 200


def worker_token(vault: Vault, settings: VaultSettings, ref: KeyRef = REF) -> Secret:
    """A worker's own token, granted copies of ``ref`` (and nothing on the KV paths)."""
    name = f"{settings.kv_prefix}-worker"
    grant = f"{settings.grant_prefix}/{ref}/copy"
    provisioner = Provisioner(vault)
    provisioner.ensure_policy(name, f'path "{grant}" {{ capabilities = ["read"] }}')
    return provisioner.create_token([name])


def kv_metadata(settings: VaultSettings, ref: KeyRef) -> dict[str, Any]:
    """The raw KV metadata (updated_time, versions, custom_metadata) as Vault reports it."""
    token = settings.token.reveal() if settings.token else ""
    url = f"{settings.addr}/v1/{settings.kv_mount}/metadata/{settings.kv_prefix}/{ref}"
    data: dict[str, Any] = httpx.get(url, headers={"X-Vault-Token": token}).json()["data"]
    return data


@dataclass
class Receiver:
    """A webhook receiver: records every POST body."""

    received: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        self.raw.append(body)
        self.received.append(json.loads(body))
        return Response(status_code=204)

    def status_changes(self, ref: KeyRef = REF) -> list[dict[str, Any]]:
        return [
            alert
            for alert in self.received
            if alert.get("event") == "key.status_changed" and alert.get("key") == str(ref)
        ]


@pytest.fixture
def webhook() -> Iterator[tuple[Receiver, str]]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/hooks/alerts", receiver.hook, methods=["POST"])])
    with ServerThread(app) as server:
        yield receiver, f"{server.url}/hooks/alerts"


@pytest.fixture
def make_settings(
    dev_vault: DevVault, kv_prefix: str, sandbox: SandboxAdmin
) -> Callable[..., Settings]:
    def make(**options: Any) -> Settings:
        return settings_for(dev_vault, kv_prefix, sandbox.url, **options)

    return make


# -- revocation ---------------------------------------------------------------------------


class TestRevocation:
    def test_a_key_revoked_at_the_exchange_is_cut_off_within_an_interval(
        self,
        make_settings: Callable[..., Settings],
        vault: Vault,
        sandbox: SandboxAdmin,
        webhook: tuple[Receiver, str],
        dev_vault: DevVault,
    ) -> None:
        """Revoked in Vault within about one interval; unclaimed copies die; 409s; one alert."""
        receiver, hook_url = webhook
        pair = store_key(vault, REF, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        kept = store_key(vault, KeyRef("main", "kept"), exchange=sandbox.url)
        sandbox.register(kept.api_key)
        root = dev_vault.root_token
        with running(make_settings(webhook_url=hook_url)) as served:
            wait_until(lambda: served.verdicts()["VALID"] >= 1, 2 * INTERVAL + SLACK, "a check")
            copies = [served.post(REF, "copy", root).json()["wrap_token"] for _ in range(2)]
            assert all(unwraps(dev_vault.addr, token) for token in copies)

            sandbox.revoke(pair.api_key)
            wait_until(
                lambda: vault.read_record(REF).status is Status.REVOKED,
                INTERVAL + SLACK,
                "revoked in Vault",
            )
            wait_until(
                lambda: not any(unwraps(dev_vault.addr, token) for token in copies),
                SLACK,
                "unclaimed copies revoked",
            )
            copy = served.post(REF, "copy", root)
            sign = served.post(REF, "sign", root, {"instruction": "accountQuery"})
            assert (copy.status_code, sign.status_code) == (409, 409)
            assert copy.json()["error"]["status"] == "revoked"
            with (
                BrokerClient(served.url, vault_addr=dev_vault.addr, token=root) as client,
                pytest.raises(KeyRevoked),
            ):
                client.copy(REF)
            record = vault.read_record(REF)
            assert record.last_verdict == "REJECTED(key_rejected)"

            wait_until(lambda: receiver.status_changes() != [], SLACK, "the alert")
            wait_until(lambda: served.job() is None, SLACK, "the check job removed")
            probes = sandbox.count(PROBE, pair.api_key)
            others = sandbox.count(PROBE, kept.api_key)
            wait_until(
                lambda: sandbox.count(PROBE, kept.api_key) >= others + 2,
                2 * INTERVAL + SLACK,
                "two more checks of another key",
            )
            assert sandbox.count(PROBE, pair.api_key) == probes
        (alert,) = receiver.status_changes()
        assert (alert["old_status"], alert["new_status"]) == ("active", "revoked")
        assert (alert["api_key"], alert["verdict"]) == (pair.api_key, "REJECTED(key_rejected)")


# -- keys come and go without a restart ---------------------------------------------------


class TestKeySync:
    def test_a_pending_key_becomes_active_once_registered(
        self,
        make_settings: Callable[..., Settings],
        vault: Vault,
        sandbox: SandboxAdmin,
        dev_vault: DevVault,
    ) -> None:
        """A generated key stays pending while Backpack refuses it and turns active after."""
        pair = store_key(
            vault, REF, status=Status.PENDING, origin=Origin.GENERATED, exchange=sandbox.url
        )
        with running(make_settings()) as served:
            wait_until(
                lambda: served.verdicts()["REJECTED(key_rejected)"] >= 1,
                2 * INTERVAL + SLACK,
                "a refused check",
            )
            assert vault.read_record(REF).status is Status.PENDING
            assert served.post(REF, "copy", dev_vault.root_token).status_code == 409

            sandbox.register(pair.api_key)
            wait_until(
                lambda: vault.read_record(REF).status is Status.ACTIVE,
                INTERVAL + SLACK,
                "active in Vault",
            )
            assert served.job() is not None  # an active key stays on the schedule
            assert served.post(REF, "copy", dev_vault.root_token).status_code == 200

    def test_a_key_added_after_start_is_checked(
        self, make_settings: Callable[..., Settings], vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """The leader finds a key stored while it runs and schedules its check."""
        with running(make_settings()) as served:
            wait_until(lambda: served.daemon.leader, LEASE_TTL, "leadership")
            assert served.job() is None
            pair = store_key(vault, REF, exchange=sandbox.url)
            sandbox.register(pair.api_key)
            wait_until(lambda: served.job() is not None, KEY_SYNC + SLACK, "a check job")
            wait_until(
                lambda: served.verdicts()["VALID"] >= 1, 2 * INTERVAL + SLACK, "a VALID check"
            )
            assert sandbox.count(PROBE, pair.api_key) >= 1

    def test_retired_and_deleted_keys_stop_being_checked(
        self, make_settings: Callable[..., Settings], vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """A key retired or deleted in Vault gets no more probes; the others carry on."""
        refs = {name: KeyRef("main", name) for name in ("retired", "deleted", "kept")}
        pairs = {name: store_key(vault, ref, exchange=sandbox.url) for name, ref in refs.items()}
        for pair in pairs.values():
            sandbox.register(pair.api_key)

        def probes(name: str) -> int:
            return sandbox.count(PROBE, pairs[name].api_key)

        with running(make_settings()) as served:
            wait_until(
                lambda: all(probes(name) >= 1 for name in refs), 2 * INTERVAL + SLACK, "checks"
            )
            assert 'backpack_vault_key_status{key="main/deleted",status="active"} 1.0' in (
                served.metrics()
            )
            vault.set_status(refs["retired"], Status.RETIRED, now=NOW)  # `keys retire`
            vault.delete_key(refs["deleted"])  # `keys delete`
            wait_until(
                lambda: served.job(refs["retired"]) is None and served.job(refs["deleted"]) is None,
                KEY_SYNC + INTERVAL + SLACK,
                "both keys unscheduled",
            )
            stopped = {name: probes(name) for name in ("retired", "deleted")}
            kept = probes("kept")
            wait_until(lambda: probes("kept") >= kept + 2, 3 * INTERVAL + SLACK, "more checks")
            assert {name: probes(name) for name in stopped} == stopped
            assert served.job(refs["kept"]) is not None
            wait_until(
                lambda: 'backpack_vault_key_status{key="main/deleted"' not in served.metrics(),
                KEY_SYNC + SLACK,
                "the deleted key's status series dropped",
            )


# -- a worker's report --------------------------------------------------------------------


class TestReports:
    def test_a_worker_report_checks_the_key_at_once(
        self,
        make_settings: Callable[..., Settings],
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
    ) -> None:
        """With checks five minutes apart, a report revokes a rejected key within seconds."""
        pair = store_key(vault, REF, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        worker = worker_token(vault, vault_settings)
        with running(make_settings(interval=300)) as served:
            wait_until(lambda: served.job() is not None, LEASE_TTL + SLACK, "a check job")
            sandbox.revoke(pair.api_key)
            answer = served.post(REF, "report", worker, {"reason": "401 UNAUTHORIZED"})
            assert answer.status_code == 202
            wait_until(
                lambda: vault.read_record(REF).status is Status.REVOKED, SLACK, "revoked in Vault"
            )
            assert served.post(REF, "copy", worker).status_code == 409
            assert served.verdicts()["REJECTED(key_rejected)"] == 1

    def test_a_report_does_not_wait_behind_busy_check_threads(
        self,
        make_settings: Callable[..., Settings],
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
    ) -> None:
        """Even with every check thread taken (a backlog, a slow exchange), a report is acted on."""
        pair = store_key(vault, REF, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        worker = worker_token(vault, vault_settings)
        settings = make_settings(interval=300)
        release = threading.Event()
        with running(settings) as served:
            try:
                for i in range(settings.checks.concurrency):
                    served.daemon.scheduler.run_soon(
                        release.wait, job_id=f"busy-{i}", args=(30,), executor="checks"
                    )
                sandbox.revoke(pair.api_key)
                assert served.post(REF, "report", worker, {"reason": "401"}).status_code == 202
                wait_until(
                    lambda: vault.read_record(REF).status is Status.REVOKED,
                    SLACK,
                    "revoked in Vault",
                )
            finally:
                release.set()


# -- exchange faults ----------------------------------------------------------------------

FAULTS: list[tuple[str, dict[str, object], str]] = [
    ("503", {"status": 503}, "UNKNOWN(maintenance)"),
    ("429", {"status": 429}, "UNKNOWN(rate_limited)"),
    ("500", {"status": 500}, "UNKNOWN(server_error)"),
    ("maintenance", {"maintenance": True}, "UNKNOWN(maintenance)"),
    ("latency-past-timeout", {"latency_ms": 1200}, "UNKNOWN(network)"),
]


def grown(served: Running, refs: list[KeyRef], label: str, by: int = 1) -> Callable[[], bool]:
    """A condition: every key has ``by`` more checks labelled ``label`` than now."""
    seen = {ref: served.verdicts(ref)[label] for ref in refs}
    return lambda: all(served.verdicts(ref)[label] >= seen[ref] + by for ref in refs)


class TestFaults:
    def test_faults_never_revoke_and_checks_recover(
        self,
        make_settings: Callable[..., Settings],
        vault: Vault,
        sandbox: SandboxAdmin,
        webhook: tuple[Receiver, str],
    ) -> None:
        """Each fault, every request hit, for several intervals: UNKNOWN, never revoked."""
        receiver, hook_url = webhook
        refs = [KeyRef("main", "bot-a"), KeyRef("scalper", "bot-b")]
        for ref in refs:
            sandbox.register(store_key(vault, ref, exchange=sandbox.url).api_key)
        settings = make_settings(webhook_url=hook_url, exchange_timeout=0.3)
        with running(settings) as served:
            for fault_id, faults, label in FAULTS:
                sandbox.set_faults(**faults, rate=1.0)
                wait_until(
                    grown(served, refs, label, by=2),
                    3 * INTERVAL + SLACK,
                    f"{label} under fault {fault_id}",
                )
            sandbox.clear_faults()
            wait_until(grown(served, refs, "VALID"), 2 * INTERVAL + SLACK, "VALID after faults")
            assert [vault.read_record(ref).status for ref in refs] == [Status.ACTIVE] * 2
            for ref in refs:
                assert not any(label.startswith("REJECTED") for label in served.verdicts(ref))
        assert receiver.received == []


# -- several replicas ---------------------------------------------------------------------


class TestLeadership:
    def test_one_replica_checks_and_another_takes_over_after_a_crash(
        self,
        make_settings: Callable[..., Settings],
        vault: Vault,
        sandbox: SandboxAdmin,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """One leader; each key about once per interval; a crashed leader is replaced."""
        pair = store_key(vault, REF, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        settings = make_settings()

        def probes() -> int:
            return sandbox.count(PROBE, pair.api_key)

        with running(settings) as first, running(settings) as second:
            replicas = [first, second]
            wait_until(lambda: first.daemon.leader or second.daemon.leader, LEASE_TTL, "a leader")
            wait_until(lambda: probes() >= 1, 2 * INTERVAL + SLACK, "a first check")
            leader, follower = replicas if first.daemon.leader else replicas[::-1]
            assert not follower.daemon.leader
            assert (leader.leader_gauge(), follower.leader_gauge()) == (1.0, 0.0)

            before, started = probes(), time.monotonic()
            wait_until(lambda: probes() >= before + 4, 4 * INTERVAL + SLACK, "four more checks")
            # About one probe per interval: four more take about three intervals with one
            # replica checking, about one and a half with two.
            assert time.monotonic() - started >= 2.5 * INTERVAL
            # Every probe Backpack saw is one of the leader's checks; the follower made none.
            wait_until(
                lambda: leader.verdicts()["VALID"] == probes(), INTERVAL, "checks match probes"
            )
            assert follower.verdicts() == Counter()
            assert follower.job() is None

            crash(leader.daemon, monkeypatch)
            lease, _ = vault.read_document("leader") or ({}, 0)
            assert lease["holder"] == leader.daemon.lease.holder  # not released: it must expire
            assert lease["expires_at"] > time.time()
            wait_until(lambda: follower.daemon.leader, 2 * LEASE_TTL, "a takeover")
            assert follower.leader_gauge() == 1.0
            after = probes()
            wait_until(lambda: probes() >= after + 2, 3 * INTERVAL + SLACK, "checks carry on")
            assert follower.verdicts()["VALID"] >= 2
            assert vault.read_record(REF).status is Status.ACTIVE

    def test_a_replica_that_loses_the_lease_while_listing_keys_schedules_none(
        self,
        make_settings: Callable[..., Settings],
        vault: Vault,
        sandbox: SandboxAdmin,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Listing many keys takes time; a lease lost meanwhile leaves no check jobs behind."""
        store_key(vault, REF, exchange=sandbox.url)
        clock = FakeClock(time.time())
        daemon = Daemon(make_settings(), clock=clock)  # jobs driven by hand: not started
        rival = Lease(vault, "rival", ttl_s=LEASE_TTL, clock=clock)
        listing = daemon.vault.list_refs

        def list_while_the_lease_expires() -> list[KeyRef]:
            records = listing()
            clock.now += LEASE_TTL + 1  # a long listing: our lease runs out
            assert rival.acquire_or_renew()
            daemon.hold_lease()  # the renewal job runs meanwhile and finds the lease taken
            return records

        try:
            daemon.login()
            daemon.hold_lease()
            assert daemon.leader
            monkeypatch.setattr(daemon.vault, "list_refs", list_while_the_lease_expires)
            daemon.sync_keys()
            assert not daemon.leader
            assert daemon.scheduler.get_job(f"check:{REF}") is None
        finally:
            daemon.stop()


# -- Vault is written only on a status change ---------------------------------------------


class TestVaultWrites:
    def test_checks_without_a_status_change_leave_vault_untouched(
        self,
        make_settings: Callable[..., Settings],
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
    ) -> None:
        """Several VALID checks of an active key, and refusals of a pending one, write nothing."""
        active, pending = REF, KeyRef("main", "not-yet")
        sandbox.register(store_key(vault, active, exchange=sandbox.url).api_key)
        store_key(
            vault, pending, status=Status.PENDING, origin=Origin.GENERATED, exchange=sandbox.url
        )
        with running(make_settings()) as served:
            wait_until(
                lambda: (
                    served.verdicts(active)["VALID"] >= 1
                    and served.verdicts(pending)["REJECTED(key_rejected)"] >= 1
                ),
                2 * INTERVAL + SLACK,
                "first checks",
            )
            before = {ref: kv_metadata(vault_settings, ref) for ref in (active, pending)}
            valid = served.verdicts(active)["VALID"]
            wait_until(
                lambda: served.verdicts(active)["VALID"] >= valid + 3,
                4 * INTERVAL + SLACK,
                "three more checks",
            )
            after = {ref: kv_metadata(vault_settings, ref) for ref in (active, pending)}
        assert after == before  # updated_time, current_version, versions, custom_metadata


# -- no secret leaves Vault -----------------------------------------------------------------


def leak_forms(secret: str) -> list[str]:
    """The secret as stored, and its seed in the encodings a leak could take."""
    seed = base64.b64decode(secret)
    return [secret, seed.hex(), base64.urlsafe_b64encode(seed).decode().rstrip("=")]


class TestCanary:
    def test_a_canary_goes_through_checks_revocation_and_alerts_unseen(
        self,
        make_settings: Callable[..., Settings],
        vault: Vault,
        sandbox: SandboxAdmin,
        webhook: tuple[Receiver, str],
        dev_vault: DevVault,
    ) -> None:
        """Logs, alerts and metrics of a checked and revoked key never hold its secret."""
        receiver, hook_url = webhook
        logs = io.StringIO()
        configure("json", "debug", stream=logs)
        canary = generate_pair()
        store_key(vault, REF, pair=canary, exchange=sandbox.url)
        sandbox.register(canary.api_key)
        with running(make_settings(webhook_url=hook_url)) as served:
            wait_until(lambda: served.verdicts()["VALID"] >= 1, 2 * INTERVAL + SLACK, "a check")
            wrap_token = served.post(REF, "copy", dev_vault.root_token).json()["wrap_token"]
            sandbox.revoke(canary.api_key)
            wait_until(lambda: receiver.status_changes() != [], INTERVAL + SLACK, "the alert")
            metrics = served.metrics()
        text = logs.getvalue()
        assert '"key.status_changed"' in text  # the scenario really ran
        assert "check.verdict" in text
        assert 'backpack_vault_key_status{key="main/bot-a",status="revoked"} 1.0' in metrics
        haystacks = {
            "logs": text,
            "alerts": b"\n".join(receiver.raw).decode(),
            "metrics": metrics,
        }
        needles = {f"secret-{i}": form for i, form in enumerate(leak_forms(canary.secret.reveal()))}
        needles |= {"wrap-token": wrap_token, "root-token": dev_vault.root_token.reveal()}
        leaks = [
            f"{needle} in {where}"
            for where, haystack in haystacks.items()
            for needle, value in needles.items()
            if value in haystack
        ]
        assert leaks == []
