"""The daemon's lifecycle: login, token renewal, readiness, Vault outages, jobs, SIGTERM.

Real OpenBao everywhere: the session's dev server, plus a separate one for the
outage test (it gets SIGSTOPped, which would stall every other test).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyRecord, KeyRef, Origin, Status, generate_pair
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault, free_port
from backpack_vault.errors import ConfigError, ServiceError, VaultDenied, VaultUnavailable
from backpack_vault.vault.client import Vault

NOW = "2025-01-01T00:00:00+00:00"
REF = KeyRef("main", "bot-a")


def store(vault: Vault, ref: KeyRef = REF) -> None:
    pair = generate_pair()
    record = KeyRecord(
        ref=ref,
        api_key=pair.api_key,
        read_only=False,
        status=Status.ACTIVE,
        origin=Origin.BACKPACK_UI,
        created_at=NOW,
        status_since=NOW,
    )
    vault.create_key(record, pair.secret)


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.05)


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
        assert daemon.readiness() == (True, "")
        assert httpx.get(f"{url}/readyz").status_code == 200
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
    def test_login_fails_fast_with_a_clear_error(
        self,
        dev_vault: DevVault,
        vault: dict[str, Any],
        error: type[ServiceError],
        match: str,
    ) -> None:
        """run() raises our error before serving anything; nothing is left running."""
        if vault.get("addr") == "UNREACHABLE":
            vault["addr"] = f"http://127.0.0.1:{free_port()}"
        options: dict[str, Any] = {"addr": dev_vault.addr, "token": dev_vault.root_token} | vault
        listen = f"127.0.0.1:{free_port()}"
        daemon = Daemon(settings_for(VaultSettings(**options, timeout=1), listen=listen))
        with pytest.raises(error, match=match):
            daemon.run()
        assert not daemon.scheduler.running
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class TestJobs:
    def test_add_job_runs_a_callable_periodically(self, running: tuple[Daemon, str]) -> None:
        """The seam for check jobs: add_job schedules a plain callable at an interval."""
        daemon, _ = running
        runs: list[float] = []
        daemon.add_job(lambda: runs.append(time.monotonic()), seconds=0.05, job_id="test.tick")
        wait_until(lambda: len(runs) >= 2)
        assert daemon.scheduler.get_job("test.tick") is not None

    def test_run_soon_runs_once(self, running: tuple[Daemon, str]) -> None:
        """run_soon runs a callable once, off the request path (e.g. a reported key's check)."""
        daemon, _ = running
        done = threading.Event()
        daemon.run_soon(done.set, job_id="test.once")
        assert done.wait(5)

    def test_a_status_change_cascades_to_copies_and_metrics(
        self, running: tuple[Daemon, str], vault: Vault, dev_vault: DevVault
    ) -> None:
        """key_status_changed revokes unclaimed copies and sets the key status gauge."""
        daemon, url = running
        store(vault)
        headers = {"X-Vault-Token": dev_vault.root_token.reveal()}
        wrap = httpx.post(f"{url}/v1/keys/main/bot-a/copy", headers=headers).json()["wrap_token"]
        vault.set_status(REF, Status.REVOKED, now=NOW, verdict="REJECTED")
        assert daemon.key_status_changed(REF, Status.REVOKED) == 1
        assert not wrap_token_alive(dev_vault.addr, wrap)
        metrics = httpx.get(f"{url}/metrics").text
        assert 'backpack_vault_key_status{key="main/bot-a",status="revoked"} 1.0' in metrics
        assert 'backpack_vault_key_status{key="main/bot-a",status="active"} 0.0' in metrics

    def test_a_key_retired_with_the_cli_loses_its_copies_by_itself(
        self, running: tuple[Daemon, str], vault: Vault, dev_vault: DevVault
    ) -> None:
        """The sweep job notices a retirement written to Vault and revokes unclaimed copies."""
        _, url = running
        store(vault)
        headers = {"X-Vault-Token": dev_vault.root_token.reveal()}
        wrap = httpx.post(f"{url}/v1/keys/main/bot-a/copy", headers=headers).json()["wrap_token"]
        vault.set_status(REF, Status.RETIRED, now=NOW)  # what `keys retire` does
        wait_until(lambda: not wrap_token_alive(dev_vault.addr, wrap))
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
            assert daemon.readiness() == (True, "")
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

            wait_until(switched)
            assert daemon.readiness() == (True, "")

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
            wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 503)
            assert "not logged in" in httpx.get(f"{server.url}/readyz").json()["reason"]
            assert (
                "backpack_vault_vault_authenticated 0.0" in httpx.get(f"{server.url}/metrics").text
            )
            token_file.write_text(
                new_token(dev_vault.addr, dev_vault.root_token, ttl="1h").reveal()
            )
            wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 200)


class TestVaultOutage:
    def test_a_hung_vault_degrades_to_503_and_recovers_by_itself(self) -> None:
        """While Vault is stopped, /readyz and handouts are 503; after SIGCONT all is well again."""
        with DevVault() as own:
            options = VaultSettings(
                addr=own.addr, token=own.root_token, kv_prefix="outage", timeout=0.5
            )
            vault = Vault(options)
            vault.login()
            store(vault)
            daemon = Daemon(settings_for(options), vault=vault, health_interval_s=0.2)
            headers = {"X-Vault-Token": own.root_token.reveal()}
            with daemon, ServerThread(daemon.app) as server:
                copy = f"{server.url}/v1/keys/main/bot-a/copy"
                assert httpx.post(copy, headers=headers).status_code == 200
                own.pause()
                try:
                    wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 503)
                    refused = httpx.post(copy, headers=headers, timeout=10)
                    assert refused.status_code == 503
                    assert refused.json()["error"]["code"] == "vault_unavailable"
                    assert "Vault is unavailable" in refused.json()["error"]["message"]
                    assert httpx.get(f"{server.url}/healthz").status_code == 200
                finally:
                    own.resume()
                wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 200)
                assert httpx.post(copy, headers=headers).status_code == 200
                assert daemon.scheduler.running
            vault.close()


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
        store(vault)
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
            wait_until(marker.exists)
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
