"""The worker's own Vault login: AppRole, renewal, a fresh login after the token dies, backoff.

Against the session's real OpenBao dev server and a daemon serving loopback HTTP;
the login's clock is a FakeClock, so renewal is tested without waiting for a TTL.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from backpack_vault.client.broker import BrokerClient
from backpack_vault.client.vault_auth import AsyncVaultLogin, VaultAuth, VaultLogin, client_env
from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyRef
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault, free_port
from backpack_vault.errors import ConfigError, NotAuthenticated
from backpack_vault.testing import FakeClock, store_key, wait_until
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.setup import render_worker_policy

REF = KeyRef("main", "bot-a")


@dataclass
class Role:
    role_id: str
    secret_id: Secret
    name: str


@pytest.fixture
def role(vault: Vault, vault_settings: VaultSettings, kv_prefix: str) -> Role:
    """An AppRole role whose tokens may fetch copies of REF; tokens live 60 s."""
    setup = Provisioner(vault)
    setup.ensure_auth("approle")
    policy = f"{kv_prefix}-worker"
    setup.ensure_policy(
        policy, render_worker_policy(vault_settings.grant_prefix, "main", copy=True)
    )
    name = f"{kv_prefix}-bot"
    setup.ensure_approle_role(name, [policy], token_ttl="60s")
    role_id, secret_id = setup.approle_credentials(name)
    return Role(role_id, secret_id, name)


@pytest.fixture
def served(vault_settings: VaultSettings) -> Iterator[str]:
    # Grant decisions cached for 1 ms: a revoked token is refused at once.
    broker = BrokerSettings(decision_cache_s=0.001)
    daemon = Daemon(Settings(vault_settings, broker, CheckSettings()))
    with daemon, ServerThread(daemon.app) as server:
        yield server.url


def files(tmp_path: Path, role: Role) -> VaultAuth:
    (tmp_path / "role-id").write_text(role.role_id + "\n")
    (tmp_path / "secret-id").write_text(role.secret_id.reveal())
    return VaultAuth.approle(
        role_id_file=tmp_path / "role-id", secret_id_file=tmp_path / "secret-id"
    )


def revoke(dev_vault: DevVault, token: Secret) -> None:
    httpx.post(
        f"{dev_vault.addr}/v1/auth/token/revoke",
        headers={"X-Vault-Token": dev_vault.root_token.reveal()},
        json={"token": token.reveal()},
    ).raise_for_status()


def ttl_of(dev_vault: DevVault, token: Secret) -> int:
    answer = httpx.get(
        f"{dev_vault.addr}/v1/auth/token/lookup-self", headers={"X-Vault-Token": token.reveal()}
    )
    answer.raise_for_status()
    return int(answer.json()["data"]["ttl"])


class TestAppRole:
    def test_a_worker_logs_in_with_role_and_secret_id_files(
        self, tmp_path: Path, role: Role, served: str, dev_vault: DevVault, vault: Vault
    ) -> None:
        """No token anywhere: the client logs in and fetches a copy."""
        pair = store_key(vault, REF)
        with BrokerClient(served, vault_addr=dev_vault.addr, auth=files(tmp_path, role)) as b:
            assert b.copy(REF).api_key == pair.api_key
            assert b.login.state.logins == 1

    def test_from_env_reads_the_worker_variables(
        self, role: Role, served: str, dev_vault: DevVault, vault: Vault
    ) -> None:
        pair = store_key(vault, REF)
        environ = {
            "BACKPACK_VAULT_DAEMON_URL": served,
            "VAULT_ADDR": dev_vault.addr,
            "BACKPACK_VAULT_WORKER_AUTH": "approle",
            "BACKPACK_VAULT_WORKER_ROLE_ID": role.role_id,
            "BACKPACK_VAULT_WORKER_SECRET_ID": role.secret_id.reveal(),
        }
        with BrokerClient.from_env(environ) as broker:
            assert broker.copy(REF).api_key == pair.api_key

    def test_a_bad_secret_id_is_not_authenticated_and_backs_off(
        self, tmp_path: Path, role: Role, dev_vault: DevVault
    ) -> None:
        """A refused login is raised again without asking Vault until the backoff passes."""
        (tmp_path / "secret-id").write_text("not-the-secret-id")
        auth = VaultAuth.approle(role_id=role.role_id, secret_id_file=tmp_path / "secret-id")
        sent: list[str] = []
        clock = FakeClock(0.0)
        with httpx.Client(event_hooks={"request": [lambda r: sent.append(r.url.path)]}) as http:
            login = VaultLogin(auth, dev_vault.addr, http, clock=clock, background=False)
            with pytest.raises(NotAuthenticated, match="approle login"):
                login.token()
            with pytest.raises(NotAuthenticated):
                login.token()
            assert len(sent) == 1
            (tmp_path / "secret-id").write_text(role.secret_id.reveal())
            clock.advance(0.5)
            assert login.token()
        assert len(sent) == 2


class TestRenewal:
    def test_the_token_is_renewed_at_two_thirds_of_its_ttl(
        self, tmp_path: Path, role: Role, dev_vault: DevVault
    ) -> None:
        clock = FakeClock(0.0)
        with httpx.Client() as http:
            login = VaultLogin(
                files(tmp_path, role), dev_vault.addr, http, clock=clock, background=False
            )
            token = login.token()
            clock.advance(30)
            assert login.token() == token
            assert login.state.renewals == 0
            clock.advance(11)  # 41 s of 60
            assert login.token() == token
            assert (login.state.renewals, login.state.logins) == (1, 1)
            assert ttl_of(dev_vault, token) > 50

    def test_a_failed_renewal_logs_in_again(
        self, tmp_path: Path, role: Role, dev_vault: DevVault
    ) -> None:
        clock = FakeClock(0.0)
        with httpx.Client() as http:
            login = VaultLogin(
                files(tmp_path, role), dev_vault.addr, http, clock=clock, background=False
            )
            first = login.token()
            revoke(dev_vault, first)
            clock.advance(45)
            second = login.token()
        assert second != first
        assert login.state.logins == 2


class TestDeadToken:
    def test_a_revoked_worker_token_is_replaced_by_a_fresh_login(
        self, tmp_path: Path, role: Role, served: str, dev_vault: DevVault, vault: Vault
    ) -> None:
        """The daemon refuses the revoked token; the client logs in again and retries once."""
        pair = store_key(vault, REF)
        with BrokerClient(served, vault_addr=dev_vault.addr, auth=files(tmp_path, role)) as b:
            b.copy(REF)
            revoke(dev_vault, b.login.token())
            time.sleep(0.01)  # past the daemon's decision cache
            assert b.copy(REF).api_key == pair.api_key
            assert b.login.state.logins == 2

    def test_a_static_token_is_only_reported(
        self, served: str, dev_vault: DevVault, vault: Vault
    ) -> None:
        store_key(vault, REF)
        token = Provisioner(vault).create_token(["default"])
        revoke(dev_vault, token)
        with (
            BrokerClient(served, vault_addr=dev_vault.addr, token=token) as broker,
            pytest.raises(NotAuthenticated),
        ):
            broker.copy(REF)


def token_with(dev_vault: DevVault, *, ttl: str, renewable: bool) -> Secret:
    """A static token as an operator hands one out: default policy, its own TTL."""
    answer = httpx.post(
        f"{dev_vault.addr}/v1/auth/token/create",
        headers={"X-Vault-Token": dev_vault.root_token.reveal()},
        json={"policies": ["default"], "ttl": ttl, "renewable": renewable},
    )
    answer.raise_for_status()
    return Secret(str(answer.json()["auth"]["client_token"]))


def lookup(dev_vault: DevVault, token: Secret) -> dict[str, Any]:
    answer = httpx.get(
        f"{dev_vault.addr}/v1/auth/token/lookup-self", headers={"X-Vault-Token": token.reveal()}
    )
    answer.raise_for_status()
    return dict(answer.json()["data"])


def short_role(vault: Vault, vault_settings: VaultSettings, kv_prefix: str, tmp_path: Path) -> Any:
    """An AppRole whose tokens live 3 s, as files on disk: renewal within a test's time."""
    setup = Provisioner(vault)
    setup.ensure_auth("approle")
    policy = f"{kv_prefix}-worker"
    setup.ensure_policy(
        policy, render_worker_policy(vault_settings.grant_prefix, "main", copy=True)
    )
    name = f"{kv_prefix}-short"
    setup.ensure_approle_role(name, [policy], token_ttl="3s")
    role_id, secret_id = setup.approle_credentials(name)
    return files(tmp_path, Role(role_id, secret_id, name))


