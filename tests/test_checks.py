"""Liveness checks: the verdict table, the checker against real Vault and the sandbox,
the fault matrix, the request budget and the webhook (the leader lease: test_daemon.py)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import structlog
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from backpack_vault.alerts import Webhook
from backpack_vault.backpack.rest import Exchange
from backpack_vault.backpack.signing import Signer
from backpack_vault.checks import Checker, RequestBudget
from backpack_vault.cli import cli
from backpack_vault.config import Secret, VaultSettings
from backpack_vault.core.keys import KeyPair, KeyRecord, KeyRef, Origin, Status, generate_pair
from backpack_vault.core.verdicts import (
    VERDICT_TABLE,
    CheckResult,
    ProbeResponse,
    Verdict,
    classify,
)
from backpack_vault.daemon.serving import ServerThread, free_port
from backpack_vault.errors import ExchangeUnavailable
from backpack_vault.events import Cause, Event, KeyStatusChanged
from backpack_vault.testing import FakeClock, store_key
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.vault.client import Vault

# -- helpers ---------------------------------------------------------------------------------


def metadata(settings: VaultSettings, ref: KeyRef) -> dict[str, Any]:
    """The raw KV metadata (updated_time, versions) as Vault reports it."""
    token = settings.token.reveal() if settings.token else ""
    url = f"{settings.addr}/v1/{settings.kv_mount}/metadata/{settings.kv_prefix}/{ref}"
    body: dict[str, Any] = httpx.get(url, headers={"X-Vault-Token": token}).json()["data"]
    return body


@dataclass
class Changes:
    """Records the status changes a checker emits."""

    seen: list[tuple[Status | None, Status, str]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, KeyStatusChanged):
            label = event.result.label if event.result else ""
            self.seen.append((event.old, event.new, label))


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client() as client:
        yield client


@pytest.fixture
def exchange(http: httpx.Client, sandbox: SandboxAdmin) -> Exchange:
    return Exchange(http, sandbox.url, timeout_s=2.0)


@pytest.fixture
def changes() -> Changes:
    return Changes()


@pytest.fixture
def checker(vault: Vault, exchange: Exchange, changes: Changes) -> Checker:
    return Checker(vault, exchange, emit=changes, confirm_delay_s=0)


@pytest.fixture
def registered(vault: Vault, sandbox: SandboxAdmin) -> tuple[KeyRef, KeyPair]:
    """An active key stored in Vault and registered at the sandbox."""
    ref, pair = KeyRef("main", "bot-a"), generate_pair()
    store_key(vault, ref, pair=pair, exchange=sandbox.url)
    sandbox.register(pair.api_key)
    return ref, pair


PROBE = "GET /api/v1/account"


# -- the table -------------------------------------------------------------------------------


def _r(status: int | None, code: str = "", message: str = "", *, obj: bool = True) -> ProbeResponse:
    if status is None:
        return ProbeResponse(None, network_error="ConnectError")
    return ProbeResponse(status, code=code, message=message, is_object=obj)


TABLE_CASES = [
    ("row1-ok", _r(200), 1, Verdict.VALID, "accepted"),
    ("row2-429", _r(429, "TOO_MANY_REQUESTS"), 2, Verdict.UNKNOWN, "rate_limited"),
    ("row2-code-only", _r(400, "TOO_MANY_REQUESTS"), 2, Verdict.UNKNOWN, "rate_limited"),
    ("row3-503", _r(503, "", "<html>", obj=False), 3, Verdict.UNKNOWN, "maintenance"),
    ("row3-code-only", _r(400, "MAINTENANCE"), 3, Verdict.UNKNOWN, "maintenance"),
    ("row4-500", _r(500, "SERVER_ERROR"), 4, Verdict.UNKNOWN, "server_error"),
    ("row4-502-html", _r(502, "", "Bad gateway", obj=False), 4, Verdict.UNKNOWN, "server_error"),
    ("row4-timeout-code", _r(408, "TIMEOUT"), 4, Verdict.UNKNOWN, "server_error"),
    (
        "row5-expired-json",
        _r(400, "INVALID_CLIENT_REQUEST", "Request has expired"),
        5,
        Verdict.UNKNOWN,
        "clock",
    ),
    (
        "row5-expired-text",
        _r(401, "", "Request has EXPIRED", obj=False),
        5,
        Verdict.UNKNOWN,
        "clock",
    ),
    (
        "row6-invalid-signature",
        _r(400, "INVALID_CLIENT_REQUEST", "Invalid signature"),
        6,
        Verdict.REJECTED,
        "signature_rejected",
    ),
    (
        "row6-invalid-header",
        _r(401, "INVALID_CLIENT_REQUEST", "Invalid X-Signature header"),
        6,
        Verdict.REJECTED,
        "signature_rejected",
    ),
    ("row7-unauthorized", _r(401, "UNAUTHORIZED"), 7, Verdict.REJECTED, "key_rejected"),
    ("row7-forbidden", _r(403, "FORBIDDEN"), 7, Verdict.REJECTED, "key_rejected"),
    ("row7-invalid-sig-code", _r(400, "INVALID_SIGNATURE"), 7, Verdict.REJECTED, "key_rejected"),
    (
        "row8-deactivated",
        _r(403, "ACCOUNT_DEACTIVATED"),
        8,
        Verdict.REJECTED,
        "account_deactivated",
    ),
    ("row9-401-no-code", _r(401, "", "", obj=False), 9, Verdict.REJECTED, "key_rejected"),
    ("row9-403-other-code", _r(403, "PRECONDITION_FAILED"), 9, Verdict.REJECTED, "key_rejected"),
    ("row10-400-other", _r(400, "INVALID_ORDER"), 10, Verdict.UNKNOWN, "unexpected_response"),
    ("row10-404", _r(404, "RESOURCE_NOT_FOUND"), 10, Verdict.UNKNOWN, "unexpected_response"),
    ("row10-200-array", _r(200, obj=False), 10, Verdict.UNKNOWN, "unexpected_response"),
    ("row10-302", _r(302, obj=False), 10, Verdict.UNKNOWN, "unexpected_response"),
    ("row11-network", _r(None), 11, Verdict.UNKNOWN, "network"),
]


class TestVerdictTable:
    @pytest.mark.parametrize(
        ("response", "row", "verdict", "reason"),
        [case[1:] for case in TABLE_CASES],
        ids=[case[0] for case in TABLE_CASES],
    )
    def test_each_answer_maps_to_its_row(
        self, response: ProbeResponse, row: int, verdict: Verdict, reason: str
    ) -> None:
        """The first matching row decides the verdict and reason."""
        rule = classify(response)
        assert (rule.row, rule.verdict, rule.reason) == (row, verdict, reason)

    def test_rows_are_spec_rows_in_order(self) -> None:
        """The table holds docs/backpack-api.md section 8's eleven rows, in order."""
        assert [rule.row for rule in VERDICT_TABLE] == list(range(1, 12))

    def test_only_row_5_resyncs_and_only_row_10_alerts(self) -> None:
        """An expired answer triggers a resync; an unexpected answer triggers an alert."""
        assert [r.row for r in VERDICT_TABLE if r.resync] == [5]
        assert [r.row for r in VERDICT_TABLE if r.alert] == [10]

    @given(
        status=st.one_of(st.none(), st.integers(100, 599)),
        code=st.sampled_from(["", "UNAUTHORIZED", "SERVER_ERROR", "INVALID_CLIENT_REQUEST", "X"]),
        message=st.text(max_size=30),
        obj=st.booleans(),
    )
    def test_every_answer_has_a_row(
        self, status: int | None, code: str, message: str, obj: bool
    ) -> None:
        """Whatever comes back, exactly one verdict results; 5xx and no-answer never reject."""
        rule = classify(_r(status, code, message, obj=obj))
        if status is None or status >= 500:
            assert rule.verdict is Verdict.UNKNOWN


