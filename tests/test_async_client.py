"""AsyncBrokerClient: copy and sign modes under an httpx.AsyncClient, the watch, auto-auth.

A real daemon on loopback over the session's OpenBao; Backpack is a small verifier
behind ``httpx.MockTransport`` that checks each signature as the exchange does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import signing_string, verify
from backpack_vault.client.aio import AsyncBrokerClient
from backpack_vault.client.vault_auth import VaultAuth
from backpack_vault.config import BrokerSettings, CheckSettings, Settings, VaultSettings
from backpack_vault.core.keys import KeyPair, KeyRef, Status, generate_pair
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import AccessDenied, KeyNotUsable, KeyRetired, KeyRevoked
from backpack_vault.testing import now_iso, store_key
from backpack_vault.testing.sandbox import SandboxAdmin
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.setup import render_worker_policy

REF = KeyRef("main", "bot-a")
BOUND = 10.0
BACKPACK = "https://api.backpack.exchange"


def rotate(vault: Vault, ref: KeyRef) -> KeyPair:
    """A new key under the same name (a new KV version), published on the change feed."""
    pair = generate_pair()
    kv = vault._client.secrets.kv.v2
    path = vault._path(ref)
    record = vault.read_record(ref)
    kv.create_or_update_secret(
        path=path,
        secret={"api_key": pair.api_key, "api_secret": pair.secret.reveal()},
        cas=record.version,
        mount_point=vault._mount,
    )
    kv.update_metadata(
        path=path,
        cas_required=True,
        custom_metadata=dataclasses.replace(record, api_key=pair.api_key).to_metadata(),
        mount_point=vault._mount,
    )
    vault.publish_change(ref, Status.ACTIVE, at=now_iso())
    return pair


def backpack(accepted: list[str]) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        endpoint = lookup(request.method, request.url.path)
        params = json.loads(request.content) if request.content else dict(request.url.params)
        message = signing_string(
            endpoint.instruction,
            params or None,
            int(request.headers["X-Timestamp"]),
            int(request.headers["X-Window"]),
        )
        if not verify(request.headers["X-API-Key"], message, request.headers["X-Signature"]):
            return httpx.Response(400, json={"code": "INVALID_CLIENT_REQUEST", "message": "sig"})
        accepted.append(endpoint.instruction)
        return httpx.Response(200, json={})

    return httpx.MockTransport(answer)


@pytest.fixture
def served(vault_settings: VaultSettings) -> Iterator[str]:
    settings = Settings(vault_settings, BrokerSettings(), CheckSettings())
    daemon = Daemon(settings, feed_interval_s=0.05, watch_heartbeat_s=0.2)
    with daemon, ServerThread(daemon.app) as server:
        yield server.url


class TestModes:
    @pytest.mark.parametrize("mode", ["copy", "sign"])
    def test_requests_are_signed(
        self, mode: str, served: str, dev_vault: DevVault, vault: Vault
    ) -> None:
        pair = store_key(vault, REF)

        async def run() -> list[str]:
            accepted: list[str] = []
            async with AsyncBrokerClient(
                served, vault_addr=dev_vault.addr, token=dev_vault.root_token
            ) as broker:
                auth = broker.auth(REF, mode=mode)  # type: ignore[arg-type]
                async with httpx.AsyncClient(
                    base_url="https://api.backpack.exchange",
                    auth=auth,
                    transport=backpack(accepted),
                ) as client:
                    await client.get("/api/v1/capital")
                    await client.get("/api/v1/capital")
                copy = await broker.copy(REF)
                assert copy.api_key == pair.api_key
            return accepted

        assert asyncio.run(run()) == ["balanceQuery", "balanceQuery"]

    def test_a_worker_without_a_grant_is_denied(
        self, served: str, dev_vault: DevVault, vault: Vault
    ) -> None:
        store_key(vault, REF)
        token = Provisioner(vault).create_token(["default"])

        async def run() -> None:
            async with AsyncBrokerClient(served, vault_addr=dev_vault.addr, token=token) as b:
                await b.copy(REF)

        with pytest.raises(AccessDenied):
            asyncio.run(run())


class TestWatch:
    def test_async_for_sees_the_retirement(
        self, served: str, dev_vault: DevVault, vault: Vault
    ) -> None:
        store_key(vault, REF)

        async def run() -> list[str]:
            names: list[str] = []
            async with AsyncBrokerClient(
                served, vault_addr=dev_vault.addr, token=dev_vault.root_token
            ) as broker:
                events = broker.watch(REF)
                async for event in events:
                    if event.event == "heartbeat":
                        continue
                    names.append(event.event)
                    if event.event == "status":
                        await asyncio.to_thread(
                            vault.set_status, REF, Status.RETIRED, now=now_iso()
                        )
                    if event.final:
                        break
                await events.aclose()
                try:
                    await broker.copy(REF)
                except KeyRetired:
                    names.append("refused")
            return names

        assert asyncio.run(asyncio.wait_for(run(), BOUND)) == ["status", "retired", "refused"]


class TestAutoAuth:
    def test_approle_login_from_files(
        self,
        tmp_path: Path,
        served: str,
        dev_vault: DevVault,
        vault: Vault,
        vault_settings: VaultSettings,
        kv_prefix: str,
    ) -> None:
        pair = store_key(vault, REF)
        setup = Provisioner(vault)
        setup.ensure_auth("approle")
        policy = f"{kv_prefix}-worker"
        setup.ensure_policy(
            policy, render_worker_policy(vault_settings.grant_prefix, "main", copy=True)
        )
        setup.ensure_approle_role(f"{kv_prefix}-bot", [policy])
        role_id, secret_id = setup.approle_credentials(f"{kv_prefix}-bot")
        (tmp_path / "secret-id").write_text(secret_id.reveal())
        auth = VaultAuth.approle(role_id=role_id, secret_id_file=tmp_path / "secret-id")

        async def run() -> str:
            async with AsyncBrokerClient(served, vault_addr=dev_vault.addr, auth=auth) as b:
                return (await b.copy(REF)).api_key

        assert asyncio.run(run()) == pair.api_key


@dataclass
class Counted:
    """An httpx.AsyncClient that notes the path of every request it sends."""

    paths: list[str] = field(default_factory=list)

    def client(self) -> httpx.AsyncClient:
        async def note(request: httpx.Request) -> None:
            self.paths.append(request.url.path)

        return httpx.AsyncClient(event_hooks={"request": [note]})

    def count(self, suffix: str) -> int:
        return self.paths.count(f"/v1/keys/{REF}{suffix}")


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll on the loop (the watch task must run meanwhile) until ``condition`` holds."""
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {BOUND:g} s")
        await asyncio.sleep(0.01)


