"""Revocation you can trust: the guards never block a real revocation, the operator's word
beats every heuristic, a wrong revocation is one command to undo, and a verdict counts
only from the key's own exchange.

Real OpenBao (the session's dev server), the sandbox exchange on loopback, the CLI as
an operator runs it and, for the drills, the daemon with its scheduler and worker API
over HTTP. Expectations are polled with generous deadlines, never timed. The rules
these tests hold are the table in docs/verdicts.md.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import structlog
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backpack_vault.alerts import ADVICE, check_alert_payload
from backpack_vault.backpack.rest import Exchange
from backpack_vault.backpack.signing import Signer
from backpack_vault.checks import CHECK_ACTOR, PROBE_WINDOW_MS, UNRESOLVED, Checker, RequestBudget
from backpack_vault.cli import cli
from backpack_vault.config import Secret, Settings, VaultSettings, load
from backpack_vault.core.keys import (
    PRODUCTION_EXCHANGE,
    KeyPair,
    KeyRef,
    Origin,
    Status,
    generate_pair,
)
from backpack_vault.core.verdicts import ProbeResponse, Verdict
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread, free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.events import Event, KeyStatusChanged
from backpack_vault.testing import NOW, make_record, store_key, wait_until
from backpack_vault.testing.sandbox import SandboxAdmin, SandboxState
from backpack_vault.vault.client import Provisioner, Vault

PROBE = "GET /api/v1/account"
SLACK = 5.0  # scheduling, confirming probes and Vault writes on a busy 2-core machine
KEY_SYNC = 0.3
LEASE_TTL = 2.0


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class Changes:
    """The status changes a checker emits."""

    events: list[KeyStatusChanged] = field(default_factory=list)

    def __call__(self, event: Event) -> None:
        if isinstance(event, KeyStatusChanged):
            self.events.append(event)

    @property
    def revoked(self) -> list[KeyRef]:
        return [e.ref for e in self.events if e.new is Status.REVOKED]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as client:
        yield client


@pytest.fixture
def changes() -> Changes:
    return Changes()


@pytest.fixture
def checker(vault: Vault, http: httpx.Client, sandbox: SandboxAdmin, changes: Changes) -> Checker:
    return Checker(
        vault, Exchange(http, sandbox.url, timeout_s=2.0), emit=changes, confirm_delay_s=0
    )


Store = Callable[..., tuple[KeyRef, KeyPair]]


@pytest.fixture
def stored(vault: Vault, sandbox: SandboxAdmin) -> Store:
    """``stored("bot-a")``: a key of the sandbox, in Vault and (unless told) registered there."""

    def store(name: str, sub: str = "main", *, registered: bool = True, **options: Any) -> Any:
        ref = KeyRef(sub, name)
        options.setdefault("exchange", sandbox.url)
        pair = store_key(vault, ref, **options)
        if registered:
            sandbox.register(pair.api_key)
        return ref, pair

    return store


def probes(sandbox: SandboxAdmin, pair: KeyPair) -> int:
    return sandbox.count(PROBE, pair.api_key)


def cli_env(
    settings: VaultSettings, backpack_url: str, token: Secret | None = None
) -> dict[str, str]:
    token = token or settings.token
    return {
        "VAULT_ADDR": settings.addr,
        "VAULT_TOKEN": token.reveal() if token else "",
        "BACKPACK_VAULT_KV_PREFIX": settings.kv_prefix,
        "BACKPACK_VAULT_BACKPACK_URL": backpack_url,
        "BACKPACK_VAULT_LOG_LEVEL": "warning",
    }


def run_cli(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# -- the pipeline, one check at a time ---------------------------------------------------------


class TestReferenceSet:
    """Finding 1: a control key is used only while it is active and was accepted lately."""

    @pytest.mark.parametrize("gone", ["retired", "revoked", "deleted"])
    def test_a_control_that_left_does_not_block_a_revocation(
        self,
        checker: Checker,
        stored: Store,
        vault: Vault,
        sandbox: SandboxAdmin,
        gone: str,
    ) -> None:
        """The key accepted most recently is retired, revoked or deleted; the next
        rejection of another key still revokes it, and the departed key is not probed."""
        (victim, victim_pair), (kept, _), (old, old_pair) = (
            stored("victim"),
            stored("kept"),
            stored("old"),
        )
        for ref in (victim, kept, old):  # "old" is accepted last: the first control
            assert checker.check(ref).verdict is Verdict.VALID
        if gone == "deleted":
            vault.delete_key(old)
        else:
            vault.set_status(old, Status(gone), now=NOW)
        sandbox.revoke(old_pair.api_key)  # deleted in the web UI as well
        sandbox.revoke(victim_pair.api_key)
        before = probes(sandbox, old_pair)
        result = checker.check(victim)
        assert (result.verdict, result.new_status) == (Verdict.REJECTED, Status.REVOKED)
        assert probes(sandbox, old_pair) == before
        assert vault.read_record(kept).status is Status.ACTIVE

    def test_a_control_whose_cross_check_failed_is_tried_last(
        self, checker: Checker, stored: Store, vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """A control Backpack rejected is a suspect, not proof of an outage: the next
        control decides, and later cross-checks try the suspect only after the others."""
        keys = [stored(name) for name in ("a", "b", "kept", "suspect")]
        for ref, _ in keys:
            checker.check(ref)
        (a, a_pair), (b, b_pair), (kept, _), (_, suspect_pair) = keys
        sandbox.revoke(suspect_pair.api_key)  # revoked at Backpack, not yet checked
        sandbox.revoke(a_pair.api_key)
        first = checker.check(a)  # tries "suspect" (accepted last), then "kept"
        assert first.new_status is Status.REVOKED
        tried = probes(sandbox, suspect_pair)
        sandbox.revoke(b_pair.api_key)
        second = checker.check(b)
        assert second.new_status is Status.REVOKED
        assert probes(sandbox, suspect_pair) == tried  # "kept" sufficed
        assert vault.read_record(kept).status is Status.ACTIVE

    def test_without_memory_the_controls_come_from_vault(
        self, vault: Vault, http: httpx.Client, stored: Store, sandbox: SandboxAdmin
    ) -> None:
        """A fresh checker (a new leader, the CLI) finds controls among Vault's active keys,
        skipping retired, pending and other exchanges' keys."""
        stored("aa-retired", status=Status.RETIRED)
        stored("ab-pending", status=Status.PENDING, origin=Origin.GENERATED)
        stored("ac-elsewhere", exchange=PRODUCTION_EXCHANGE)
        (victim, pair), (kept, kept_pair) = stored("victim"), stored("zz-kept")
        sandbox.revoke(pair.api_key)
        fresh = Checker(vault, Exchange(http, sandbox.url), confirm_delay_s=0)
        result = fresh.check(victim)
        assert result.new_status is Status.REVOKED
        assert vault.read_record(kept).status is Status.ACTIVE
        assert probes(sandbox, kept_pair) == 1
        stats = sandbox.stats()["keys"]
        assert len(stats) == 2  # only the victim and its control were sent to the sandbox

    def test_a_lone_active_key_is_revoked_on_its_second_probe(
        self, checker: Checker, stored: Store, vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """With no other active key at all (the rest retired or revoked), the confirmation
        by a second probe stands."""
        stored("old", status=Status.RETIRED)
        stored("gone", status=Status.REVOKED)
        ref, pair = stored("only")
        sandbox.revoke(pair.api_key)
        result = checker.check(ref)
        assert (result.new_status, result.probes) == (Status.REVOKED, 2)
        record = vault.read_record(ref)
        assert record.status_by == CHECK_ACTOR
        assert "no other active key" in record.status_reason

    def test_a_revocation_records_the_control_that_was_accepted(
        self, checker: Checker, stored: Store, vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """The status change says why: rejected three times while the control was accepted."""
        (victim, pair), (kept, _) = stored("victim"), stored("kept")
        sandbox.revoke(pair.api_key)
        result = checker.check(victim)
        assert (result.new_status, result.probes) == (Status.REVOKED, 3)
        record = vault.read_record(victim)
        assert record.status_reason == (
            f"REJECTED(key_rejected): rejected three times while {kept} was accepted"
        )
        assert (record.status_by, record.last_verdict) == (CHECK_ACTOR, "REJECTED(key_rejected)")


class TestSystemicGuard:
    """Finding 2: keys already final never count, and an outage revokes nothing."""

    def test_earlier_revocations_do_not_hold_back_the_next(
        self, checker: Checker, stored: Store, vault: Vault, sandbox: SandboxAdmin, changes: Changes
    ) -> None:
        """Three keys revoked for real, one after another; the fourth is revoked too."""
        keys = [stored(f"bot-{i}") for i in range(5)]
        for ref, _ in keys:
            checker.check(ref)
        for ref, pair in keys[:4]:
            sandbox.revoke(pair.api_key)
            result = checker.check(ref)
            assert (result.verdict, result.new_status) == (Verdict.REJECTED, Status.REVOKED)
        assert changes.revoked == [ref for ref, _ in keys[:4]]
        assert vault.read_record(keys[4][0]).status is Status.ACTIVE
        assert checker.outage_since is None

    def test_every_key_revoked_one_by_one_is_revoked(
        self, checker: Checker, stored: Store, vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """An operator deletes every key in the web UI, one at a time: each is revoked, the
        last one alone on its second probe."""
        keys = [stored(f"bot-{i}") for i in range(4)]
        for ref, _ in keys:
            checker.check(ref)
        for ref, pair in keys:
            sandbox.revoke(pair.api_key)
            assert checker.check(ref).new_status is Status.REVOKED
        assert {vault.read_record(ref).status for ref, _ in keys} == {Status.REVOKED}

    def test_every_key_rejected_at_once_is_one_outage_then_valid_again(
        self, checker: Checker, stored: Store, vault: Vault, sandbox_state: SandboxState
    ) -> None:
        """All keys refused at once: UNKNOWN(systemic), nothing revoked, one alert, until a key
        is accepted again; then every key is VALID."""
        keys = [stored(f"bot-{i}") for i in range(4)]
        for ref, _ in keys:
            checker.check(ref)
        for _, pair in keys:
            sandbox_state.revoke(pair.api_key)
        rounds = [[checker.check(ref) for ref, _ in keys] for _ in range(2)]
        results = [r for round_ in rounds for r in round_]
        assert {(r.verdict, r.reason) for r in results} == {(Verdict.UNKNOWN, "systemic")}
        assert [r.alert for r in results].count(True) == 1
        assert {vault.read_record(ref).status for ref, _ in keys} == {Status.ACTIVE}
        for _, pair in keys:
            sandbox_state.register(pair.api_key)
        assert [checker.check(ref).verdict for ref, _ in keys] == [Verdict.VALID] * 4
        assert checker.outage_since is None

    def test_the_end_of_an_outage_between_probes_revokes_nothing(
        self,
        vault: Vault,
        http: httpx.Client,
        stored: Store,
        sandbox: SandboxAdmin,
        sandbox_state: SandboxState,
    ) -> None:
        """The key is refused twice, the outage ends before the control is probed: the key
        is probed once more after the accepted control, and it is VALID."""
        keys = [stored("victim"), stored("kept")]
        (victim, victim_pair), (kept, _) = keys

        def outage_ends_after_the_confirmation(api_key: str, count: int) -> None:
            if api_key == victim_pair.api_key and count == 2:
                for _, pair in keys:
                    sandbox_state.register(pair.api_key)

        for _, pair in keys:
            sandbox_state.revoke(pair.api_key)
        exchange = Hooked(http, sandbox.url, outage_ends_after_the_confirmation)
        result = Checker(vault, exchange, confirm_delay_s=0).check(victim)
        assert (result.verdict, result.probes) == (Verdict.VALID, 1)
        assert exchange.probed[victim_pair.api_key] == 3
        assert {vault.read_record(ref).status for ref in (victim, kept)} == {Status.ACTIVE}

    def test_an_inconclusive_control_leaves_the_rejection_unconfirmed(
        self, vault: Vault, http: httpx.Client, stored: Store, sandbox: SandboxAdmin
    ) -> None:
        """The only other active key cannot be asked (its sub-account's budget is spent):
        the rejection stays unconfirmed and nothing is revoked; the daemon re-checks soon."""
        (victim, pair), (_, control) = stored("victim"), stored("kept", sub="other")
        budget = RequestBudget(per_minute=10)
        assert budget.try_acquire("other", cost=10)
        sandbox.revoke(pair.api_key)
        checker = Checker(vault, Exchange(http, sandbox.url), budget=budget, confirm_delay_s=0)
        result = checker.check(victim)
        assert (result.verdict, result.reason) == (Verdict.UNKNOWN, "unconfirmed_rejection")
        assert result.reason in UNRESOLVED
        assert probes(sandbox, control) == 0
        assert vault.read_record(victim).status is Status.ACTIVE

    def test_controls_left_untried_leave_the_rejection_unconfirmed(
        self,
        vault: Vault,
        http: httpx.Client,
        stored: Store,
        sandbox_state: SandboxState,
        sandbox: SandboxAdmin,
    ) -> None:
        """More rejected controls than one check may probe: unconfirmed, not systemic; the
        next check tries the rest and finds the accepted key."""
        keys = [stored(f"a-{i}") for i in range(4)] + [stored("z-kept")]
        for _, pair in keys[:4]:
            sandbox_state.revoke(pair.api_key)
        checker = Checker(vault, Exchange(http, sandbox.url), confirm_delay_s=0, max_controls=2)
        victim = keys[0][0]
        first = checker.check(victim)
        assert (first.verdict, first.reason) == (Verdict.UNKNOWN, "unconfirmed_rejection")
        assert checker.outage_since is None
        second = checker.check(victim)  # a-1 and a-2 are suspects now: a-3, then z-kept
        assert second.new_status is Status.REVOKED
        assert vault.read_record(keys[4][0]).status is Status.ACTIVE


class Hooked(Exchange):
    """The sandbox over real HTTP, with a hook after every probe: the seam that times an
    outage's end between two probes."""

    def __init__(
        self, http: httpx.Client, url: str, after_probe: Callable[[str, int], None]
    ) -> None:
        super().__init__(http, url, timeout_s=2.0)
        self._after_probe = after_probe
        self.probed: Counter[str] = Counter()

    def probe(self, signer: Signer, window_ms: int = PROBE_WINDOW_MS) -> ProbeResponse:
        answer = super().probe(signer, window_ms)
        self.probed[signer.api_key] += 1
        self._after_probe(signer.api_key, self.probed[signer.api_key])
        return answer


# -- the exchange a key belongs to --------------------------------------------------------------


@contextmanager
def forwarding_client(target: str) -> Iterator[httpx.Client]:
    """A client whose every request goes to ``target`` over real HTTP, whatever its URL says:
    Backpack's address, answered by the sandbox (a hijacked name, a wrong proxy)."""
    with httpx.Client(base_url=target, timeout=5.0) as real:

        def forward(request: httpx.Request) -> httpx.Response:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            answer = real.request(
                request.method,
                request.url.raw_path.decode(),
                headers=headers,
                content=request.content,
            )
            return httpx.Response(
                answer.status_code, headers=answer.headers, content=answer.content
            )

        with httpx.Client(transport=httpx.MockTransport(forward)) as client:
            yield client


class TestExchangeBinding:
    """Finding 5: a verdict from anywhere but the key's own exchange is shown, never written."""

    @pytest.mark.parametrize(
        ("key_exchange", "probed", "sandbox_answer", "written"),
        [
            ("http://127.0.0.1:8300", "http://127.0.0.1:8300/", False, True),
            ("http://127.0.0.1:8300", "http://127.0.0.1:8300", True, True),
            ("HTTPS://API.backpack.exchange/", PRODUCTION_EXCHANGE, False, True),
            (PRODUCTION_EXCHANGE, "http://127.0.0.1:8300", False, False),
            (PRODUCTION_EXCHANGE, "http://127.0.0.1:8300", True, False),
            (PRODUCTION_EXCHANGE, PRODUCTION_EXCHANGE, True, False),
            ("http://127.0.0.1:8300", PRODUCTION_EXCHANGE, False, False),
        ],
        ids=[
            "same-url",
            "same-url-sandbox",
            "production-spelled-differently",
            "production-key-sandbox-url",
            "production-key-sandbox-url-labelled",
            "production-url-sandbox-answer",
            "sandbox-key-production-url",
        ],
    )
    def test_who_may_write(
        self,
        vault: Vault,
        http: httpx.Client,
        key_exchange: str,
        probed: str,
        sandbox_answer: bool,
        written: bool,
    ) -> None:
        """Written only when the key belongs to the URL probed, and never for a production
        key when a sandbox answered."""
        checker = Checker(vault, Exchange(http, probed))
        record = make_record(
            KeyRef("main", "bot-a"), generate_pair().api_key, exchange=key_exchange
        )
        assert (checker.foreign(record, sandbox=sandbox_answer) == "") is written

    def test_keys_check_at_another_exchange_writes_nothing(
        self, vault: Vault, vault_settings: VaultSettings, stored: Store, sandbox: SandboxAdmin
    ) -> None:
        """A production key checked against the sandbox (which does not know it): REJECTED is
        shown with why it is not written, exit 2, and Vault is untouched."""
        ref, _ = stored("bot-a", registered=False, exchange=PRODUCTION_EXCHANGE)
        before = vault.read_record(ref)
        done = run_cli(cli_env(vault_settings, sandbox.url), "keys", "check", str(ref))
        assert done.exit_code == 2
        assert "REJECTED(key_rejected)" in done.stdout
        assert "not written" in done.stderr
        assert PRODUCTION_EXCHANGE in done.stderr
        assert vault.read_record(ref) == before
        as_json = run_cli(cli_env(vault_settings, sandbox.url), "keys", "check", str(ref), "--json")
        shown = json.loads(as_json.stdout)
        assert (shown["verdict"], shown["new_status"]) == ("REJECTED", None)
        assert PRODUCTION_EXCHANGE in shown["not_written"]

    def test_a_sandbox_answering_for_backpack_is_never_written(
        self, vault: Vault, stored: Store, sandbox: SandboxAdmin, changes: Changes
    ) -> None:
        """The URL is Backpack's, the answers are the sandbox's (they say so): a production
        key's rejection is shown, not written, not emitted."""
        ref, _ = stored("bot-a", registered=False, exchange=PRODUCTION_EXCHANGE)
        with forwarding_client(sandbox.url) as client:
            exchange = Exchange(client, PRODUCTION_EXCHANGE)
            checked = Checker(vault, exchange, emit=changes, confirm_delay_s=0).examine(ref)
        assert checked.result.verdict is Verdict.REJECTED
        assert "sandbox" in checked.foreign
        assert vault.read_record(ref).status is Status.ACTIVE
        assert changes.events == []

    def test_a_key_of_another_exchange_is_not_scheduled(
        self,
        dev_vault: DevVault,
        kv_prefix: str,
        stored: Store,
        sandbox: SandboxAdmin,
    ) -> None:
        """The daemon never probes a key whose verdicts it could not write, and says so once."""
        here, _ = stored("here")
        elsewhere, _ = stored("elsewhere", exchange=PRODUCTION_EXCHANGE)
        daemon = Daemon(daemon_settings(dev_vault, kv_prefix, sandbox.url, interval=300))
        try:
            daemon.login()
            daemon.hold_lease()
            with structlog.testing.capture_logs() as logs:
                daemon.sync_keys()
                daemon.sync_keys()
            assert daemon.scheduler.get_job(f"check:{here}") is not None
            assert daemon.scheduler.get_job(f"check:{elsewhere}") is None
            said = [e for e in logs if e["event"] == "checks.key_of_another_exchange"]
            assert [(e["key"], e["exchange"]) for e in said] == [
                (str(elsewhere), PRODUCTION_EXCHANGE)
            ]
        finally:
            daemon.stop()


# -- the operator's word ------------------------------------------------------------------------


class TestKeysRevoke:
    """`keys revoke`: at once, without a probe, with the same effect as a confirmed REJECTED."""

    def test_an_active_key_is_revoked_at_once_without_a_probe(
        self, vault: Vault, vault_settings: VaultSettings, stored: Store, sandbox: SandboxAdmin
    ) -> None:
        """Status revoked; who (the operator's Vault identity), when and why are recorded."""
        ref, _ = stored("bot-a")
        done = run_cli(
            cli_env(vault_settings, sandbox.url), "keys", "revoke", str(ref), "--reason", "leaked"
        )
        assert done.exit_code == 0, done.output
        assert f"{ref} is revoked" in done.stdout
        record = vault.read_record(ref)
        assert (record.status, record.status_reason, record.status_by) == (
            Status.REVOKED,
            "leaked",
            vault.lookup_self().identity,  # the dev server's root token: no entity
        )
        assert record.status_since
        assert sandbox.stats()["total"] == 0

    @pytest.mark.parametrize(
        ("status", "code", "after"),
        [
            (Status.PENDING, 0, Status.REVOKED),
            (Status.REVOKED, 0, Status.REVOKED),
            (Status.RETIRED, 6, Status.RETIRED),
        ],
        ids=["pending", "already-revoked", "retired"],
    )
    def test_from_each_status(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        stored: Store,
        sandbox: SandboxAdmin,
        status: Status,
        code: int,
        after: Status,
    ) -> None:
        """Pending keys may be revoked; revoking twice changes nothing; retired stays retired."""
        ref, _ = stored("bot-a", status=status, origin=Origin.GENERATED)
        before = vault.read_record(ref)
        done = run_cli(cli_env(vault_settings, sandbox.url), "keys", "revoke", str(ref), "--json")
        assert done.exit_code == code, done.output
        record = vault.read_record(ref)
        assert record.status is after
        if status is not Status.PENDING:
            assert record == before
        if code == 0:
            assert json.loads(done.stdout)["status"] == "revoked"

    def test_an_unknown_key_exits_5(
        self, vault_settings: VaultSettings, sandbox: SandboxAdmin
    ) -> None:
        """The exit code comes from the error class: UnknownKey is 5."""
        done = run_cli(cli_env(vault_settings, sandbox.url), "keys", "revoke", "main/nope")
        assert done.exit_code == 5
        assert "main/nope" in done.stderr

    def test_a_revoked_key_stops_being_checked_and_handed_out(
        self,
        dev_vault: DevVault,
        kv_prefix: str,
        vault: Vault,
        vault_settings: VaultSettings,
        stored: Store,
        sandbox: SandboxAdmin,
    ) -> None:
        """The daemon treats an operator's revocation as a confirmed REJECTED: no more probes,
        copies refused (409), unclaimed copies revoked."""
        ref, pair = stored("bot-a")
        kept, kept_pair = stored("kept")
        root = dev_vault.root_token
        with running(daemon_settings(dev_vault, kv_prefix, sandbox.url)) as served:
            wait_until(lambda: probes(sandbox, pair) >= 1, 2 * 1.0 + SLACK, "a first check")
            copy = served.post(ref, "copy", root).json()["wrap_token"]
            done = run_cli(cli_env(vault_settings, sandbox.url), "keys", "revoke", str(ref))
            assert done.exit_code == 0, done.output
            wait_until(lambda: served.job(ref) is None, 1.0 + KEY_SYNC + SLACK, "unscheduled")
            # Within the broker's secret cache and its sweep of unclaimed copies at the latest.
            wait_until(
                lambda: served.post(ref, "copy", root).status_code == 409,
                2 * SLACK,
                "copies refused",
            )
            wait_until(lambda: not unwraps(dev_vault.addr, copy), 3 * SLACK, "the copy revoked")
            stopped, others = probes(sandbox, pair), probes(sandbox, kept_pair)
            wait_until(lambda: probes(sandbox, kept_pair) >= others + 2, 3 + SLACK, "more checks")
            assert probes(sandbox, pair) == stopped
        assert vault.read_record(kept).status is Status.ACTIVE


class TestKeysReinstate:
    """`keys reinstate`: one command undoes a wrong revocation, after a VALID probe of the
    key's own exchange; nothing else makes a revoked key active."""

    def test_a_wrong_revocation_is_undone(
        self, vault: Vault, vault_settings: VaultSettings, stored: Store, sandbox: SandboxAdmin
    ) -> None:
        """Probed at the key's exchange, not the configured URL; who, when and why recorded."""
        ref, pair = stored("bot-a")
        vault.set_status(
            ref, Status.REVOKED, now=NOW, reason="REJECTED(key_rejected)", actor="check"
        )
        env = cli_env(vault_settings, closed_url())  # the configured URL leads nowhere
        done = run_cli(env, "keys", "reinstate", str(ref), "--reason", "checked the wrong URL")
        assert done.exit_code == 0, done.output
        assert f"{ref} is active again" in done.stdout
        record = vault.read_record(ref)
        assert (record.status, record.status_reason, record.status_by) == (
            Status.ACTIVE,
            "checked the wrong URL",
            vault.lookup_self().identity,
        )
        assert record.last_verdict == "VALID"
        assert record.status_since != NOW
        assert probes(sandbox, pair) == 1

    @pytest.mark.parametrize("answer", ["rejected", "unreachable"])
    def test_anything_but_valid_changes_nothing(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        stored: Store,
        sandbox: SandboxAdmin,
        answer: str,
    ) -> None:
        """Still rejected: exit 12; exchange unreachable: exit 11; the key stays revoked."""
        exchange = closed_url() if answer == "unreachable" else sandbox.url
        ref, _ = stored("bot-a", registered=False, exchange=exchange)
        vault.set_status(ref, Status.REVOKED, now=NOW)
        before = vault.read_record(ref)
        done = run_cli(
            cli_env(vault_settings, sandbox.url), "keys", "reinstate", str(ref), "--json"
        )
        assert done.exit_code == (12 if answer == "rejected" else 11), done.output
        shown = json.loads(done.stdout)
        assert (shown["reinstated"], shown["status"], shown["check"]["new_status"]) == (
            False,
            "revoked",
            None,
        )
        assert vault.read_record(ref) == before

    @pytest.mark.parametrize(
        ("status", "code"),
        [(Status.ACTIVE, 0), (Status.RETIRED, 6), (Status.PENDING, 6)],
        ids=["active", "retired", "pending"],
    )
    def test_only_a_revoked_key_is_reinstated(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        stored: Store,
        sandbox: SandboxAdmin,
        status: Status,
        code: int,
    ) -> None:
        """An active key is already active (exit 0); retired and pending keys are refused."""
        ref, _ = stored("bot-a", status=status, origin=Origin.GENERATED)
        before = vault.read_record(ref)
        done = run_cli(cli_env(vault_settings, sandbox.url), "keys", "reinstate", str(ref))
        assert done.exit_code == code, done.output
        assert vault.read_record(ref) == before
        assert sandbox.stats()["total"] == 0

    def test_a_sandbox_answer_never_reinstates_a_production_key(
        self, vault: Vault, stored: Store, sandbox: SandboxAdmin
    ) -> None:
        """VALID from a sandbox posing as Backpack is shown, not written."""
        ref, _ = stored("bot-a", exchange=PRODUCTION_EXCHANGE)
        vault.set_status(ref, Status.REVOKED, now=NOW)
        with forwarding_client(sandbox.url) as client:
            exchange = Exchange(client, PRODUCTION_EXCHANGE)
            checked = Checker(vault, exchange).reinstate(ref, reason="", actor="root")
        assert checked.result.verdict is Verdict.VALID
        assert "sandbox" in checked.foreign
        assert vault.read_record(ref).status is Status.REVOKED

    def test_a_reinstated_key_is_checked_again(
        self,
        dev_vault: DevVault,
        kv_prefix: str,
        vault: Vault,
        vault_settings: VaultSettings,
        stored: Store,
        sandbox: SandboxAdmin,
    ) -> None:
        """Revoked by a check, reinstated by the operator: back on the leader's schedule."""
        ref, pair = stored("bot-a")
        stored("kept")
        with running(daemon_settings(dev_vault, kv_prefix, sandbox.url)) as served:
            wait_until(lambda: probes(sandbox, pair) >= 1, 2 + SLACK, "a first check")
            sandbox.revoke(pair.api_key)
            wait_until(
                lambda: vault.read_record(ref).status is Status.REVOKED, 1 + SLACK, "revoked"
            )
            wait_until(lambda: served.job(ref) is None, SLACK, "unscheduled")
            sandbox.register(pair.api_key)  # it was a glitch after all
            done = run_cli(cli_env(vault_settings, sandbox.url), "keys", "reinstate", str(ref))
            assert done.exit_code == 0, done.output
            wait_until(lambda: served.job(ref) is not None, 1 + KEY_SYNC + SLACK, "scheduled")
            valid = served.verdicts(ref)["VALID"]
            wait_until(lambda: served.verdicts(ref)["VALID"] > valid, 2 + SLACK, "checked again")


# -- drills: the daemon, real HTTP ---------------------------------------------------------------


def daemon_settings(
    dev_vault: DevVault,
    kv_prefix: str,
    backpack_url: str,
    *,
    interval: float = 1.0,
    webhook_url: str | None = None,
) -> Settings:
    env = {
        "VAULT_ADDR": dev_vault.addr,
        "VAULT_TOKEN": dev_vault.root_token.reveal(),
        "BACKPACK_VAULT_KV_PREFIX": kv_prefix,
        "BACKPACK_VAULT_GRANT_PREFIX": f"{kv_prefix}-broker",
        "BACKPACK_VAULT_BACKPACK_URL": backpack_url,
        "BACKPACK_VAULT_CHECK_INTERVAL": str(interval),
        "BACKPACK_VAULT_LEASE_TTL": str(LEASE_TTL),
        # Drills check dozens of keys every second or two: far above what a sub-account may
        # spend against Backpack, which the default budget (120 a minute) is for.
        "BACKPACK_VAULT_SUBACCOUNT_BUDGET": "6000",
    }
    if webhook_url is not None:
        env["BACKPACK_VAULT_WEBHOOK_URL"] = webhook_url
    return load(env)


@dataclass
class Running:
    daemon: Daemon
    url: str

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics").text

    def all_verdicts(self) -> dict[str, Counter[str]]:
        """key -> label -> how many checks ended so."""
        counted: dict[str, Counter[str]] = {}
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name != "backpack_vault_checks_total":
                    continue
                labels = sample.labels
                reason = labels["reason"]
                label = "VALID" if reason == "accepted" else f"{labels['verdict']}({reason})"
                counted.setdefault(labels["key"], Counter())[label] += int(sample.value)
        return counted

    def verdicts(self, ref: KeyRef) -> Counter[str]:
        return self.all_verdicts().get(str(ref), Counter())

    def post(self, ref: KeyRef, action: str, token: Secret, body: Any = None) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/keys/{ref}/{action}",
            headers={"X-Vault-Token": token.reveal()},
            json=body,
        )

    def job(self, ref: KeyRef) -> Any:
        return self.daemon.scheduler.get_job(f"check:{ref}")


@contextmanager
def running(settings: Settings) -> Iterator[Running]:
    daemon = Daemon(settings, key_sync_interval_s=KEY_SYNC, confirm_delay_s=0.1)
    daemon.start()
    try:
        with ServerThread(daemon.app) as server:
            yield Running(daemon, server.url)
    finally:
        daemon.stop()


def unwraps(vault_addr: str, wrap_token: str) -> bool:
    answer = httpx.post(f"{vault_addr}/v1/sys/wrapping/lookup", json={"token": wrap_token})
    return answer.status_code == 200


@dataclass
class Receiver:
    """A webhook receiver: every alert it got."""

    received: list[dict[str, Any]] = field(default_factory=list)

    async def hook(self, request: Request) -> Response:
        self.received.append(json.loads(await request.body()))
        return Response(status_code=204)

    def revoked(self) -> list[str]:
        return [
            a["key"]
            for a in self.received
            if a["event"] == "key.status_changed" and a["new_status"] == "revoked"
        ]

    def systemic(self) -> list[dict[str, Any]]:
        return [
            a for a in self.received if a["event"] == "check.alert" and a["reason"] == "systemic"
        ]


@pytest.fixture
def webhook() -> Iterator[tuple[Receiver, str]]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/hook", receiver.hook, methods=["POST"])])
    with ServerThread(app) as server:
        yield receiver, f"{server.url}/hook"


def worker_token(vault: Vault, settings: VaultSettings, refs: list[KeyRef]) -> Secret:
    """A worker's own token with copy grants on ``refs`` (reports need a grant)."""
    name = f"{settings.kv_prefix}-worker"
    rules = "\n".join(
        f'path "{settings.grant_prefix}/{ref}/copy" {{ capabilities = ["read"] }}' for ref in refs
    )
    provisioner = Provisioner(vault)
    provisioner.ensure_policy(name, rules)
    return provisioner.create_token([name])


def checked_at_least(sandbox: SandboxAdmin, pairs: list[KeyPair], times: int) -> Callable[[], bool]:
    def condition() -> bool:
        seen = sandbox.stats()["keys"]
        return all(seen.get(p.api_key, {}).get(PROBE, 0) >= times for p in pairs)

    return condition


@pytest.mark.slow
class TestDrills:
    def test_an_incident_drill(
        self,
        dev_vault: DevVault,
        kv_prefix: str,
        vault: Vault,
        stored: Store,
        sandbox: SandboxAdmin,
        webhook: tuple[Receiver, str],
    ) -> None:
        """Five keys revoked at Backpack within one interval: all five revoked within two,
        no valid key touched; then twenty more in batches of five. Keys retired, revoked
        and refused before do not get in the way."""
        receiver, hook_url = webhook
        interval = 2.0
        subs = [f"sub-{i}" for i in range(8)]
        valid = [stored(f"ok-{i}", subs[i % 8]) for i in range(10)]
        victims = [stored(f"bot-{i:02d}", subs[i % 8]) for i in range(25)]
        old = [stored(f"old-{i}", subs[i]) for i in range(3)]
        earlier = [stored(f"gone-{i}", subs[i]) for i in range(2)]
        stored("not-yet", registered=False, status=Status.PENDING, origin=Origin.GENERATED)
        every = valid + victims + old + earlier
        settings = daemon_settings(
            dev_vault, kv_prefix, sandbox.url, interval=interval, webhook_url=hook_url
        )
        timings: list[tuple[str, float]] = []
        with running(settings):
            wait_until(
                checked_at_least(sandbox, [p for _, p in every], 1),
                2 * interval + 3 * SLACK,
                "first",
            )
            before = {ref: vault.read_record(ref) for ref, _ in valid}
            for ref, pair in old:  # retired by the operator after being accepted, then deleted
                vault.set_status(ref, Status.RETIRED, now=NOW)
                sandbox.revoke(pair.api_key)
            for _, pair in earlier:  # revoked for real, earlier
                sandbox.revoke(pair.api_key)
            wait_until(
                lambda: all(vault.read_record(r).status is Status.REVOKED for r, _ in earlier),
                2 * interval + SLACK,
                "earlier revocations",
            )
            batches = [victims[:5]] + [victims[i : i + 5] for i in range(5, 25, 5)]
            for number, batch in enumerate(batches):
                started = time.monotonic()
                for _, pair in batch:
                    sandbox.revoke(pair.api_key)
                    if number == 0:
                        time.sleep(interval / len(batch))  # spread over one interval
                wait_until(
                    lambda batch=batch: all(
                        vault.read_record(ref).status is Status.REVOKED for ref, _ in batch
                    ),
                    2 * interval + SLACK,
                    f"batch {number} revoked",
                )
                timings.append((f"batch {number}", time.monotonic() - started))
            wait_until(lambda: len(receiver.revoked()) >= 27, SLACK, "the alerts")
            # The valid keys go on being checked, and are never written to.
            wait_until(
                checked_at_least(sandbox, [p for _, p in valid], 4),
                3 * interval + SLACK,
                "more checks of the valid keys",
            )
            after = {ref: vault.read_record(ref) for ref, _ in valid}
        assert after == before
        revoked_keys = {str(ref) for ref, _ in victims + earlier}
        assert sorted(receiver.revoked()) == sorted(revoked_keys)  # each once
        assert receiver.systemic() == []
        assert {vault.read_record(ref).status for ref, _ in old} == {Status.RETIRED}
        print("drill:", ", ".join(f"{name} {s:.1f} s" for name, s in timings))  # noqa: T201

    def test_a_backpack_wide_auth_outage(
        self,
        dev_vault: DevVault,
        kv_prefix: str,
        vault: Vault,
        stored: Store,
        sandbox: SandboxAdmin,
        sandbox_state: SandboxState,
        webhook: tuple[Receiver, str],
    ) -> None:
        """Backpack refuses every key at once: nothing is revoked, one systemic alert says
        what to do, and every key is VALID again when the outage ends."""
        receiver, hook_url = webhook
        keys = [stored(f"bot-{i}", f"sub-{i % 4}") for i in range(8)]
        pairs = [pair for _, pair in keys]
        settings = daemon_settings(dev_vault, kv_prefix, sandbox.url, webhook_url=hook_url)
        with running(settings) as served:
            wait_until(checked_at_least(sandbox, pairs, 1), 2 + SLACK, "first checks")
            seen = sandbox.stats()["keys"]
            counts = [seen[p.api_key][PROBE] for p in pairs]
            for pair in pairs:  # at once: in the sandbox's own memory, not request by request
                sandbox_state.revoke(pair.api_key)
            wait_until(lambda: receiver.systemic() != [], 2 + SLACK, "the systemic alert")
            wait_until(
                lambda: all(
                    sandbox.stats()["keys"][p.api_key][PROBE] >= n + 6
                    for p, n in zip(pairs, counts, strict=True)
                ),
                6 + 2 * SLACK,
                "several intervals of outage",
            )
            assert {vault.read_record(ref).status for ref, _ in keys} == {Status.ACTIVE}
            verdicts = served.all_verdicts()
            during = {label for ref, _ in keys for label in verdicts[str(ref)]}
            assert "UNKNOWN(systemic)" in during
            assert not any(label.startswith("REJECTED") for label in during)
            valid_before = {str(ref): verdicts[str(ref)]["VALID"] for ref, _ in keys}
            for pair in pairs:
                sandbox_state.register(pair.api_key)
            wait_until(
                lambda: all(
                    served.verdicts(ref)["VALID"] > valid_before[str(ref)] for ref, _ in keys
                ),
                2 + SLACK,
                "every key VALID again",
            )
            assert served.daemon.checker.outage_since is None
        (alert,) = receiver.systemic()
        assert alert["advice"] == ADVICE["systemic"]
        assert "keys revoke" in alert["advice"]
        assert "nothing was revoked" in alert["summary"]
        assert receiver.revoked() == []
        assert {vault.read_record(ref).status for ref, _ in keys} == {Status.ACTIVE}

    def test_worker_reports_revoke_within_seconds_whatever_was_retired(
        self,
        dev_vault: DevVault,
        kv_prefix: str,
        vault: Vault,
        vault_settings: VaultSettings,
        stored: Store,
        sandbox: SandboxAdmin,
    ) -> None:
        """Finding 1's drill: the keys accepted last are retired; then ten workers report
        their key rejected, one after another. Every report revokes its key."""
        bots = [stored(f"bot-{i}", f"sub-{i % 4}") for i in range(10)]
        kept = [stored(f"kept-{i}") for i in range(2)]
        old = [stored(f"old-{i}") for i in range(5)]
        worker = worker_token(vault, vault_settings, [ref for ref, _ in bots])
        settings = daemon_settings(dev_vault, kv_prefix, sandbox.url, interval=300)
        latencies = []
        with running(settings) as served:
            wait_until(lambda: served.daemon.leader, LEASE_TTL + SLACK, "leadership")
            for ref, _ in bots + kept + old:  # "old" accepted last: the first controls
                result = served.daemon.run_check(ref)
                assert result is not None
                assert result.verdict is Verdict.VALID
            for ref, pair in old:
                vault.set_status(ref, Status.RETIRED, now=NOW)
                sandbox.revoke(pair.api_key)
            for ref, pair in bots:
                sandbox.revoke(pair.api_key)
                started = time.monotonic()
                answer = served.post(ref, "report", worker, {"reason": "401 UNAUTHORIZED"})
                assert answer.status_code == 202
                wait_until(
                    lambda ref=ref: vault.read_record(ref).status is Status.REVOKED,
                    2 + SLACK,
                    f"{ref} revoked",
                )
                latencies.append(time.monotonic() - started)
        assert {vault.read_record(ref).status for ref, _ in kept} == {Status.ACTIVE}
        print(f"reports: slowest {max(latencies):.2f} s")  # noqa: T201


class TestRechecks:
    """An unsettled verdict is re-checked with backoff, sooner than the interval."""

    def test_the_delays_double_up_to_the_interval(
        self,
        dev_vault: DevVault,
        kv_prefix: str,
        stored: Store,
        sandbox_state: SandboxState,
        sandbox: SandboxAdmin,
    ) -> None:
        """2, 4, 8, ... seconds while the verdict stays systemic; none once the delay would
        reach the interval (the regular check carries on); cleared when it resolves."""
        keys = [stored(f"bot-{i}") for i in range(3)]
        settings = daemon_settings(dev_vault, kv_prefix, sandbox.url, interval=60)
        daemon = Daemon(settings, confirm_delay_s=0)
        victim = keys[0][0]
        try:
            daemon.login()
            daemon.scheduler.start()  # the pools only: the lease and syncs are driven by hand
            daemon.hold_lease()
            daemon.sync_keys()
            for ref, _ in keys:
                # Driven by hand: a regular check's first run (anywhere in the interval) must
                # not probe a control at the moment this test does.
                daemon.scheduler.remove_job(f"check:{ref}")
                assert daemon.run_check(ref) is not None
            for _, pair in keys:
                sandbox_state.revoke(pair.api_key)
            delays, runs_at = [], []
            for _ in range(6):
                before = time.time()
                result = daemon.run_check(victim)
                assert result is not None
                assert result.reason == "systemic"
                job = daemon.scheduler.get_job(f"recheck:{victim}")
                assert job is not None
                runs_at.append(job.next_run_time)
                delays.append(int(job.next_run_time.timestamp() - before))  # the check's time
            assert delays[:5] == [2, 4, 8, 16, 32]
            assert runs_at[5] == runs_at[4]  # 64 s >= the interval: no new re-check
            for _, pair in keys[1:]:
                sandbox_state.register(pair.api_key)
            result = daemon.run_check(victim)
            assert result is not None
            assert result.new_status is Status.REVOKED
            assert daemon.scheduler.get_job(f"recheck:{victim}") is None
        finally:
            daemon.stop()

    def test_a_report_in_an_outage_is_followed_up(
        self,
        dev_vault: DevVault,
        kv_prefix: str,
        vault: Vault,
        vault_settings: VaultSettings,
        stored: Store,
        sandbox_state: SandboxState,
        sandbox: SandboxAdmin,
    ) -> None:
        """A report during an outage ends systemic; the outage ends, and the re-check a few
        seconds later revokes the reported key, five minutes before its next check."""
        keys = [stored(f"bot-{i}") for i in range(3)]
        victim = keys[0][0]
        worker = worker_token(vault, vault_settings, [victim])
        with running(daemon_settings(dev_vault, kv_prefix, sandbox.url, interval=300)) as served:
            wait_until(lambda: served.daemon.leader, LEASE_TTL + SLACK, "leadership")
            for ref, _ in keys:
                served.daemon.run_check(ref)
            for _, pair in keys:
                sandbox_state.revoke(pair.api_key)
            assert served.post(victim, "report", worker, {"reason": "401"}).status_code == 202
            wait_until(lambda: served.verdicts(victim)["UNKNOWN(systemic)"] >= 1, SLACK, "systemic")
            assert vault.read_record(victim).status is Status.ACTIVE
            for _, pair in keys[1:]:
                sandbox_state.register(pair.api_key)
            wait_until(
                lambda: vault.read_record(victim).status is Status.REVOKED,
                2 + 4 + SLACK,
                "revoked by a re-check",
            )
            assert {vault.read_record(ref).status for ref, _ in keys[1:]} == {Status.ACTIVE}


def test_the_systemic_alert_says_what_to_do() -> None:
    """The alert names the first key and the time, says nothing was revoked and what to do."""
    from backpack_vault.core.verdicts import CheckResult  # noqa: PLC0415

    result = CheckResult(
        KeyRef("main", "bot-a"), Verdict.UNKNOWN, "systemic", "2025-01-01T00:00:00Z", alert=True
    )
    payload = check_alert_payload(result)
    assert payload["summary"] == (
        "Backpack rejects every active key checked since 2025-01-01T00:00:00Z "
        "(first: main/bot-a); nothing was revoked"
    )
    advice = payload["advice"].lower()
    for words in ("status page", "nothing was revoked automatically", "keys revoke", "reinstate"):
        assert words in advice
