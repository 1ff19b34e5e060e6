"""The daemon's lifecycle: login (and waiting for Vault), token renewal, readiness and what
it says is missing, Vault outages, jobs, events, reports, the leader lease, SIGTERM.

Real OpenBao everywhere: the session's dev server, plus a separate one for the
outage test (it gets SIGSTOPped, which would stall every other test).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyRef, Status
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.leader import Lease
from backpack_vault.daemon.serving import ServerThread, free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import (
    ConfigError,
    ServiceError,
    VaultDenied,
    VaultUnavailable,
    WriteConflict,
)
from backpack_vault.events import Cause, CopiesRevoked, Event, EventBus, KeyStatusChanged
from backpack_vault.metrics import Metrics
from backpack_vault.testing import NOW, FakeClock, store_key, wait_until
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.setup import DAEMON_POLICY, load_policy_files

REF = KeyRef("main", "bot-a")
TIMEOUT = 15.0


def settings_for(vault: VaultSettings, **top: Any) -> Settings:
    return Settings(vault=vault, broker=BrokerSettings(), checks=CheckSettings(), **top)


def new_token(addr: str, root: Secret, *, ttl: str, renewable: bool = True) -> Secret:
    answer = httpx.post(
        f"{addr}/v1/auth/token/create",
        headers={"X-Vault-Token": root.reveal()},
        json={"policies": ["root"], "ttl": ttl, "renewable": renewable},
    )
    answer.raise_for_status()
    return Secret(answer.json()["auth"]["client_token"])


def accessor_of(addr: str, token: Secret) -> str:
    answer = httpx.get(
        f"{addr}/v1/auth/token/lookup-self", headers={"X-Vault-Token": token.reveal()}
    )
    answer.raise_for_status()
    return str(answer.json()["data"]["accessor"])


def token_alive(addr: str, token: Secret) -> bool:
    answer = httpx.get(
        f"{addr}/v1/auth/token/lookup-self", headers={"X-Vault-Token": token.reveal()}
    )
    return answer.status_code == 200


def wrap_token_alive(addr: str, wrap_token: str) -> bool:
    answer = httpx.post(f"{addr}/v1/sys/wrapping/lookup", json={"token": wrap_token})
    return answer.status_code == 200


@pytest.fixture
def running(vault: Vault, vault_settings: VaultSettings) -> Iterator[tuple[Daemon, str]]:
    daemon = Daemon(settings_for(vault_settings), vault=vault, sweep_interval_s=0.2)
    with daemon, ServerThread(daemon.app) as server:
        yield daemon, server.url


class TestStartup:
    def test_a_started_daemon_is_ready(self, running: tuple[Daemon, str]) -> None:
        """After login and the first health check, /readyz is 200 and the auth gauge is 1."""
        daemon, url = running
        ready, details = daemon.readiness()
        assert ready
        assert details == {
            "vault": "ok",
            "auth": "ok",
            "kv_mount": "ok",
            "policy": "ok",
            "missing": [],
        }
        answer = httpx.get(f"{url}/readyz")
        assert answer.status_code == 200
        assert answer.json()["ready"] is True
        assert httpx.get(f"{url}/healthz").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert "backpack_vault_vault_authenticated 1.0" in metrics
        assert "backpack_vault_vault_reachable 1.0" in metrics

    @pytest.mark.parametrize(
        ("vault", "error", "match"),
        [
            ({"token": Secret("s.wrong")}, VaultDenied, "denied"),
            ({"token": None}, ConfigError, "no Vault token"),
            ({"addr": "UNREACHABLE"}, VaultUnavailable, "unreachable"),
        ],
        ids=["bad-token", "no-token", "unreachable"],
    )
    def test_start_fails_fast_with_a_clear_error(
        self,
        dev_vault: DevVault,
        vault: dict[str, Any],
        error: type[ServiceError],
        match: str,
    ) -> None:
        """Daemon.start() (what tests and embedders call) raises our error; nothing runs."""
        if vault.get("addr") == "UNREACHABLE":
            vault["addr"] = f"http://127.0.0.1:{free_port()}"
        options: dict[str, Any] = {"addr": dev_vault.addr, "token": dev_vault.root_token} | vault
        daemon = Daemon(settings_for(VaultSettings(**options, timeout=1)))
        with pytest.raises(error, match=match):
            daemon.start()
        assert not daemon.scheduler.running
        assert daemon.readiness()[0] is False

    def test_serve_fails_fast_only_on_a_config_error(self, dev_vault: DevVault) -> None:
        """No token configured: nothing to retry, so run() raises (exit 2) and serves nothing."""
        listen = f"127.0.0.1:{free_port()}"
        daemon = Daemon(settings_for(VaultSettings(addr=dev_vault.addr, token=None), listen=listen))
        with pytest.raises(ConfigError, match="no Vault token"):
            daemon.run()
        assert not daemon.scheduler.running
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@dataclass
class Serving:
    """Daemon.run() in a thread, as `serve` runs it, and the URL it listens on."""

    daemon: Daemon
    url: str
    thread: threading.Thread
    codes: list[int] = field(default_factory=list)

    def ready(self) -> httpx.Response:
        return httpx.get(f"{self.url}/readyz")

    def stop(self) -> int:
        self.daemon.request_exit()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
        (code,) = self.codes
        return code


@contextmanager
def serving(settings: Settings, **kwargs: Any) -> Iterator[Serving]:
    daemon = Daemon(settings, login_backoff_s=(0.1, 0.4), **kwargs)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(daemon.run()), daemon=True)
    host, port = settings.listen_host_port
    running = Serving(daemon, f"http://{host}:{port}", thread, codes)
    thread.start()
    try:
        yield running
    finally:
        if thread.is_alive():
            running.stop()


def answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


class TestWaitingForVault:
    def test_serve_waits_for_vault_and_becomes_ready_when_it_answers(self, kv_prefix: str) -> None:
        """Vault is not there yet: /healthz 200, /readyz 503 naming Vault, each attempt
        logged with the address; once a Vault answers on that address, the daemon is ready."""
        root = Secret("root-wait")
        later = DevVault(port=free_port(), root_token=root)
        options = VaultSettings(addr=later.addr, token=root, kv_prefix=kv_prefix, timeout=1)
        listen = f"127.0.0.1:{free_port()}"
        with (
            structlog.testing.capture_logs() as logs,
            serving(settings_for(options, listen=listen)) as daemon,
        ):
            wait_until(lambda: answers(f"{daemon.url}/healthz"), TIMEOUT)
            waiting = daemon.ready()
            assert waiting.status_code == 503
            body = waiting.json()
            assert (body["ready"], body["vault"], body["auth"]) == (False, "unreachable", "pending")
            assert body["missing"][:2] == ["vault", "auth"]
            wait_until(lambda: sum(e["event"] == "vault.login_waiting" for e in logs) >= 2, TIMEOUT)
            with later:
                wait_until(lambda: daemon.ready().status_code == 200, TIMEOUT, "ready")
                assert daemon.daemon.scheduler.running
                assert daemon.stop() == 0
        attempts = [e for e in logs if e["event"] == "vault.login_waiting"]
        assert {e["addr"] for e in attempts} == {later.addr}
        assert [e["attempt"] for e in attempts] == list(range(1, len(attempts) + 1))
        assert any(e["event"] == "vault.logged_in" and e["addr"] == later.addr for e in logs)

    def test_refused_credentials_are_retried_and_said_so(
        self, dev_vault: DevVault, kv_prefix: str
    ) -> None:
        """A token Vault refuses: the daemon keeps trying, logs an error per attempt, and
        /readyz says auth failed; asked to stop, it exits 0 at once."""
        options = VaultSettings(addr=dev_vault.addr, token=Secret("s.revoked"), kv_prefix=kv_prefix)
        listen = f"127.0.0.1:{free_port()}"
        with (
            structlog.testing.capture_logs() as logs,
            serving(settings_for(options, listen=listen)) as daemon,
        ):
            wait_until(lambda: sum(e["event"] == "vault.login_refused" for e in logs) >= 2, TIMEOUT)
            body = daemon.ready().json()
            assert (body["vault"], body["auth"], body["ready"]) == ("ok", "failed", False)
            assert "denied" in body["error"]
            assert "auth failed" in body["reason"]
            assert daemon.stop() == 0
        refused = [e for e in logs if e["event"] == "vault.login_refused"]
        assert all(e["log_level"] == "error" and e["addr"] == dev_vault.addr for e in refused)

    def test_sigterm_while_waiting_for_vault_exits_0(self, tmp_path: Path) -> None:
        """A real `serve` process with no Vault: it serves /healthz, and SIGTERM ends it (0)."""
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "VAULT_ADDR": f"http://127.0.0.1:{free_port()}",
            "VAULT_TOKEN": "s.whatever",
            "BACKPACK_VAULT_LISTEN": f"127.0.0.1:{port}",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "backpack_vault", "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            wait_until(lambda: answers(f"http://127.0.0.1:{port}/healthz"), 30)
            assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 503
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0
        assert b"vault.login_waiting" in stderr
        assert env["VAULT_ADDR"].encode() in stderr


class TestReadiness:
    def test_a_missing_kv_mount_is_named(self) -> None:
        """Logged in, but nothing is mounted at secret/: /readyz 503 says kv_mount missing;
        mounting it makes the daemon ready at the next health check."""
        with DevVault() as own:
            headers = {"X-Vault-Token": own.root_token.reveal()}
            httpx.delete(f"{own.addr}/v1/sys/mounts/secret", headers=headers).raise_for_status()
            options = VaultSettings(addr=own.addr, token=own.root_token, kv_prefix="mount")
            daemon = Daemon(settings_for(options), health_interval_s=0.2)
            with daemon, ServerThread(daemon.app) as server:
                answer = httpx.get(f"{server.url}/readyz")
                assert answer.status_code == 503
                body = answer.json()
                assert (body["kv_mount"], body["vault"], body["auth"]) == ("missing", "ok", "ok")
                assert body["missing"] == ["kv_mount"]
                httpx.post(
                    f"{own.addr}/v1/sys/mounts/secret",
                    headers=headers,
                    json={"type": "kv", "options": {"version": "2"}},
                ).raise_for_status()
                wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, TIMEOUT)

    def test_a_policy_without_what_the_daemon_needs_is_named(
        self, vault: Vault, vault_settings: VaultSettings
    ) -> None:
        """A token that may list keys but not read them or revoke copies: policy missing,
        and which capabilities on which paths (wrapping comes with Vault's default policy)."""
        mount, prefix = vault_settings.kv_mount, vault_settings.kv_prefix
        hcl = (
            f'path "{mount}/metadata/{prefix}/*" {{ capabilities = ["read", "list"] }}\n'
            f'path "{mount}/data/{prefix}-leader" {{ capabilities = ["create", "update"] }}\n'
        )
        provisioner = Provisioner(vault)
        provisioner.ensure_policy(f"{prefix}-partial", hcl)
        token = provisioner.create_token([f"{prefix}-partial"])
        options = dataclasses.replace(vault_settings, token=token)
        daemon = Daemon(settings_for(options))
        with daemon:
            ready, details = daemon.readiness()
        assert not ready
        assert (details["policy"], details["kv_mount"], details["missing"]) == (
            "missing",
            "ok",
            ["policy"],
        )
        assert details["policy_missing"] == [
            f"read on {mount}/data/{prefix}/*",
            "update on auth/token/revoke-accessor",
        ]
        assert any(f"{prefix}-changes" in w for w in details["warnings"])  # type: ignore[attr-defined]

    def test_the_shipped_daemon_policy_is_enough(
        self, vault: Vault, vault_settings: VaultSettings
    ) -> None:
        """vault setup's daemon policy grants everything readiness asks for."""
        settings = settings_for(vault_settings)
        provisioner = Provisioner(vault)
        hcl = load_policy_files(settings)[DAEMON_POLICY]
        provisioner.ensure_policy(f"{vault_settings.kv_prefix}-daemon", hcl)
        token = provisioner.create_token([f"{vault_settings.kv_prefix}-daemon"])
        daemon = Daemon(settings_for(dataclasses.replace(vault_settings, token=token)))
        with daemon:
            ready, details = daemon.readiness()
        assert ready, details


class TestJobs:
    def test_add_job_runs_a_callable_periodically(self, running: tuple[Daemon, str]) -> None:
        """The seam for check jobs: add_job schedules a plain callable at an interval."""
        daemon, _ = running
        runs: list[float] = []
        daemon.scheduler.add_job(
            lambda: runs.append(time.monotonic()), seconds=0.05, job_id="test.tick"
        )
        wait_until(lambda: len(runs) >= 2, TIMEOUT)
        assert daemon.scheduler.get_job("test.tick") is not None

    def test_run_soon_runs_once(self, running: tuple[Daemon, str]) -> None:
        """run_soon runs a callable once, off the request path (e.g. a reported key's check)."""
        daemon, _ = running
        done = threading.Event()
        daemon.scheduler.run_soon(done.set, job_id="test.once")
        assert done.wait(5)

    def test_a_status_change_cascades_to_copies_and_metrics(
        self, running: tuple[Daemon, str], vault: Vault, dev_vault: DevVault
    ) -> None:
        """key_status_changed revokes unclaimed copies and sets the key status gauge."""
        daemon, url = running
        store_key(vault, REF)
        headers = {"X-Vault-Token": dev_vault.root_token.reveal()}
        wrap = httpx.post(f"{url}/v1/keys/main/bot-a/copy", headers=headers).json()["wrap_token"]
        vault.set_status(REF, Status.REVOKED, now=NOW, verdict="REJECTED")
        # The change feed may bring the same news first: one of the two revokes the copy.
        assert daemon.key_status_changed(REF, Status.REVOKED) in (0, 1)
        wait_until(lambda: not wrap_token_alive(dev_vault.addr, wrap), TIMEOUT)
        metrics = httpx.get(f"{url}/metrics").text
        assert 'backpack_vault_key_status{key="main/bot-a",status="revoked"} 1.0' in metrics
        assert 'backpack_vault_key_status{key="main/bot-a",status="active"} 0.0' in metrics

    def test_a_key_retired_with_the_cli_loses_its_copies_by_itself(
        self, running: tuple[Daemon, str], vault: Vault, dev_vault: DevVault
    ) -> None:
        """The sweep job notices a retirement written to Vault and revokes unclaimed copies."""
        _, url = running
        store_key(vault, REF)
        headers = {"X-Vault-Token": dev_vault.root_token.reveal()}
        wrap = httpx.post(f"{url}/v1/keys/main/bot-a/copy", headers=headers).json()["wrap_token"]
        vault.set_status(REF, Status.RETIRED, now=NOW)  # what `keys retire` does
        wait_until(lambda: not wrap_token_alive(dev_vault.addr, wrap), TIMEOUT)
        copy = httpx.post(f"{url}/v1/keys/main/bot-a/copy", headers=headers)
        assert copy.status_code == 409
        metrics = httpx.get(f"{url}/metrics").text
        assert "backpack_vault_copies_revoked_total 1.0" in metrics
        assert 'backpack_vault_key_status{key="main/bot-a",status="retired"} 1.0' in metrics

    def test_check_verdicts_are_counted(self, running: tuple[Daemon, str]) -> None:
        """record_verdict feeds backpack_vault_checks_total{key,verdict,reason}."""
        daemon, url = running
        daemon.record_verdict(REF, "UNKNOWN", "maintenance")
        metrics = httpx.get(f"{url}/metrics").text
        assert (
            'backpack_vault_checks_total{key="main/bot-a",reason="maintenance",verdict="UNKNOWN"}'
            " 1.0"
        ) in metrics


class TestTokenLifecycle:
    def test_the_token_is_renewed_before_it_expires(
        self, dev_vault: DevVault, vault_settings: VaultSettings
    ) -> None:
        """A 2 s token stays valid well past 2 s: the renewal job renews it in time."""
        token = new_token(dev_vault.addr, dev_vault.root_token, ttl="2s")
        options = VaultSettings(
            addr=dev_vault.addr, token=token, kv_prefix=vault_settings.kv_prefix
        )
        daemon = Daemon(settings_for(options), renew_interval_s=0.1)
        with daemon:
            time.sleep(3)  # past the original TTL
            assert token_alive(dev_vault.addr, token)
            assert daemon.readiness()[0] is True
        assert daemon.metrics.renewals.labels(kind="renew", outcome="ok")._value.get() >= 1

    def test_a_token_that_cannot_be_renewed_is_replaced_by_logging_in_again(
        self, dev_vault: DevVault, tmp_path: Path
    ) -> None:
        """With a token file, renewal failure reads the file again (Vault Agent rewrote it)."""
        token_file = tmp_path / "token"
        first = new_token(dev_vault.addr, dev_vault.root_token, ttl="2s", renewable=False)
        token_file.write_text(first.reveal())
        options = VaultSettings(addr=dev_vault.addr, auth="token-file", token_file=str(token_file))
        daemon = Daemon(settings_for(options), renew_interval_s=0.1)
        with daemon:
            second = new_token(dev_vault.addr, dev_vault.root_token, ttl="1h")
            token_file.write_text(second.reveal())
            wanted = accessor_of(dev_vault.addr, second)

            def switched() -> bool:
                info = daemon.vault.token_info
                return info is not None and info.accessor == wanted

            wait_until(switched, TIMEOUT)
            assert daemon.readiness()[0] is True

    def test_losing_the_token_shows_in_readiness_until_login_succeeds(
        self, dev_vault: DevVault, tmp_path: Path
    ) -> None:
        """A revoked daemon token makes /readyz 503; a fresh token file brings it back."""
        token_file = tmp_path / "token"
        first = new_token(dev_vault.addr, dev_vault.root_token, ttl="1h")
        token_file.write_text(first.reveal())
        options = VaultSettings(addr=dev_vault.addr, auth="token-file", token_file=str(token_file))
        daemon = Daemon(settings_for(options), health_interval_s=0.1)
        with daemon, ServerThread(daemon.app) as server:
            httpx.post(
                f"{dev_vault.addr}/v1/auth/token/revoke-self",
                headers={"X-Vault-Token": first.reveal()},
            ).raise_for_status()
            wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 503, TIMEOUT)
            refused = httpx.get(f"{server.url}/readyz").json()
            assert (refused["auth"], refused["missing"]) == ("failed", ["auth"])
            assert (
                "backpack_vault_vault_authenticated 0.0" in httpx.get(f"{server.url}/metrics").text
            )
            token_file.write_text(
                new_token(dev_vault.addr, dev_vault.root_token, ttl="1h").reveal()
            )
            wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, TIMEOUT)