class TestCopyModeWatch:
    @pytest.mark.parametrize(
        ("status", "error"),
        [(Status.RETIRED, KeyRetired), (Status.REVOKED, KeyRevoked)],
        ids=["retired", "revoked"],
    )
    def test_a_cut_off_reaches_the_auth_through_its_watch_task(
        self,
        served: str,
        dev_vault: DevVault,
        vault: Vault,
        status: Status,
        error: type[KeyNotUsable],
    ) -> None:
        """The watch runs as a task: the next request raises without a round trip."""
        store_key(vault, REF)
        counted = Counted()

        async def run() -> None:
            async with (
                counted.client() as http,
                AsyncBrokerClient(
                    served, vault_addr=dev_vault.addr, token=dev_vault.root_token, http=http
                ) as broker,
            ):
                auth = broker.auth(REF)
                async with httpx.AsyncClient(auth=auth, transport=backpack([])) as client:
                    await client.get(f"{BACKPACK}/api/v1/capital")
                    await until(lambda: auth.watching, "the watch connects")
                    await asyncio.to_thread(vault.set_status, REF, status, now=now_iso())
                    await until(lambda: auth.unusable == status.value, "the watch tells")
                    for _ in range(2):
                        with pytest.raises(error):
                            await client.get(f"{BACKPACK}/api/v1/capital")

        asyncio.run(asyncio.wait_for(run(), BOUND * 2))
        assert counted.count("/copy") == 1

    def test_a_rotation_makes_the_next_request_fetch_the_successor(
        self, served: str, dev_vault: DevVault, vault: Vault
    ) -> None:
        first = store_key(vault, REF)
        counted = Counted()
        keys: list[str] = []

        async def run() -> str:
            async with (
                counted.client() as http,
                AsyncBrokerClient(
                    served, vault_addr=dev_vault.addr, token=dev_vault.root_token, http=http
                ) as broker,
            ):
                auth = broker.auth(REF)
                assert auth.copies is not None
                copies = auth.copies
                async with httpx.AsyncClient(auth=auth, transport=backpack([])) as client:
                    keys.append((await auth.current_copy()).api_key)
                    await client.get(f"{BACKPACK}/api/v1/capital")
                    await until(lambda: auth.watching, "the watch connects")
                    second = await asyncio.to_thread(rotate, vault, REF)
                    await until(lambda: not copies.held, "the watch drops the copy")
                    await client.get(f"{BACKPACK}/api/v1/capital")
                    keys.append((await auth.current_copy()).api_key)
                    return second.api_key

        second = asyncio.run(asyncio.wait_for(run(), BOUND * 2))
        assert keys == [first.api_key, second]
        assert counted.count("/copy") == 2

    def test_aclose_ends_the_watch_task(
        self, served: str, dev_vault: DevVault, vault: Vault
    ) -> None:
        store_key(vault, REF)

        async def run() -> list[str]:
            broker = AsyncBrokerClient(
                served, vault_addr=dev_vault.addr, token=dev_vault.root_token
            )
            auth = broker.auth(REF)
            await auth.current_copy()
            await until(lambda: auth.watching, "the watch connects")
            assert watch_tasks() == [f"backpack-vault-watch:{REF}"]
            await broker.aclose()
            return watch_tasks()

        assert asyncio.run(asyncio.wait_for(run(), BOUND)) == []