class TestStaticToken:
    def test_a_renewable_static_token_is_renewed_at_two_thirds_of_its_ttl(
        self, dev_vault: DevVault
    ) -> None:
        """Looked up once for its TTL, then renewed like a login's token."""
        token = token_with(dev_vault, ttl="60s", renewable=True)
        clock = FakeClock(0.0)
        with httpx.Client() as http:
            login = VaultLogin(
                VaultAuth.token(token), dev_vault.addr, http, clock=clock, background=False
            )
            assert login.token() == token
            clock.advance(30)
            assert login.token() == token
            assert "last_renewal" not in lookup(dev_vault, token)
            clock.advance(11)  # 41 s of 60
            assert login.token() == token
        assert (login.state.renewals, login.state.logins) == (1, 0)
        assert "last_renewal" in lookup(dev_vault, token)

    def test_a_renewable_static_token_outlives_its_ttl_while_unused(
        self, dev_vault: DevVault
    ) -> None:
        """The renewal runs in the background: a bot that does not call the daemon for
        longer than its token's TTL still finds the token valid."""
        token = token_with(dev_vault, ttl="2s", renewable=True)
        with BrokerClient("http://127.0.0.1:9", vault_addr=dev_vault.addr, token=token) as b:
            assert b.login.token() == token
            wait_until(lambda: b.login.state.renewals >= 2, 10, "two renewals")
            assert lookup(dev_vault, token)["ttl"] > 0  # 2.6 s and more after a 2 s TTL

    def test_a_non_renewable_token_warns_once_before_it_expires_and_never_fails(
        self, dev_vault: DevVault, caplog: pytest.LogCaptureFixture
    ) -> None:
        token = token_with(dev_vault, ttl="60s", renewable=False)
        clock = FakeClock(0.0)
        with httpx.Client() as http, caplog.at_level(logging.WARNING, "backpack_vault.client"):
            login = VaultLogin(
                VaultAuth.token(token), dev_vault.addr, http, clock=clock, background=False
            )
            assert login.token() == token
            clock.advance(30)
            login.token()
            assert caplog.records == []
            clock.advance(11)  # a third of its TTL is left
            login.token()
            clock.advance(10)
            login.token()
            clock.advance(60)  # expired: still handed out, the daemon says what it thinks
            assert login.token() == token
        [warning] = caplog.records
        assert warning.levelno == logging.WARNING
        assert re.search(r"expires in 1[89] s and cannot be renewed", warning.getMessage())
        assert token.reveal() not in caplog.text
        assert login.state.renewals == 0

    def test_vault_unreachable_at_lookup_leaves_the_token_usable(self) -> None:
        token = Secret("s.static")
        with httpx.Client() as http:
            login = VaultLogin(VaultAuth.token(token), f"http://127.0.0.1:{free_port()}", http)
            assert login.token() == token
            assert login.token() == token  # asked again only after the backoff