class TestVaultOutage:
    def test_a_hung_vault_degrades_to_503_and_recovers_by_itself(self) -> None:
        """While Vault is stopped, /readyz and handouts are 503; after SIGCONT all is well again."""
        with DevVault() as own:
            options = VaultSettings(
                addr=own.addr, token=own.root_token, kv_prefix="outage", timeout=0.5
            )
            vault = Vault(options)
            vault.login()
            store_key(vault, REF)
            daemon = Daemon(settings_for(options), vault=vault, health_interval_s=0.2)
            headers = {"X-Vault-Token": own.root_token.reveal()}
            with daemon, ServerThread(daemon.app) as server:
                copy = f"{server.url}/v1/keys/main/bot-a/copy"
                assert httpx.post(copy, headers=headers).status_code == 200
                own.pause()
                try:
                    wait_until(
                        lambda: httpx.get(f"{server.url}/readyz").status_code == 503, TIMEOUT
                    )
                    refused = httpx.post(copy, headers=headers, timeout=10)
                    assert refused.status_code == 503
                    assert refused.json()["error"]["code"] == "vault_unavailable"
                    assert "Vault is unavailable" in refused.json()["error"]["message"]
                    assert httpx.get(f"{server.url}/healthz").status_code == 200
                finally:
                    own.resume()
                wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, TIMEOUT)
                assert httpx.post(copy, headers=headers).status_code == 200
                assert daemon.scheduler.running
            vault.close()