def watch_tasks() -> list[str]:
    return [
        task.get_name()
        for task in asyncio.all_tasks()
        if task.get_name().startswith("backpack-vault-watch") and not task.done()
    ]


@pytest.fixture
def checked(vault_settings: VaultSettings, vault: Vault, sandbox: SandboxAdmin) -> Iterator[str]:
    """A daemon that checks reported keys against the sandbox, as `serve` does."""
    settings = Settings(vault_settings, BrokerSettings(), CheckSettings(backpack_url=sandbox.url))
    daemon = Daemon(settings, vault=vault, confirm_delay_s=0, feed_interval_s=0.05)
    with daemon, ServerThread(daemon.app) as server:
        yield server.url


class TestRejectionInCopyMode:
    def test_one_report_then_the_verdict_is_awaited_and_raised(
        self, checked: str, dev_vault: DevVault, vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        """Revoked at the exchange: the request is reported once, the daemon's verdict
        awaited (by the watch task), KeyRevoked raised; later requests raise at once."""
        pair = store_key(vault, REF, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        counted = Counted()

        async def run() -> None:
            async with (
                counted.client() as http,
                AsyncBrokerClient(
                    checked, vault_addr=dev_vault.addr, token=dev_vault.root_token, http=http
                ) as broker,
            ):
                auth = broker.auth(REF, confirm_s=15)  # generous: the verdict comes in < 1 s
                async with httpx.AsyncClient(base_url=sandbox.url, auth=auth) as bot:
                    assert (await bot.get("/api/v1/capital")).status_code == 200
                    await until(lambda: auth.watching, "the watch connects")
                    sandbox.revoke(pair.api_key)
                    for _ in range(2):
                        with pytest.raises(KeyRevoked):
                            await bot.get("/api/v1/capital")

        asyncio.run(asyncio.wait_for(run(), 30))
        assert sandbox.count("GET /api/v1/capital", pair.api_key) == 2
        assert (counted.count("/report"), counted.count("/copy")) == (1, 1)
        assert counted.count("") <= 1  # at most one info: the watch brought the verdict
        assert vault.read_record(REF).status is Status.REVOKED

    def test_sign_mode_reports_once_and_returns_backpacks_answer(
        self, checked: str, dev_vault: DevVault, vault: Vault, sandbox: SandboxAdmin
    ) -> None:
        pair = store_key(vault, REF, exchange=sandbox.url)
        sandbox.register(pair.api_key)
        counted = Counted()

        async def run() -> int:
            async with (
                counted.client() as http,
                AsyncBrokerClient(
                    checked, vault_addr=dev_vault.addr, token=dev_vault.root_token, http=http
                ) as broker,
                httpx.AsyncClient(base_url=sandbox.url, auth=broker.auth(REF, "sign")) as bot,
            ):
                sandbox.revoke(pair.api_key)
                return (await bot.get("/api/v1/capital")).status_code

        assert asyncio.run(asyncio.wait_for(run(), 30)) == 401
        assert counted.count("/report") == 1