class TestBackground:
    def test_a_logins_token_is_renewed_while_the_bot_is_idle(
        self,
        tmp_path: Path,
        served: str,
        dev_vault: DevVault,
        vault: Vault,
        vault_settings: VaultSettings,
        kv_prefix: str,
    ) -> None:
        pair = store_key(vault, REF)
        auth = short_role(vault, vault_settings, kv_prefix, tmp_path)
        with BrokerClient(served, vault_addr=dev_vault.addr, auth=auth) as broker:
            token = broker.login.token()
            wait_until(lambda: broker.login.state.renewals >= 2, 10, "two renewals")
            assert lookup(dev_vault, token)["ttl"] > 0  # 4 s after a 3 s login
            assert broker.copy(REF).api_key == pair.api_key
            assert (broker.login.state.logins, broker.login.token()) == (1, token)

    def test_a_dead_token_is_replaced_by_a_fresh_login_in_the_background(
        self,
        tmp_path: Path,
        served: str,
        dev_vault: DevVault,
        vault: Vault,
        vault_settings: VaultSettings,
        kv_prefix: str,
    ) -> None:
        """Its renewal is refused; the background logs in again, before any use."""
        store_key(vault, REF)
        auth = short_role(vault, vault_settings, kv_prefix, tmp_path)
        with BrokerClient(served, vault_addr=dev_vault.addr, auth=auth) as broker:
            first = broker.login.token()
            revoke(dev_vault, first)
            wait_until(lambda: broker.login.state.logins == 2, 10, "a fresh login")
            assert broker.login.token() != first

    def test_failed_logins_back_off(
        self,
        tmp_path: Path,
        dev_vault: DevVault,
        vault: Vault,
        vault_settings: VaultSettings,
        kv_prefix: str,
    ) -> None:
        """With the secret-id gone bad, logins are tried again after 0.2, 0.4, 0.8 s ...,
        never in a loop; once it is good again, the next try logs in."""
        auth = short_role(vault, vault_settings, kv_prefix, tmp_path)
        tried: list[float] = []

        def note(request: httpx.Request) -> None:
            if request.url.path.endswith("/login"):
                tried.append(time.monotonic())

        with httpx.Client(event_hooks={"request": [note]}) as http:
            login = VaultLogin(auth, dev_vault.addr, http, backoff_s=(0.2, 0.8))
            first = login.token()
            (tmp_path / "secret-id").write_text("not-the-secret-id")
            revoke(dev_vault, first)
            wait_until(lambda: len(tried) >= 5, 15, "four failed logins")
            (tmp_path / "secret-id").write_text(auth_secret(vault, kv_prefix))
            wait_until(lambda: login.state.logins == 2, 10, "a login once the secret-id works")
            login.close()
        gaps = [later - earlier for earlier, later in itertools.pairwise(tried[1:])]
        assert all(gap >= wanted * 0.9 for gap, wanted in zip(gaps, [0.2, 0.4, 0.8], strict=False))

    def test_the_async_login_renews_in_a_task(
        self,
        tmp_path: Path,
        dev_vault: DevVault,
        vault: Vault,
        vault_settings: VaultSettings,
        kv_prefix: str,
    ) -> None:
        auth = short_role(vault, vault_settings, kv_prefix, tmp_path)

        async def run() -> tuple[int, int, float]:
            async with httpx.AsyncClient() as http:
                login = AsyncVaultLogin(auth, dev_vault.addr, http)
                token = await login.token()
                deadline = time.monotonic() + 10
                while login.state.renewals < 2 and time.monotonic() < deadline:  # noqa: ASYNC110 - the task it waits for changes no Event
                    await asyncio.sleep(0.05)
                ttl = await asyncio.to_thread(lookup, dev_vault, token)
                await login.aclose()
                return login.state.renewals, login.state.logins, ttl["ttl"]

        renewals, logins, ttl = asyncio.run(run())
        assert (renewals >= 2, logins, ttl > 0) == (True, 1, True)