# -- the exchange client ----------------------------------------------------------------------


def _fake_backpack(response: httpx.Response) -> Exchange:
    """An Exchange whose every request gets ``response`` (httpx's MockTransport)."""
    transport = httpx.MockTransport(lambda _request: response)
    return Exchange(httpx.Client(transport=transport), "https://backpack.test")


class TestExchange:
    @pytest.mark.parametrize("offset_ms", [10_000, -10_000], ids=["ahead", "behind"])
    def test_the_offset_follows_the_servers_clock(
        self, exchange: Exchange, sandbox: SandboxAdmin, offset_ms: int
    ) -> None:
        """measure_offset finds a server clock 10 s off; now_ms then follows the server."""
        sandbox.set_faults(clock_offset_ms=offset_ms)
        measured = exchange.measure_offset()
        assert abs(measured - offset_ms) < 1000
        assert exchange.offset_ms == measured

    def test_an_unreadable_time_raises_exchange_unavailable(
        self, exchange: Exchange, sandbox: SandboxAdmin
    ) -> None:
        """measure_offset raises our error, not httpx's, and keeps the old offset."""
        sandbox.set_faults(status=500)
        with pytest.raises(ExchangeUnavailable, match="500 SERVER_ERROR"):
            exchange.measure_offset()
        assert exchange.offset_ms == 0

    def test_a_refused_connection_is_a_network_failure(self, http: httpx.Client) -> None:
        """No HTTP answer becomes a record marked network failure, never an exception."""
        exchange = Exchange(http, f"http://127.0.0.1:{free_port()}", timeout_s=1)
        signer = Signer(*_pair_strings(generate_pair()))
        answer = exchange.probe(signer)
        assert (answer.status, answer.network_error) == (None, "ConnectError")
        assert answer.describe() == "no answer (ConnectError)"
        assert not exchange.status().ok
        assert not exchange.sync_clock().ok

    def test_a_plain_text_error_is_its_own_message(self) -> None:
        """Old-style plain-text errors keep their text; Retry-After is read when present."""
        exchange = _fake_backpack(
            httpx.Response(429, text="Too many requests\n", headers={"Retry-After": "3"})
        )
        answer = exchange.probe(Signer(*_pair_strings(generate_pair())))
        assert (answer.status, answer.code, answer.message) == (429, "", "Too many requests")
        assert (answer.is_object, answer.retry_after_s) == (False, 3.0)

    def test_status_reads_maintenance(self) -> None:
        """A 200 status saying Maintenance is not ok and says why."""
        exchange = _fake_backpack(
            httpx.Response(200, json={"status": "Maintenance", "message": "upgrade"})
        )
        status = exchange.status()
        assert (status.ok, status.maintenance, status.message) == (False, True, "upgrade")

    def test_an_answer_keeps_no_header_or_body(
        self, exchange: Exchange, sandbox: SandboxAdmin
    ) -> None:
        """What a probe returns holds status, code and message only: no signature, no body."""
        pair = generate_pair()
        sandbox.register(pair.api_key)
        answer = exchange.probe(Signer(*_pair_strings(pair)))
        assert answer.status == 200
        assert answer.is_object
        assert (answer.code, answer.message) == ("", "")
        assert "leverageLimit" not in repr(answer)