@dataclass
class Receiver:
    """A webhook receiver: records every POST body."""

    received: list[dict[str, Any]] = field(default_factory=list)

    async def hook(self, request: Request) -> Response:
        self.received.append(await request.json())
        return Response(status_code=204)


@pytest.fixture
def webhook() -> Iterator[tuple[Receiver, str]]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/hook", receiver.hook, methods=["POST"])])
    with ServerThread(app) as server:
        yield receiver, f"{server.url}/hook"


@pytest.fixture
def checking(
    vault: Vault,
    vault_settings: VaultSettings,
    sandbox: SandboxAdmin,
    webhook: tuple[Receiver, str],
) -> Iterator[Daemon]:
    """A daemon checking against the sandbox and alerting the webhook; jobs driven by hand."""
    checks = CheckSettings(backpack_url=sandbox.url, webhook_url=Secret(webhook[1]))
    settings = Settings(vault=vault_settings, broker=BrokerSettings(), checks=checks)
    daemon = Daemon(settings, vault=vault, confirm_delay_s=0)
    daemon.login()
    try:
        yield daemon
    finally:
        daemon.stop()


class TestCheckMetrics:
    def test_a_check_feeds_its_duration_clock_offset_and_last_check(
        self, checking: Daemon, vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """Each check lands in the duration and clock-offset histograms and on the page."""
        pair = store_key(vault, REF, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        checking.run_check(REF)
        text = checking.metrics.render()[0].decode()
        assert "backpack_vault_check_duration_seconds_count 1.0" in text
        assert "backpack_vault_clock_offset_seconds_count 1.0" in text
        assert checking.activity.last_checks()[str(REF)].verdict == "VALID"

    def test_retired_keys_stay_in_key_status(
        self, checking: Daemon, vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """A key retired before the daemon started shows as retired, not as nothing."""
        store_key(vault, KeyRef("main", "old"), status=Status.RETIRED, exchange=sandbox.url)
        checking.scheduler.start()
        try:
            checking.hold_lease()
            checking.sync_keys()
        finally:
            checking.scheduler.shutdown(wait=False)
        text = checking.metrics.render()[0].decode()
        assert 'backpack_vault_key_status{key="main/old",status="retired"} 1.0' in text


class TestEvents:
    def test_a_check_caused_change_is_one_event_reaching_every_listener(
        self,
        checking: Daemon,
        vault: Vault,
        sandbox: SandboxAdmin,
        webhook: tuple[Receiver, str],
        dev_vault: DevVault,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """One KeyStatusChanged(CHECK): copies revoked, gauge set once, one alert."""
        receiver, _ = webhook
        pair = store_key(vault, REF, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        handout = checking.broker.copy(dev_vault.root_token, REF)
        seen: list[Event] = []
        checking.events.subscribe(seen.append)
        gauge_sets: list[str] = []
        set_key_status = checking.metrics.set_key_status

        def count_gauge_sets(key: str, status: Status | str) -> None:
            gauge_sets.append(str(status))
            set_key_status(key, status)

        monkeypatch.setattr(checking.metrics, "set_key_status", count_gauge_sets)
        sandbox.revoke(pair.api_key)
        result = checking.run_check(REF)
        assert result is not None
        assert result.new_status is Status.REVOKED
        changes = [e for e in seen if isinstance(e, KeyStatusChanged)]
        assert [(e.ref, e.old, e.new, e.cause) for e in changes] == [
            (REF, Status.ACTIVE, Status.REVOKED, Cause.CHECK)
        ]
        assert changes[0].result == result
        assert changes[0].record is not None
        assert changes[0].record.status is Status.REVOKED
        assert [e for e in seen if isinstance(e, CopiesRevoked)] == [CopiesRevoked(REF, 1)]
        assert not wrap_token_alive(dev_vault.addr, handout.wrap_token.reveal())
        assert gauge_sets == ["revoked"]
        status = checking.metrics.key_status.labels(key=str(REF), status="revoked")
        assert status._value.get() == 1
        assert checking.metrics.revocations._value.get() == 1
        (alert,) = receiver.received
        assert (alert["event"], alert["old_status"], alert["new_status"]) == (
            "key.status_changed",
            "active",
            "revoked",
        )
        assert (alert["api_key"], alert["verdict"]) == (pair.api_key, "REJECTED(key_rejected)")

    def test_a_change_made_elsewhere_is_not_alerted(
        self, checking: Daemon, vault: Vault, webhook: tuple[Receiver, str]
    ) -> None:
        """A status the CLI wrote reaches the broker and metrics; the webhook stays quiet."""
        receiver, _ = webhook
        store_key(vault, REF)
        vault.set_status(REF, Status.RETIRED, now=NOW)
        assert checking.key_status_changed(REF, Status.RETIRED) == 0
        status = checking.metrics.key_status.labels(key=str(REF), status="retired")
        assert status._value.get() == 1
        assert receiver.received == []

    def test_a_failing_listener_does_not_stop_the_others(self) -> None:
        """The bus logs the failure (no traceback) and goes on to the next listener."""
        bus = EventBus()
        metrics = Metrics(CollectorRegistry())
        seen: list[Event] = []

        def explode(_event: Event) -> None:
            raise RuntimeError("webhook down")

        bus.subscribe(explode)
        bus.subscribe(metrics.on_event)
        bus.subscribe(seen.append)
        event = KeyStatusChanged(REF, Status.ACTIVE, Status.REVOKED, Cause.CHECK)
        with structlog.testing.capture_logs() as logs:
            bus.emit(event)
            bus.emit(CopiesRevoked(REF, 2))
        assert seen == [event, CopiesRevoked(REF, 2)]
        assert metrics.key_status.labels(key=str(REF), status="revoked")._value.get() == 1
        assert metrics.revocations._value.get() == 2
        failures = [e for e in logs if e["event"] == "events.listener_failed"]
        assert [f["error"] for f in failures] == ["RuntimeError", "RuntimeError"]


class TestReports:
    def test_a_report_goes_from_the_route_to_a_check(
        self, checking: Daemon, vault: Vault, sandbox: SandboxAdmin, dev_vault: DevVault
    ) -> None:
        """POST /report calls Daemon.report, which runs the key's check on the reports pool."""
        pair = store_key(vault, REF, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        sandbox.revoke(pair.api_key)
        checking.scheduler.start()  # the pools only: no lease, no scheduled checks
        try:
            with ServerThread(checking.app) as server, structlog.testing.capture_logs() as logs:
                answer = httpx.post(
                    f"{server.url}/v1/keys/{REF}/report",
                    headers={"X-Vault-Token": dev_vault.root_token.reveal()},
                    json={"reason": "401 UNAUTHORIZED"},
                )
                assert answer.status_code == 202
                wait_until(lambda: vault.read_record(REF).status is Status.REVOKED, TIMEOUT)
                wait_until(lambda: any(e["event"] == "check.triggered" for e in logs), TIMEOUT)
        finally:
            checking.scheduler.shutdown()
        (triggered,) = [e for e in logs if e["event"] == "check.triggered"]
        assert (triggered["trigger"], triggered["verdict"]) == ("report", "REJECTED(key_rejected)")


class TestLease:
    def test_one_holder_at_a_time(self, vault: Vault) -> None:
        """The first replica takes the lease; the second is refused while it is valid."""
        clock = FakeClock(1_000.0)
        a = Lease(vault, "replica-a", ttl_s=30, clock=clock)
        b = Lease(vault, "replica-b", ttl_s=30, clock=clock)
        assert a.acquire_or_renew()
        assert not b.acquire_or_renew()
        clock.now += 20
        assert a.acquire_or_renew()  # renewed: valid until now + 30
        clock.now += 20
        assert not b.acquire_or_renew()
        assert a.held()
        assert not b.held()

    def test_another_replica_takes_over_an_expired_lease(self, vault: Vault) -> None:
        """When the holder stops renewing, another replica takes over after expiry."""
        clock = FakeClock(1_000.0)
        a = Lease(vault, "replica-a", ttl_s=30, clock=clock)
        b = Lease(vault, "replica-b", ttl_s=30, clock=clock)
        assert a.acquire_or_renew()
        clock.now += 31
        assert b.acquire_or_renew()
        assert not a.acquire_or_renew()
        assert (a.held(), b.held()) == (False, True)
        data, _ = vault.read_document("leader") or ({}, 0)
        assert data["holder"] == "replica-b"

    def test_release_hands_over_at_once(self, vault: Vault) -> None:
        """A released lease can be taken immediately."""
        clock = FakeClock(1_000.0)
        a = Lease(vault, "replica-a", clock=clock)
        b = Lease(vault, "replica-b", clock=clock)
        assert a.acquire_or_renew()
        a.release()
        assert b.acquire_or_renew()
        assert not a.held()

    def test_a_lost_check_and_set_race_is_not_leadership(self, vault: Vault) -> None:
        """Two replicas that read the same version cannot both win: the later write fails."""
        clock = FakeClock(1_000.0)
        rival = Lease(vault, "replica-a", clock=clock)

        class RivalWritesFirst:
            """Real Vault; the rival acquires between our read and our write."""

            def read_document(self, path: str) -> Any:
                current = vault.read_document(path)
                assert rival.acquire_or_renew()
                return current

            def write_document(self, path: str, data: Any, cas: int) -> int:
                return vault.write_document(path, data, cas)

        loser = Lease(RivalWritesFirst(), "replica-b", clock=clock)  # type: ignore[arg-type]
        assert not loser.acquire_or_renew()
        assert rival.held()
        with pytest.raises(WriteConflict):
            vault.write_document("leader", {"holder": "x"}, cas=0)

    def test_vault_unreachable_means_not_leader(self) -> None:
        """A replica that cannot reach Vault does not consider itself leader."""
        settings = VaultSettings(
            addr=f"http://127.0.0.1:{free_port()}", token=Secret("t"), timeout=0.5
        )
        unreachable = Vault(settings)
        lease = Lease(unreachable, "replica-a")
        assert not lease.acquire_or_renew()
        unreachable.close()


LAUNCHER = textwrap.dedent(
    """
    import os, pathlib, sys, time
    from backpack_vault.config import load
    from backpack_vault.daemon import Daemon
    from backpack_vault.logging import configure

    marker = pathlib.Path(os.environ["TEST_MARKER"])

    def slow_report(ref, reason):
        marker.write_text("in flight")
        time.sleep(1.0)

    configure("json", stream=sys.stderr)
    sys.exit(Daemon(load(os.environ), report=slow_report).run())
    """
)


class TestSignals:
    def test_sigterm_drains_in_flight_requests_and_exits_0(
        self, dev_vault: DevVault, vault: Vault, vault_settings: VaultSettings, tmp_path: Path
    ) -> None:
        """A real process: SIGTERM lets the running request finish, then exits with 0."""
        store_key(vault, REF)
        port = free_port()
        marker = tmp_path / "marker"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "VAULT_ADDR": dev_vault.addr,
            "VAULT_TOKEN": dev_vault.root_token.reveal(),
            "BACKPACK_VAULT_LISTEN": f"127.0.0.1:{port}",
            "BACKPACK_VAULT_KV_PREFIX": vault_settings.kv_prefix,
            "BACKPACK_VAULT_GRANT_PREFIX": vault_settings.grant_prefix,
            "TEST_MARKER": str(marker),
        }
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:

            def up() -> bool:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                try:
                    return httpx.get(f"{url}/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(up, timeout=30)
            answers: list[httpx.Response] = []
            report = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(
                        f"{url}/v1/keys/main/bot-a/report",
                        headers={"X-Vault-Token": dev_vault.root_token.reveal()},
                        timeout=10,
                    )
                )
            )
            report.start()
            wait_until(marker.exists, TIMEOUT)
            proc.send_signal(signal.SIGTERM)
            report.join(10)
            _, stderr = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert [a.status_code for a in answers] == [202]
        assert proc.returncode == 0
        assert b"daemon.draining" in stderr
        assert b"daemon.stopped" in stderr