def auth_secret(vault: Vault, kv_prefix: str) -> str:
    """A fresh, good secret-id of the short role."""
    _, secret_id = Provisioner(vault).approle_credentials(f"{kv_prefix}-short")
    return secret_id.reveal()


class TestEnvironment:
    @pytest.mark.parametrize(
        ("environ", "method"),
        [
            ({"VAULT_TOKEN": "s.x"}, "token"),
            ({"BACKPACK_VAULT_WORKER_TOKEN_FILE": "/t"}, "token-file"),
            (
                {"BACKPACK_VAULT_WORKER_AUTH": "kubernetes", "BACKPACK_VAULT_WORKER_K8S_ROLE": "r"},
                "kubernetes",
            ),
        ],
        ids=["token", "token-file", "kubernetes"],
    )
    def test_the_method_follows_the_variables(self, environ: dict[str, str], method: str) -> None:
        assert VaultAuth.from_env(environ).method == method

    def test_the_daemon_ca_wins(self) -> None:
        found = client_env(
            {
                "BACKPACK_VAULT_DAEMON_URL": "https://d",
                "VAULT_ADDR": "https://v",
                "VAULT_TOKEN": "s.x",
                "VAULT_CACERT": "/v.pem",
                "BACKPACK_VAULT_DAEMON_CACERT": "/d.pem",
            }
        )
        assert (found.url, found.vault_addr, found.verify) == ("https://d", "https://v", "/d.pem")

    @pytest.mark.parametrize(
        "environ",
        [{}, {"BACKPACK_VAULT_WORKER_AUTH": "ldap"}, {"BACKPACK_VAULT_WORKER_AUTH": "approle"}],
        ids=["nothing", "unknown-method", "approle-without-ids"],
    )
    def test_missing_settings_are_config_errors(self, environ: dict[str, str]) -> None:
        with pytest.raises(ConfigError):
            VaultAuth.from_env(environ)
