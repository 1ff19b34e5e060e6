"""AsyncBrokerClient: copy and sign modes under an httpx.AsyncClient, the watch, auto-auth.

A real daemon on loopback over the session's OpenBao; Backpack is a small verifier
behind ``httpx.MockTransport`` that checks each signature as the exchange does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import signing_string, verify
from backpack_vault.client.aio import AsyncBrokerClient
from backpack_vault.client.vault_auth import VaultAuth
from backpack_vault.config import BrokerSettings, CheckSettings, Settings, VaultSettings
from backpack_vault.core.keys import KeyRef, Status
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import AccessDenied, KeyRetired
from backpack_vault.testing import now_iso, store_key
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.setup import render_worker_policy

REF = KeyRef("main", "bot-a")
BOUND = 10.0


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