def _pair_strings(pair: KeyPair) -> tuple[str, Secret]:
    return pair.api_key, pair.secret


# -- the checker, against real Vault and the sandbox -------------------------------------------


class TestChecker:
    def test_an_accepted_key_is_valid_and_vault_is_not_written(
        self,
        checker: Checker,
        registered: tuple[KeyRef, KeyPair],
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        changes: Changes,
    ) -> None:
        """An active key Backpack accepts is VALID after one probe; Vault stays untouched."""
        ref, pair = registered
        before = metadata(vault_settings, ref)
        result = checker.check(ref)
        assert (result.verdict, result.probes, result.changed) == (Verdict.VALID, 1, False)
        assert metadata(vault_settings, ref) == before  # updated_time and versions included
        assert changes.seen == []
        assert sandbox.count(PROBE, pair.api_key) == 1

    def test_a_revoked_key_is_revoked_only_after_a_second_probe(
        self,
        checker: Checker,
        registered: tuple[KeyRef, KeyPair],
        vault: Vault,
        sandbox: SandboxAdmin,
        changes: Changes,
    ) -> None:
        """A key revoked in Backpack is REJECTED twice, then revoked in Vault, once."""
        ref, pair = registered
        sandbox.revoke(pair.api_key)
        result = checker.check(ref)
        assert (result.verdict, result.reason, result.row) == (Verdict.REJECTED, "key_rejected", 7)
        assert (result.probes, result.http_status, result.code) == (2, 401, "UNAUTHORIZED")
        assert sandbox.count(PROBE, pair.api_key) == 2
        stored = vault.read_record(ref)
        assert (stored.status, stored.last_verdict) == (Status.REVOKED, "REJECTED(key_rejected)")
        assert changes.seen == [(Status.ACTIVE, Status.REVOKED, "REJECTED(key_rejected)")]

    def test_a_rejection_the_second_probe_does_not_repeat_is_unknown(
        self,
        vault: Vault,
        exchange: Exchange,
        registered: tuple[KeyRef, KeyPair],
        sandbox: SandboxAdmin,
    ) -> None:
        """If Backpack accepts the key again on the confirming probe, nothing is revoked."""
        ref, pair = registered
        sandbox.revoke(pair.api_key)
        checker = Checker(
            vault, exchange, confirm_delay_s=1, sleep=lambda _s: sandbox.register(pair.api_key)
        )
        result = checker.check(ref)
        assert (result.verdict, result.reason) == (Verdict.UNKNOWN, "unconfirmed_rejection")
        assert vault.read_record(ref).status is Status.ACTIVE

    def test_a_pending_key_becomes_active_once_registered(
        self,
        checker: Checker,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        changes: Changes,
    ) -> None:
        """A generated key stays pending while Backpack refuses it, then turns active."""
        ref, pair = KeyRef("main", "fresh"), generate_pair()
        store_key(
            vault,
            ref,
            pair=pair,
            status=Status.PENDING,
            origin=Origin.GENERATED,
            exchange=sandbox.url,
        )
        before = metadata(vault_settings, ref)
        refused = checker.check(ref)
        assert (refused.verdict, refused.changed) == (Verdict.REJECTED, False)
        assert metadata(vault_settings, ref) == before
        sandbox.register(pair.api_key)
        accepted = checker.check(ref)
        assert (accepted.verdict, accepted.new_status) == (Verdict.VALID, Status.ACTIVE)
        assert vault.read_record(ref).status is Status.ACTIVE
        assert changes.seen == [(Status.PENDING, Status.ACTIVE, "VALID")]

    @pytest.mark.parametrize("status", [Status.REVOKED, Status.RETIRED], ids=["revoked", "retired"])
    def test_final_keys_are_not_probed(
        self,
        checker: Checker,
        registered: tuple[KeyRef, KeyPair],
        vault: Vault,
        sandbox: SandboxAdmin,
        status: Status,
    ) -> None:
        """Revoked and retired keys are never sent to Backpack."""
        ref, _ = registered
        vault.set_status(ref, status, now="2025-01-02T00:00:00+00:00")
        result = checker.check(ref)
        assert (result.verdict, result.reason, result.old_status) == (
            Verdict.UNKNOWN,
            "not_probed",
            status,
        )
        assert sandbox.stats()["total"] == 0

    def test_a_secret_that_does_not_derive_the_key_is_misconfigured(
        self, checker: Checker, vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """A stored secret of another key is MISCONFIGURED, found without any request."""
        ref, pair, other = KeyRef("main", "mixed-up"), generate_pair(), generate_pair()
        store_key(vault, ref, pair=KeyPair(pair.api_key, other.secret), exchange=sandbox.url)
        sandbox.register(pair.api_key)
        result = checker.check(ref)
        assert (result.verdict, result.reason, result.alert) == (
            Verdict.MISCONFIGURED,
            "secret_mismatch",
            True,
        )
        assert sandbox.stats()["total"] == 0
        assert vault.read_record(ref).status is Status.ACTIVE

    def test_maintenance_signs_nothing(
        self, checker: Checker, registered: tuple[KeyRef, KeyPair], sandbox: SandboxAdmin
    ) -> None:
        """When /status says Maintenance no signed request is sent."""
        ref, _ = registered
        sandbox.set_faults(maintenance=True)
        result = checker.check(ref)
        assert (result.verdict, result.reason, result.probes) == (
            Verdict.UNKNOWN,
            "maintenance",
            0,
        )
        assert sandbox.count(PROBE) == 0

    def test_an_expired_answer_resyncs_and_retries_once(
        self, checker: Checker, registered: tuple[KeyRef, KeyPair], sandbox: SandboxAdmin
    ) -> None:
        """When /time lies, "expired" is retried once after a resync, then UNKNOWN(clock)."""
        ref, pair = registered
        sandbox.set_faults(time_skew_ms=30_000)
        result = checker.check(ref)
        assert (result.verdict, result.reason, result.row, result.probes) == (
            Verdict.UNKNOWN,
            "clock",
            5,
            2,
        )
        assert sandbox.count("GET /api/v1/time") == 2
        assert sandbox.count(PROBE, pair.api_key) == 2

    def test_a_check_already_running_for_a_key_is_not_doubled(
        self,
        vault: Vault,
        exchange: Exchange,
        registered: tuple[KeyRef, KeyPair],
        sandbox: SandboxAdmin,
    ) -> None:
        """A second check of a key whose check is in progress returns at once."""
        ref, pair = registered
        sandbox.revoke(pair.api_key)
        inner: list[CheckResult] = []
        checker: Checker
        checker = Checker(
            vault, exchange, confirm_delay_s=1, sleep=lambda _s: inner.append(checker.check(ref))
        )
        checker.check(ref)
        assert [(r.verdict, r.reason, r.probes) for r in inner] == [
            (Verdict.UNKNOWN, "already_running", 0)
        ]

    def test_a_failing_cascade_does_not_undo_the_revocation(
        self,
        vault: Vault,
        exchange: Exchange,
        registered: tuple[KeyRef, KeyPair],
        sandbox: SandboxAdmin,
    ) -> None:
        """An emit that raises is logged; the status change stands."""
        ref, pair = registered
        sandbox.revoke(pair.api_key)

        def explode(_event: Event) -> None:
            raise RuntimeError("webhook down")

        checker = Checker(vault, exchange, emit=explode, confirm_delay_s=0)
        with structlog.testing.capture_logs() as logs:
            result = checker.check(ref)
        assert result.new_status is Status.REVOKED
        assert vault.read_record(ref).status is Status.REVOKED
        assert {
            "event": "check.on_change_failed",
            "key": str(ref),
            "error": "RuntimeError",
            "log_level": "error",
        } in logs

    def test_logs_carry_no_secret_and_no_signature(
        self, checker: Checker, registered: tuple[KeyRef, KeyPair], sandbox: SandboxAdmin
    ) -> None:
        """Checks log verdicts, never the secret or the signed headers."""
        ref, pair = registered
        with structlog.testing.capture_logs() as logs:
            checker.check(ref)
            sandbox.revoke(pair.api_key)
            checker.check(ref)
        text = repr(logs)
        assert "check.verdict" in text
        assert pair.secret.reveal() not in text
        assert "X-Signature" not in text
        assert "signature=" not in text.lower()


@pytest.fixture
def keys(vault: Vault, sandbox: SandboxAdmin) -> list[tuple[KeyRef, KeyPair]]:
    """Three active keys, stored in Vault and registered at the sandbox."""
    made = []
    for i in range(3):
        ref, pair = KeyRef("main", f"bot-{i}"), generate_pair()
        store_key(vault, ref, pair=pair, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        made.append((ref, pair))
    return made


class TestSweep:
    def test_all_keys_rejected_is_systemic_and_revokes_nothing(
        self,
        checker: Checker,
        keys: list[tuple[KeyRef, KeyPair]],
        vault: Vault,
        sandbox: SandboxAdmin,
        changes: Changes,
    ) -> None:
        """Three keys all rejected at once look like a Backpack change: UNKNOWN(systemic),
        and the first of them alone alerts."""
        for _, pair in keys:
            sandbox.revoke(pair.api_key)
        results = checker.check_many([ref for ref, _ in keys], concurrency=3)
        assert {(r.verdict, r.reason) for r in results} == {(Verdict.UNKNOWN, "systemic")}
        assert [r.alert for r in results] == [True, False, False]
        assert {vault.read_record(ref).status for ref, _ in keys} == {Status.ACTIVE}
        assert changes.seen == []

    def test_some_keys_rejected_are_revoked(
        self,
        checker: Checker,
        keys: list[tuple[KeyRef, KeyPair]],
        vault: Vault,
        sandbox: SandboxAdmin,
    ) -> None:
        """When other keys are still accepted, the rejected ones are revoked."""
        for _, pair in keys[:2]:
            sandbox.revoke(pair.api_key)
        results = checker.check_many([ref for ref, _ in keys], concurrency=3)
        assert [r.verdict for r in results] == [Verdict.REJECTED, Verdict.REJECTED, Verdict.VALID]
        assert [vault.read_record(ref).status for ref, _ in keys] == [
            Status.REVOKED,
            Status.REVOKED,
            Status.ACTIVE,
        ]

    def test_below_the_threshold_rejections_are_revoked(
        self,
        checker: Checker,
        keys: list[tuple[KeyRef, KeyPair]],
        sandbox: SandboxAdmin,
    ) -> None:
        """Two keys rejected while a third (outside the sweep) is accepted: both revoked."""
        for _, pair in keys[:2]:
            sandbox.revoke(pair.api_key)
        results = checker.check_many([ref for ref, _ in keys[:2]])
        assert {r.new_status for r in results} == {Status.REVOKED}

    def test_a_key_deleted_mid_sweep_is_skipped(
        self, checker: Checker, keys: list[tuple[KeyRef, KeyPair]]
    ) -> None:
        """A key that no longer exists drops out of the sweep."""
        results = checker.check_many([keys[0][0], KeyRef("main", "gone")])
        assert [r.ref for r in results] == [keys[0][0]]


class TestSingleCheckGuard:
    """The daemon checks one key at a time; a rejection is cross-checked on another key."""

    def test_a_rejection_is_revoked_when_another_key_is_still_accepted(
        self,
        checker: Checker,
        keys: list[tuple[KeyRef, KeyPair]],
        vault: Vault,
        sandbox: SandboxAdmin,
    ) -> None:
        """The control key passes, so the rejection is the key's own: it is revoked."""
        for ref, _ in keys:
            assert checker.check(ref).verdict is Verdict.VALID
        sandbox.revoke(keys[0][1].api_key)
        before = sandbox.count(PROBE, keys[2][1].api_key)
        result = checker.check(keys[0][0])
        assert (result.verdict, result.new_status) == (Verdict.REJECTED, Status.REVOKED)
        assert sandbox.count(PROBE, keys[2][1].api_key) == before + 1  # the latest accepted
        assert vault.read_record(keys[1][0]).status is Status.ACTIVE

    def test_when_backpack_rejects_every_key_nothing_is_revoked(
        self,
        checker: Checker,
        keys: list[tuple[KeyRef, KeyPair]],
        vault: Vault,
        sandbox: SandboxAdmin,
        changes: Changes,
    ) -> None:
        """A Backpack-side change (every key refused) is UNKNOWN(systemic), one alert."""
        for ref, _ in keys:
            checker.check(ref)
        for _, pair in keys:
            sandbox.revoke(pair.api_key)
        results = [checker.check(ref) for ref, _ in keys]
        assert {(r.verdict, r.reason) for r in results} == {(Verdict.UNKNOWN, "systemic")}
        assert [r.alert for r in results] == [True, False, False]
        assert checker.outage_since == results[0].checked_at
        assert {vault.read_record(ref).status for ref, _ in keys} == {Status.ACTIVE}
        assert changes.seen == []

    def test_a_lone_key_is_revoked_on_its_own_confirmed_rejection(
        self, checker: Checker, keys: list[tuple[KeyRef, KeyPair]], sandbox: SandboxAdmin
    ) -> None:
        """With no other key accepted lately, active keys in Vault are the controls."""
        sandbox.revoke(keys[0][1].api_key)
        result = checker.check(keys[0][0])
        assert result.new_status is Status.REVOKED


STATUS, TIME = "GET /api/v1/status", "GET /api/v1/time"


class TestSharedMeasurement:
    """The exchange's status and clock offset are measured once for many checks."""

    def test_a_sweep_asks_for_status_and_time_once(
        self, checker: Checker, vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """Four keys checked in a row: one /status, one /time, then one probe per key."""
        refs = []
        for i in range(4):
            ref, pair = KeyRef(f"sub-{i % 2}", f"bot-{i}"), generate_pair()
            store_key(vault, ref, pair=pair, exchange=sandbox.url)
            sandbox.register(pair.api_key)
            refs.append(ref)
        results = checker.check_many(refs)
        assert {r.label for r in results} == {"VALID"}
        assert (sandbox.count(STATUS), sandbox.count(TIME), sandbox.count(PROBE)) == (1, 1, 4)

    def test_a_confirming_probe_measures_the_clock_again(
        self, checker: Checker, registered: tuple[KeyRef, KeyPair], sandbox: SandboxAdmin
    ) -> None:
        """A rejection is confirmed with a freshly measured offset, never a reused one."""
        ref, pair = registered
        assert checker.check(ref).verdict is Verdict.VALID
        sandbox.revoke(pair.api_key)
        assert checker.check(ref).new_status is Status.REVOKED
        assert (sandbox.count(STATUS), sandbox.count(TIME), sandbox.count(PROBE)) == (1, 2, 3)

    def test_failures_are_not_reused_and_successes_age_out(
        self,
        vault: Vault,
        exchange: Exchange,
        registered: tuple[KeyRef, KeyPair],
        sandbox: SandboxAdmin,
    ) -> None:
        """A failed /status is asked again by the next check; an Ok one after remeasure_s."""
        ref, _ = registered
        clock = FakeClock(1_000.0)
        checker = Checker(vault, exchange, clock=clock, remeasure_s=5, confirm_delay_s=0)
        sandbox.set_faults(maintenance=True)
        assert checker.check(ref).label == "UNKNOWN(maintenance)"
        sandbox.clear_faults()
        assert checker.check(ref).label == "VALID"
        assert (sandbox.count(STATUS), sandbox.count(TIME)) == (2, 1)
        clock.now += 4.9
        assert checker.check(ref).label == "VALID"
        assert (sandbox.count(STATUS), sandbox.count(TIME)) == (2, 1)
        clock.now += 0.2
        assert checker.check(ref).label == "VALID"
        assert (sandbox.count(STATUS), sandbox.count(TIME)) == (3, 2)


# -- the fault matrix ------------------------------------------------------------------------

KEYS_PER_CASE = 6
SWEEPS_PER_CASE = 3
FAST_TIMEOUT_S = 0.15


@dataclass(frozen=True)
class FaultCase:
    id: str
    faults: dict[str, Any]
    labels: frozenset[str]  # every verdict a faulted check may give
    timeout_s: float = 2.0
    refused: bool = False  # point the exchange at a closed port instead


def _labels(*labels: str) -> frozenset[str]:
    return frozenset(labels)


FAULT_MATRIX = [
    FaultCase("500", {"status": 500}, _labels("UNKNOWN(server_error)")),
    FaultCase("502", {"status": 502}, _labels("UNKNOWN(server_error)")),
    FaultCase("503", {"status": 503}, _labels("UNKNOWN(maintenance)")),
    FaultCase("504", {"status": 504}, _labels("UNKNOWN(server_error)")),
    FaultCase("429", {"status": 429}, _labels("UNKNOWN(rate_limited)")),
    FaultCase("flaky-500", {"status": 500, "rate": 0.5}, _labels("VALID", "UNKNOWN(server_error)")),
    FaultCase(
        "flaky-429-slow",
        {"status": 429, "rate": 0.3, "latency_ms": 20},
        _labels("VALID", "UNKNOWN(rate_limited)"),
    ),
    FaultCase(
        "timeout", {"latency_ms": 600}, _labels("UNKNOWN(network)"), timeout_s=FAST_TIMEOUT_S
    ),
    FaultCase(
        "flaky-timeout",
        {"latency_ms": 600, "rate": 0.4},
        _labels("VALID", "UNKNOWN(network)"),
        timeout_s=FAST_TIMEOUT_S,
    ),
    FaultCase("refused", {}, _labels("UNKNOWN(network)"), refused=True),
    FaultCase("maintenance", {"maintenance": True}, _labels("UNKNOWN(maintenance)")),
    FaultCase("clock+10s", {"clock_offset_ms": 10_000}, _labels("VALID")),
    FaultCase("clock-10s", {"clock_offset_ms": -10_000}, _labels("VALID")),
    FaultCase("time-skew", {"time_skew_ms": 20_000}, _labels("UNKNOWN(clock)")),
    FaultCase("slow", {"latency_ms": 40}, _labels("VALID")),
]


class TestFaultMatrix:
    def test_the_matrix_makes_at_least_200_faulted_checks(self) -> None:
        """The matrix below is big enough to mean something."""
        assert len(FAULT_MATRIX) * KEYS_PER_CASE * SWEEPS_PER_CASE >= 200

    @pytest.mark.parametrize("case", FAULT_MATRIX, ids=[c.id for c in FAULT_MATRIX])
    def test_faults_never_revoke_and_valid_returns_when_they_clear(
        self, case: FaultCase, vault: Vault, sandbox: SandboxAdmin, http: httpx.Client
    ) -> None:
        """Under each fault no key is revoked; once it clears every key is VALID again."""
        refs = []
        for i in range(KEYS_PER_CASE):
            ref, pair = KeyRef(f"sub-{i % 3}", f"bot-{i}"), generate_pair()
            store_key(vault, ref, pair=pair, exchange=sandbox.url)
            sandbox.register(pair.api_key)
            refs.append(ref)
        url = f"http://127.0.0.1:{free_port()}" if case.refused else sandbox.url
        faulted = Checker(vault, Exchange(http, url, timeout_s=case.timeout_s), confirm_delay_s=0)
        if case.faults:
            sandbox.set_faults(**case.faults)

        results = list(
            itertools.chain.from_iterable(
                faulted.check_many(refs, concurrency=6) for _ in range(SWEEPS_PER_CASE)
            )
        )

        assert len(results) == KEYS_PER_CASE * SWEEPS_PER_CASE
        seen = {r.label for r in results}
        assert seen <= case.labels
        assert case.labels - {"VALID"} <= seen  # the faults did happen
        assert not any(r.changed for r in results)
        assert {vault.read_record(ref).status for ref in refs} == {Status.ACTIVE}
        sandbox.clear_faults()
        healthy = Checker(vault, Exchange(http, sandbox.url), confirm_delay_s=0)
        assert {r.label for r in healthy.check_many(refs, concurrency=6)} == {"VALID"}


# -- the request budget --------------------------------------------------------------------


class TestRequestBudget:
    def test_a_bucket_allows_its_rate_then_refuses(self) -> None:
        """per_minute requests pass at once; the next waits for the refill."""
        clock = FakeClock(1_000.0)
        budget = RequestBudget(per_minute=3, clock=clock)
        assert [budget.try_acquire("main") for _ in range(4)] == [True, True, True, False]
        clock.now += 20  # one token back after a third of a minute
        assert [budget.try_acquire("main") for _ in range(2)] == [True, False]

    def test_sub_accounts_have_their_own_buckets(self) -> None:
        """Spending one sub-account's budget leaves another's whole."""
        budget = RequestBudget(per_minute=1, clock=FakeClock(1_000.0))
        assert budget.try_acquire("main")
        assert not budget.try_acquire("main")
        assert budget.try_acquire("scalper")

    def test_the_default_is_far_below_backpacks_limit(self) -> None:
        """The default budget is 120 requests a minute (Backpack allows 2000)."""
        assert RequestBudget().per_minute == 120

    def test_a_check_over_budget_sends_nothing(
        self,
        vault: Vault,
        exchange: Exchange,
        registered: tuple[KeyRef, KeyPair],
        sandbox: SandboxAdmin,
    ) -> None:
        """Over budget a check is UNKNOWN(rate_limited) and sends nothing, until the refill."""
        ref, _ = registered
        clock = FakeClock(1_000.0)
        checker = Checker(vault, exchange, budget=RequestBudget(per_minute=1, clock=clock))
        assert checker.check(ref).verdict is Verdict.VALID
        sent = sandbox.stats()["total"]
        limited = checker.check(ref)
        assert (limited.verdict, limited.reason) == (Verdict.UNKNOWN, "rate_limited")
        assert sandbox.stats()["total"] == sent
        clock.now += 60
        assert checker.check(ref).verdict is Verdict.VALID


# -- the webhook ---------------------------------------------------------------------------


@dataclass
class Receiver:
    """A tiny webhook receiver: answers the queued statuses in turn, then 204."""

    answers: list[int] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)

    async def hook(self, request: Request) -> Response:
        self.received.append(await request.json())
        status = self.answers.pop(0) if self.answers else 204
        return JSONResponse({}, status_code=status) if status != 204 else Response(status_code=204)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    rx = Receiver()
    app = Starlette(routes=[Route("/hooks/T0KEN-in-path", rx.hook, methods=["POST"])])
    with ServerThread(app) as server:
        yield rx, f"{server.url}/hooks/T0KEN-in-path"


def _status_change() -> KeyStatusChanged:
    """What a check that revoked a key emits."""
    ref = KeyRef("main", "bot-a")
    old = KeyRecord(
        ref=ref,
        api_key=generate_pair().api_key,
        read_only=False,
        status=Status.ACTIVE,
        origin=Origin.BACKPACK_UI,
        created_at="2025-01-01T00:00:00+00:00",
        status_since="2025-01-01T00:00:00+00:00",
    )
    new = KeyRecord(**{**_fields(old), "status": Status.REVOKED})
    result = CheckResult(
        ref=ref,
        verdict=Verdict.REJECTED,
        reason="key_rejected",
        checked_at="2025-01-02T00:00:00+00:00",
        row=7,
        http_status=401,
        code="UNAUTHORIZED",
        probes=2,
        old_status=Status.ACTIVE,
        new_status=Status.REVOKED,
    )
    return KeyStatusChanged(ref, old.status, new.status, Cause.CHECK, record=new, result=result)


def _fields(record: KeyRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


def _webhook(http: httpx.Client, url: str) -> Webhook:
    return Webhook(http, url, attempts=3, wait_initial_s=0.01, wait_max_s=0.02, timeout_s=2)


class TestWebhook:
    def test_a_status_change_is_posted(
        self, receiver: tuple[Receiver, str], http: httpx.Client
    ) -> None:
        """The alert names the key, both statuses and the verdict."""
        rx, url = receiver
        _webhook(http, url).on_event(_status_change())
        (alert,) = rx.received
        assert alert["event"] == "key.status_changed"
        assert (alert["key"], alert["old_status"], alert["new_status"]) == (
            "main/bot-a",
            "active",
            "revoked",
        )
        assert (alert["verdict"], alert["http_status"]) == ("REJECTED(key_rejected)", 401)

    def test_the_older_name_posts_the_same_alert(
        self, receiver: tuple[Receiver, str], http: httpx.Client
    ) -> None:
        """``key_status_changed`` is ``on_event`` under its older name: one alert."""
        rx, url = receiver
        _webhook(http, url).on_event(_status_change())
        assert [alert["new_status"] for alert in rx.received] == ["revoked"]

    def test_a_change_no_check_caused_is_not_posted(
        self, receiver: tuple[Receiver, str], http: httpx.Client
    ) -> None:
        """A status written with the CLI and observed later is the operator's own doing."""
        rx, url = receiver
        observed = dataclasses.replace(_status_change(), cause=Cause.OBSERVED, result=None)
        _webhook(http, url).on_event(observed)
        assert rx.received == []

    def test_failures_are_retried(self, receiver: tuple[Receiver, str], http: httpx.Client) -> None:
        """503 and 429 are retried until the receiver accepts."""
        rx, url = receiver
        rx.answers = [503, 429]
        assert _webhook(http, url).send({"event": "test"})
        assert len(rx.received) == 3

    def test_a_client_error_is_not_retried(
        self, receiver: tuple[Receiver, str], http: httpx.Client
    ) -> None:
        """A 400 means the payload is wrong: one attempt, reported as failed."""
        rx, url = receiver
        rx.answers = [400]
        assert not _webhook(http, url).send({"event": "test"})
        assert len(rx.received) == 1

    def test_giving_up_never_raises_and_logs_only_the_host(
        self, receiver: tuple[Receiver, str], http: httpx.Client
    ) -> None:
        """After the last attempt the failure is logged, without the URL's secret path."""
        rx, url = receiver
        rx.answers = [500, 500, 500]
        with structlog.testing.capture_logs() as logs:
            assert not _webhook(http, url).send({"event": "test"})
        assert len(rx.received) == 3
        failed = [e for e in logs if e["event"] == "alert.failed"]
        assert failed == [
            {
                "event": "alert.failed",
                "alert": "test",
                "host": "127.0.0.1",
                "error": "status 500",
                "log_level": "error",
            }
        ]
        assert "T0KEN" not in repr(logs)

    def test_an_unreachable_receiver_never_raises(self, http: httpx.Client) -> None:
        """Connection refused on every attempt returns False."""
        assert not _webhook(http, f"http://127.0.0.1:{free_port()}/hook").send({"event": "x"})

    def test_the_webhook_repr_hides_the_url(self, http: httpx.Client) -> None:
        """Only the host shows in a repr."""
        assert (
            repr(_webhook(http, "https://hooks.example/T0KEN")) == "Webhook(host='hooks.example')"
        )


class TestCheckCommand:
    def test_keys_check_prints_the_verdict_and_exits_by_it(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        sandbox: SandboxAdmin,
        registered: tuple[KeyRef, KeyPair],
    ) -> None:
        """`keys check` exits 0 on VALID, 12 once the key is revoked, then 6 (not usable)."""
        ref, pair = registered
        env = {
            "VAULT_ADDR": vault_settings.addr,
            "VAULT_TOKEN": vault_settings.token.reveal() if vault_settings.token else "",
            "BACKPACK_VAULT_KV_PREFIX": vault_settings.kv_prefix,
            "BACKPACK_VAULT_BACKPACK_URL": sandbox.url,
        }
        runner = CliRunner()
        valid = runner.invoke(cli, ["keys", "check", str(ref)], env=env)
        assert (valid.exit_code, valid.stdout.split(":")[1].split(",")[0].strip()) == (0, "VALID")
        sandbox.revoke(pair.api_key)
        rejected = runner.invoke(cli, ["keys", "check", str(ref)], env=env)
        assert rejected.exit_code == 12
        assert "now revoked" in rejected.stdout
        assert vault.read_record(ref).status is Status.REVOKED
        again = runner.invoke(cli, ["keys", "check", str(ref)], env=env)
        assert again.exit_code == 6
        assert "revoked" in again.output
