"""The broker: Vault decides every grant, copies are single-use and short-lived, statuses win.

Everything that touches Vault runs against the session's real OpenBao dev server;
policies, tokens and AppRole roles are created there for each scenario.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.server
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from backpack_vault import sign_request
from backpack_vault.backpack.signing import signing_string, verify
from backpack_vault.broker import COPY, Broker
from backpack_vault.config import BrokerSettings, Secret, VaultSettings
from backpack_vault.core.caches import Ledger
from backpack_vault.core.clock import iso_utc
from backpack_vault.core.keys import KeyRef, Status, generate_pair
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import (
    InvalidInput,
    KeyNotUsable,
    NotAuthenticated,
    NotPermitted,
    ReadOnlyKey,
    ServiceError,
    UnknownKey,
    VaultUnavailable,
)
from backpack_vault.events import Cause, CopiesRevoked, Event, EventBus, KeyStatusChanged
from backpack_vault.testing import NOW, FakeClock, store_key, wait_until
from backpack_vault.vault.client import Provisioner, Vault


def unwrap(addr: str, wrap_token: Secret) -> httpx.Response:
    """Unwrap exactly as a worker does: the wrapping token is the request's token."""
    return httpx.post(
        f"{addr}/v1/sys/wrapping/unwrap", headers={"X-Vault-Token": wrap_token.reveal()}
    )


def wrap_token_alive(addr: str, wrap_token: Secret) -> bool:
    """sys/wrapping/lookup: does not use the token up."""
    answer = httpx.post(f"{addr}/v1/sys/wrapping/lookup", json={"token": wrap_token.reveal()})
    return answer.status_code == 200


def settings(**overrides: Any) -> BrokerSettings:
    return BrokerSettings(**overrides)


def retired(ref: KeyRef, old: Status | None = Status.ACTIVE) -> KeyStatusChanged:
    """The event a check (or an operator action) sends when ``ref`` is retired."""
    return KeyStatusChanged(ref, old, Status.RETIRED, Cause.CHECK)


def revoked_count(events: list[Event], ref: KeyRef) -> int:
    """How many copies of ``ref`` the CopiesRevoked events in ``events`` report."""
    return sum(e.count for e in events if isinstance(e, CopiesRevoked) and e.ref == ref)


def status_events(events: list[Event]) -> list[KeyStatusChanged]:
    return [e for e in events if isinstance(e, KeyStatusChanged)]


@pytest.fixture
def events() -> list[Event]:
    """Everything the ``broker`` fixture emits, in order."""
    return []


@pytest.fixture
def broker(vault: Vault, vault_settings: VaultSettings, events: list[Event]) -> Broker:
    return Broker(
        vault, BrokerSettings(), grant_prefix=vault_settings.grant_prefix, emit=events.append
    )


@pytest.fixture
def ref(vault: Vault) -> KeyRef:
    ref = KeyRef("main", "bot-a")
    store_key(vault, ref)
    return ref


class TestLedger:
    def test_pop_key_returns_and_forgets_a_keys_accessors(self) -> None:
        """pop_key hands back every unclaimed accessor of one key and leaves other keys alone."""
        ledger: Ledger[KeyRef] = Ledger()
        a, b = KeyRef("main", "a"), KeyRef("main", "b")
        ledger.record(a, "acc-1", 100.0, now=0.0)
        ledger.record(a, "acc-2", 100.0, now=0.0)
        ledger.record(b, "acc-3", 100.0, now=0.0)
        assert ledger.pop_key(a) == ["acc-1", "acc-2"]
        assert ledger.pop_key(a) == []
        assert ledger.count() == 1

    def test_expired_returns_only_entries_past_their_ttl(self) -> None:
        """expired(now=) forgets and returns the copies whose wrapping tokens ran out."""
        ledger: Ledger[KeyRef] = Ledger()
        a = KeyRef("main", "a")
        ledger.record(a, "old", 10.0, now=0.0)
        ledger.record(a, "new", 20.0, now=0.0)
        assert ledger.expired(now=15.0) == [(a, "old")]
        assert ledger.expired(now=15.0) == []
        assert ledger.count(a) == 1

    def test_record_prunes_expired_entries_of_the_same_key(self) -> None:
        """Recording a copy drops that key's entries that have already expired."""
        ledger: Ledger[KeyRef] = Ledger()
        a = KeyRef("main", "a")
        ledger.record(a, "old", 10.0, now=0.0)
        ledger.record(a, "new", 40.0, now=30.0)
        assert ledger.pop_key(a) == ["new"]

    def test_a_busy_keys_list_holds_only_its_live_copies(self) -> None:
        """A copy a second, each live for 60 s: the key's list stays at about 60 entries,
        pruned as copies are recorded (not only when the sweep runs)."""
        ledger: Ledger[KeyRef] = Ledger()
        a = KeyRef("main", "a")
        ttl, copies = 60, 1000
        for second in range(copies):
            ledger.record(a, f"acc-{second}", second + float(ttl), now=float(second))
            assert ledger.count(a) <= ttl + 1
        # Entries expiring at or before the last copy's time are gone: the last ttl remain.
        assert ledger.pop_key(a) == [f"acc-{n}" for n in range(copies - ttl, copies)]

    def test_keys_lists_keys_with_unclaimed_copies(self) -> None:
        """keys() names every key that still has an entry."""
        ledger: Ledger[KeyRef] = Ledger()
        ledger.record(KeyRef("sub", "b"), "x", 10.0, now=0.0)
        ledger.record(KeyRef("main", "a"), "y", 10.0, now=0.0)
        assert sorted(ledger.keys()) == [KeyRef("main", "a"), KeyRef("sub", "b")]
        assert len(ledger) == 2


# -- the policy matrix -------------------------------------------------------------------------


@dataclass
class World:
    """Two sub-accounts, three keys, and worker tokens with different policies."""

    broker: Broker
    addr: str
    alpha: str
    beta: str
    tokens: dict[str, Secret] = field(default_factory=dict)

    def key(self, which: str) -> KeyRef:
        sub, name = which.split("/")
        return KeyRef({"A": self.alpha, "B": self.beta}[sub], name)


def _approle_token(addr: str, role_id: str, secret_id: Secret) -> Secret:
    answer = httpx.post(
        f"{addr}/v1/auth/approle/login",
        json={"role_id": role_id, "secret_id": secret_id.reveal()},
    )
    answer.raise_for_status()
    return Secret(answer.json()["auth"]["client_token"])


def _approle_accessor(addr: str, root: Secret) -> str:
    mounts = httpx.get(f"{addr}/v1/sys/auth", headers={"X-Vault-Token": root.reveal()}).json()
    return str(mounts["data"]["approle/"]["accessor"])


@pytest.fixture(scope="module")
def world(dev_vault: DevVault) -> Iterator[World]:
    uid = uuid.uuid4().hex[:8]
    prefix, grants = f"m-{uid}", f"m-{uid}-broker"
    vault = Vault(
        VaultSettings(
            addr=dev_vault.addr, token=dev_vault.root_token, kv_prefix=prefix, grant_prefix=grants
        )
    )
    vault.login()
    alpha, beta = f"alpha-{uid}", f"beta-{uid}"
    for sub, name, read_only in [
        (alpha, "bot-a", False),
        (alpha, "bot-ro", True),
        (beta, "bot-b", False),
    ]:
        store_key(vault, KeyRef(sub, name), read_only=read_only)

    setup = Provisioner(vault)
    setup.ensure_auth("approle")
    accessor = _approle_accessor(dev_vault.addr, dev_vault.root_token)
    role = f"{{{{identity.entity.aliases.{accessor}.metadata.role_name}}}}"
    policies = {
        "alpha-copier": f'path "{grants}/{alpha}/+/copy" {{ capabilities = ["read"] }}',
        "alpha-orders": (
            f'path "{grants}/{alpha}/bot-a/sign/orderExecute" {{ capabilities = ["update"] }}\n'
            f'path "{grants}/{alpha}/+/sign/balanceQuery" {{ capabilities = ["update"] }}'
        ),
        "beta-all": f'path "{grants}/{beta}/*" {{ capabilities = ["read", "update"] }}',
        "all-but-beta": (
            f'path "{grants}/*" {{ capabilities = ["read", "update"] }}\n'
            f'path "{grants}/{beta}/*" {{ capabilities = ["deny"] }}'
        ),
        "own-subaccount": (
            f'path "{grants}/{role}/+/copy" {{ capabilities = ["read"] }}\n'
            f'path "{grants}/{role}/+/sign/*" {{ capabilities = ["update"] }}'
        ),
    }
    for name, hcl in policies.items():
        setup.ensure_policy(f"{prefix}-{name}", hcl)
    tokens = {
        name: setup.create_token([f"{prefix}-{name}"])
        for name in ("alpha-copier", "alpha-orders", "beta-all", "all-but-beta")
    }
    tokens["default-only"] = setup.create_token(["default"])
    tokens["root"] = dev_vault.root_token
    # One AppRole role per sub-account, named after it; one templated policy serves both.
    for sub, alias in ((alpha, "approle-alpha"), (beta, "approle-beta")):
        setup.ensure_approle_role(sub, [f"{prefix}-own-subaccount"])
        role_id, secret_id = setup.approle_credentials(sub)
        tokens[alias] = _approle_token(dev_vault.addr, role_id, secret_id)
    broker = Broker(vault, BrokerSettings(), grant_prefix=grants)
    yield World(broker, dev_vault.addr, alpha, beta, tokens)
    vault.close()


# (token, action, key, instruction, expected outcome)
MATRIX = [
    ("alpha-copier", "copy", "A/bot-a", None, "ok"),
    ("alpha-copier", "copy", "A/bot-ro", None, "ok"),
    ("alpha-copier", "copy", "B/bot-b", None, "forbidden"),
    ("alpha-copier", "sign", "A/bot-a", "balanceQuery", "forbidden"),
    ("alpha-orders", "sign", "A/bot-a", "orderExecute", "ok"),
    ("alpha-orders", "sign", "A/bot-a", "orderCancel", "forbidden"),
    ("alpha-orders", "sign", "A/bot-ro", "balanceQuery", "ok"),
    ("alpha-orders", "sign", "A/bot-ro", "orderExecute", "forbidden"),
    ("alpha-orders", "sign", "B/bot-b", "balanceQuery", "forbidden"),
    ("alpha-orders", "copy", "A/bot-a", None, "forbidden"),
    ("beta-all", "copy", "B/bot-b", None, "ok"),
    ("beta-all", "sign", "B/bot-b", "orderExecute", "ok"),
    ("beta-all", "copy", "A/bot-a", None, "forbidden"),
    ("all-but-beta", "copy", "A/bot-a", None, "ok"),
    ("all-but-beta", "sign", "A/bot-a", "orderCancel", "ok"),
    ("all-but-beta", "sign", "A/bot-ro", "orderExecute", "read_only_key"),
    ("all-but-beta", "copy", "B/bot-b", None, "forbidden"),
    ("all-but-beta", "sign", "B/bot-b", "balanceQuery", "forbidden"),
    ("default-only", "copy", "A/bot-a", None, "forbidden"),
    ("default-only", "sign", "A/bot-a", "balanceQuery", "forbidden"),
    ("approle-alpha", "copy", "A/bot-a", None, "ok"),
    ("approle-alpha", "sign", "A/bot-ro", "accountQuery", "ok"),
    ("approle-alpha", "copy", "B/bot-b", None, "forbidden"),
    ("approle-beta", "copy", "B/bot-b", None, "ok"),
    ("approle-beta", "sign", "A/bot-a", "orderExecute", "forbidden"),
    ("root", "copy", "B/bot-b", None, "ok"),
    ("root", "sign", "A/bot-ro", "orderExecute", "read_only_key"),
    ("root", "sign", "A/bot-ro", "accountQuery", "ok"),
]


def _case_id(case: tuple[str, str, str, str | None, str]) -> str:
    token, action, key, instruction, expected = case
    return f"{token}-{action}-{key}{'-' + instruction if instruction else ''}-{expected}"


class TestPolicyMatrix:
    @pytest.mark.parametrize("case", MATRIX, ids=[_case_id(c) for c in MATRIX])
    def test_decision_follows_the_vault_policy(
        self, world: World, case: tuple[str, str, str, str | None, str]
    ) -> None:
        """Each copy and signature is allowed exactly when the worker's Vault policy grants it."""
        token_name, action, key, instruction, expected = case
        token, ref = world.tokens[token_name], world.key(key)
        try:
            if action == "copy":
                handout = world.broker.copy(token, ref)
                assert unwrap(world.addr, handout.wrap_token).status_code == 200
            else:
                assert instruction is not None
                signature = world.broker.sign(token, ref, instruction, {})
                assert signature.headers["X-API-Key"]
            outcome = "ok"
        except NotPermitted as exc:
            outcome = exc.code
        assert outcome == expected

    def test_templated_policy_names_the_callers_own_role(self, world: World) -> None:
        """The AppRole identity (not the daemon's config) scopes the templated policy."""
        can_copy, can_sign = world.broker.grants(
            world.tokens["approle-alpha"], world.key("A/bot-a")
        )
        assert can_copy
        assert "orderExecute" in can_sign
        assert world.broker.grants(world.tokens["approle-alpha"], world.key("B/bot-b")) == (
            False,
            (),
        )


# -- copies ------------------------------------------------------------------------------------


class TestCopies:
    def test_a_copy_unwraps_once_into_the_documented_fields(
        self, broker: Broker, ref: KeyRef, vault: Vault, dev_vault: DevVault, root_token: Secret
    ) -> None:
        """Unwrapping yields api_key, api_secret, key, version, read_only, expires_at; once."""
        record, secret = vault.read_key(ref)
        handout = broker.copy(root_token, ref)
        first = unwrap(dev_vault.addr, handout.wrap_token)
        assert first.status_code == 200
        assert first.json()["data"] == {
            "api_key": record.api_key,
            "api_secret": secret.reveal(),
            "key": "main/bot-a",
            "version": record.version,
            "read_only": False,
            "expires_at": handout.expires_at,
        }
        second = unwrap(dev_vault.addr, handout.wrap_token)
        assert second.status_code == 400
        assert "wrapping token is not valid" in second.text

    def test_a_service_client_wraps_over_one_kept_connection(
        self, vault_settings: VaultSettings, ref: KeyRef, dev_vault: DevVault, root_token: Secret
    ) -> None:
        """The daemon's Vault client sends its wraps over one kept connection (wire.py); each
        copy still unwraps once, into the same fields as one wrapped by hvac."""
        service, by_hvac = Vault.for_service(vault_settings), Vault(vault_settings)
        service.login()
        by_hvac.login()
        try:
            broker = Broker(service, settings(), grant_prefix=vault_settings.grant_prefix)
            handouts = [broker.copy(root_token, ref) for _ in range(5)]
            assert service._direct is not None
            assert by_hvac._direct is None
            assert service._direct._pool.connections == 1
            hvac_copy = Broker(by_hvac, settings(), grant_prefix=vault_settings.grant_prefix)
            expected = unwrap(dev_vault.addr, hvac_copy.copy(root_token, ref).wrap_token)
            expected_data = expected.json()["data"]
            for handout in handouts:
                data = unwrap(dev_vault.addr, handout.wrap_token).json()["data"]
                assert set(data) == set(expected_data)
                assert {k: v for k, v in data.items() if k != "expires_at"} == {
                    k: v for k, v in expected_data.items() if k != "expires_at"
                }
                assert unwrap(dev_vault.addr, handout.wrap_token).status_code == 400
        finally:
            service.close()
            by_hvac.close()

    def test_a_wrap_redirected_by_a_standby_node_is_followed(
        self, vault_settings: VaultSettings, dev_vault: DevVault
    ) -> None:
        """A standby Vault node answers 307 to the active one: the kept-connection path
        hands the wrap to hvac, which follows the redirect."""
        seen: list[str] = []

        class Standby(http.server.BaseHTTPRequestHandler):
            def _redirect(self) -> None:
                seen.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.send_response(307)
                self.send_header("Location", f"{dev_vault.addr}{self.path}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = _redirect  # noqa: N815 - http.server's names

            def log_message(self, *_args: object) -> None:
                return

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Standby)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            addr = f"http://127.0.0.1:{server.server_address[1]}"
            service = Vault.for_service(dataclasses.replace(vault_settings, addr=addr))
            service.login()
            info = service.wrap({"x": "1"}, ttl=60)
            service.close()
        finally:
            server.shutdown()
            server.server_close()
        assert seen.count("POST /v1/sys/wrapping/wrap") == 2  # tried direct, then by hvac
        assert unwrap(dev_vault.addr, info.token).json()["data"] == {"x": "1"}

    def test_a_refused_wrap_is_the_same_error_on_either_path(
        self, vault_settings: VaultSettings
    ) -> None:
        """A token Vault refuses: the kept-connection path raises what hvac's path raises."""
        bad = dataclasses.replace(vault_settings, token=Secret("s.not-a-token"))
        found = []
        clients = (Vault(bad), Vault.for_service(bad))
        assert (clients[0]._direct, clients[1]._direct is not None) == (None, True)
        for client in clients:
            with pytest.raises(ServiceError):
                client.login()  # refused too; the token is the client's from here on
            with pytest.raises(ServiceError) as refused:
                client.wrap({"x": 1}, ttl=60)
            found.append((type(refused.value), refused.value.message))
            client.close()
        assert found[0] == found[1]

    def test_the_response_holds_the_documented_fields(
        self, broker: Broker, ref: KeyRef, root_token: Secret
    ) -> None:
        """The handout answers wrap_token, wrap_ttl, expires_at, api_key and version."""
        response = broker.copy(root_token, ref).as_response()
        assert set(response) == {"wrap_token", "wrap_ttl", "expires_at", "api_key", "version"}
        assert response["wrap_ttl"] == 60

    def test_a_wrapping_token_expires_after_its_ttl(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, dev_vault: DevVault
    ) -> None:
        """With a 1 s wrap_ttl, the copy cannot be unwrapped once the second has passed."""
        broker = Broker(vault, settings(wrap_ttl=1), grant_prefix=vault_settings.grant_prefix)
        handout = broker.copy(dev_vault.root_token, ref)
        assert handout.wrap_ttl == 1
        wait_until(lambda: not wrap_token_alive(dev_vault.addr, handout.wrap_token))
        assert unwrap(dev_vault.addr, handout.wrap_token).status_code == 400

    def test_wrap_ttl_is_capped_at_max_wrap_ttl(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, root_token: Secret
    ) -> None:
        """A configured wrap_ttl above max_wrap_ttl is cut down to it."""
        broker = Broker(
            vault, settings(wrap_ttl=600, max_wrap_ttl=30), grant_prefix=vault_settings.grant_prefix
        )
        assert broker.copy(root_token, ref).wrap_ttl == 30

    def test_expires_at_is_now_plus_copy_ttl_in_utc(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, root_token: Secret
    ) -> None:
        """expires_at is ISO 8601 UTC, copy_ttl seconds after the handout."""
        clock = FakeClock(1_750_000_000.0)
        broker = Broker(
            vault, settings(copy_ttl=900), grant_prefix=vault_settings.grant_prefix, clock=clock
        )
        expires_at = broker.copy(root_token, ref).expires_at
        assert expires_at == "2025-06-15T15:21:40Z"
        assert datetime.fromisoformat(expires_at) == datetime.fromtimestamp(1_750_000_900, UTC)

    def test_retiring_a_key_revokes_its_unclaimed_copies(
        self,
        broker: Broker,
        events: list[Event],
        ref: KeyRef,
        vault: Vault,
        dev_vault: DevVault,
        root_token: Secret,
    ) -> None:
        """After retirement and its event, outstanding wrapping tokens no longer unwrap."""
        handouts = [broker.copy(root_token, ref) for _ in range(2)]
        assert broker.outstanding == 2
        vault.set_status(ref, Status.RETIRED, now=NOW)
        broker.on_event(retired(ref))
        assert revoked_count(events, ref) == 2
        for handout in handouts:
            assert unwrap(dev_vault.addr, handout.wrap_token).status_code == 400
        assert broker.outstanding == 0
        with pytest.raises(KeyNotUsable, match="retired"):
            broker.copy(root_token, ref)

    def test_a_status_change_is_seen_once_the_cache_expires(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, dev_vault: DevVault
    ) -> None:
        """A key retired elsewhere (CLI) is refused after secret_cache_s; its copies are revoked."""
        clock = FakeClock()
        broker = Broker(
            vault, settings(secret_cache_s=5), grant_prefix=vault_settings.grant_prefix, clock=clock
        )
        handout = broker.copy(dev_vault.root_token, ref)
        vault.set_status(ref, Status.RETIRED, now=NOW)
        clock.advance(5.01)
        with pytest.raises(KeyNotUsable, match="retired"):
            broker.copy(dev_vault.root_token, ref)
        assert unwrap(dev_vault.addr, handout.wrap_token).status_code == 400

    def test_sweep_revokes_copies_of_a_key_retired_elsewhere(
        self, broker: Broker, ref: KeyRef, vault: Vault, dev_vault: DevVault
    ) -> None:
        """The periodic sweep reads keys with unclaimed copies and acts on a final status."""
        handout = broker.copy(dev_vault.root_token, ref)
        vault.set_status(ref, Status.REVOKED, now=NOW, verdict="REJECTED")
        broker.sweep()
        assert unwrap(dev_vault.addr, handout.wrap_token).status_code == 400
        assert broker.outstanding == 0

    def test_a_newer_version_is_loaded_after_the_cache_window(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        ref: KeyRef,
        dev_vault: DevVault,
        kv_prefix: str,
    ) -> None:
        """Secrets are cached at most secret_cache_s; then Vault's newest version is handed out."""
        clock = FakeClock()
        broker = Broker(
            vault, settings(secret_cache_s=5), grant_prefix=vault_settings.grant_prefix, clock=clock
        )
        assert broker.copy(dev_vault.root_token, ref).version == 1
        fresh = generate_pair()
        httpx.post(
            f"{dev_vault.addr}/v1/secret/data/{kv_prefix}/main/bot-a",
            headers={"X-Vault-Token": dev_vault.root_token.reveal()},
            json={
                "options": {"cas": 1},
                "data": {"api_key": fresh.api_key, "api_secret": fresh.secret.reveal()},
            },
        ).raise_for_status()
        httpx.patch(
            f"{dev_vault.addr}/v1/secret/metadata/{kv_prefix}/main/bot-a",
            headers={
                "X-Vault-Token": dev_vault.root_token.reveal(),
                "Content-Type": "application/merge-patch+json",
            },
            json={"custom_metadata": {"api_key": fresh.api_key}},
        ).raise_for_status()
        assert broker.copy(dev_vault.root_token, ref).version == 1
        clock.advance(5.01)
        handout = broker.copy(dev_vault.root_token, ref)
        assert handout.version == 2
        assert unwrap(dev_vault.addr, handout.wrap_token).json()["data"]["api_secret"] == (
            fresh.secret.reveal()
        )


# -- refusals ----------------------------------------------------------------------------------


class TestRefusals:
    @pytest.mark.parametrize(
        "status",
        [Status.PENDING, Status.REVOKED, Status.RETIRED],
        ids=["pending", "revoked", "retired"],
    )
    @pytest.mark.parametrize("action", ["copy", "sign"], ids=["copy", "sign"])
    def test_a_key_that_is_not_active_is_refused_with_its_status(
        self, broker: Broker, vault: Vault, root_token: Secret, status: Status, action: str
    ) -> None:
        """Pending, revoked and retired keys get KeyNotUsable (409) naming the status."""
        ref = KeyRef("main", "bot-x")
        store_key(vault, ref, status=status)
        call: Callable[[], object] = {
            "copy": lambda: broker.copy(root_token, ref),
            "sign": lambda: broker.sign(root_token, ref, "accountQuery", {}),
        }[action]
        with pytest.raises(KeyNotUsable, match=status.value) as caught:
            call()
        assert caught.value.http_status == 409
        assert caught.value.status == status.value

    def test_a_key_without_metadata_is_refused_as_incomplete(
        self, broker: Broker, dev_vault: DevVault, kv_prefix: str, root_token: Secret
    ) -> None:
        """Data written without custom_metadata (an interrupted intake) is never handed out."""
        pair = generate_pair()
        httpx.post(
            f"{dev_vault.addr}/v1/secret/data/{kv_prefix}/main/half",
            headers={"X-Vault-Token": root_token.reveal()},
            json={"data": {"api_key": pair.api_key, "api_secret": pair.secret.reveal()}},
        ).raise_for_status()
        with pytest.raises(KeyNotUsable, match="incomplete"):
            broker.copy(root_token, KeyRef("main", "half"))

    def test_an_unknown_key_is_404_for_a_granted_caller(
        self, broker: Broker, root_token: Secret
    ) -> None:
        """A caller allowed on the path learns that no such key is stored."""
        with pytest.raises(UnknownKey) as caught:
            broker.copy(root_token, KeyRef("main", "nope"))
        assert caught.value.http_status == 404

    def test_the_grant_is_checked_before_the_key_is_looked_up(
        self, broker: Broker, vault: Vault
    ) -> None:
        """A caller without a grant gets 403 whether or not the key exists."""
        token = Provisioner(vault).create_token(["default"])
        with pytest.raises(NotPermitted):
            broker.copy(token, KeyRef("main", "nope"))

    @pytest.mark.parametrize(
        "token", [None, Secret(""), Secret("s.not-a-real-token")], ids=["none", "empty", "unknown"]
    )
    def test_a_missing_or_unknown_token_is_not_authenticated(
        self, broker: Broker, ref: KeyRef, token: Secret | None
    ) -> None:
        """No token, or one Vault does not know, gets NotAuthenticated (401)."""
        with pytest.raises(NotAuthenticated) as caught:
            broker.copy(token, ref)
        assert caught.value.http_status == 401

    def test_a_revoked_worker_token_is_refused_once_its_decision_expires(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, dev_vault: DevVault
    ) -> None:
        """Decisions are cached at most decision_cache_s; then a revoked token gets 401."""
        clock = FakeClock()
        broker = Broker(
            vault,
            settings(decision_cache_s=2),
            grant_prefix=vault_settings.grant_prefix,
            clock=clock,
        )
        token = Provisioner(vault).create_token(["root"])
        broker.copy(token, ref)
        httpx.post(
            f"{dev_vault.addr}/v1/auth/token/revoke-self",
            headers={"X-Vault-Token": token.reveal()},
        ).raise_for_status()
        clock.advance(2.01)
        with pytest.raises(NotAuthenticated):
            broker.copy(token, ref)


# -- signatures --------------------------------------------------------------------------------


class TestSignatures:
    def test_signatures_verify_and_equal_sign_request(
        self, broker: Broker, vault: Vault, ref: KeyRef, root_token: Secret
    ) -> None:
        """Sign mode gives exactly sign_request's headers, and they verify with the public key."""
        record, secret = vault.read_key(ref)
        params = {"symbol": "SOL_USDC", "side": "Bid", "price": "141.5", "quantity": "2"}
        stamp = int(time.time() * 1000) + 1000
        signed = broker.sign(root_token, ref, "orderExecute", params, timestamp=stamp, window=6000)
        expected = sign_request(record.api_key, secret, "orderExecute", params, stamp, 6000)
        assert dict(signed.headers) == expected
        message = signing_string("orderExecute", params, stamp, 6000)
        assert verify(record.api_key, message, signed.headers["X-Signature"])

    def test_batch_orders_are_signed_as_one_request(
        self, broker: Broker, vault: Vault, ref: KeyRef, root_token: Secret
    ) -> None:
        """A list of orders signs like sign_request's batch form."""
        record, secret = vault.read_key(ref)
        orders = [{"symbol": "SOL_USDC", "side": "Bid"}, {"symbol": "SOL_USDC", "side": "Ask"}]
        stamp = int(time.time() * 1000)
        signed = broker.sign(root_token, ref, "orderExecute", orders, timestamp=stamp)
        assert dict(signed.headers) == sign_request(
            record.api_key, secret, "orderExecute", orders, stamp
        )

    def test_timestamp_and_window_default_to_now_and_5000(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, root_token: Secret
    ) -> None:
        """Without them, the timestamp is the broker's clock in ms and the window 5000 ms."""
        broker = Broker(
            vault,
            BrokerSettings(),
            grant_prefix=vault_settings.grant_prefix,
            clock=FakeClock(1_750_000_000.123),
        )
        headers = broker.sign(root_token, ref, "balanceQuery", None).headers
        assert headers["X-Timestamp"] == "1750000000123"
        assert headers["X-Window"] == "5000"

    @pytest.mark.parametrize(
        ("instruction", "params", "window", "match"),
        [
            ("fooBar", {}, None, "not a Backpack instruction"),
            ("orderExecute", {"price": 1.5}, None, "float"),
            ("orderExecute", {}, 60001, "outside"),
        ],
        ids=["unknown-instruction", "float-param", "window-too-long"],
    )
    def test_malformed_requests_are_invalid_input(
        self,
        broker: Broker,
        ref: KeyRef,
        root_token: Secret,
        instruction: str,
        params: dict[str, Any],
        window: int | None,
        match: str,
    ) -> None:
        """Unknown instructions, unsignable values and windows above 60 s are 422."""
        with pytest.raises(InvalidInput, match=match) as caught:
            broker.sign(root_token, ref, instruction, params, window=window)
        assert caught.value.http_status == 422

    @pytest.mark.parametrize("instruction", ["orderExecute", "orderCancelAll", "withdraw"], ids=str)
    def test_a_read_only_key_never_signs_a_state_change(
        self, broker: Broker, vault: Vault, root_token: Secret, instruction: str
    ) -> None:
        """Whatever the policy (here root), a read-only key refuses state-changing instructions."""
        ref = KeyRef("main", "watcher")
        store_key(vault, ref, read_only=True)
        with pytest.raises(ReadOnlyKey, match="read-only") as caught:
            broker.sign(root_token, ref, instruction, {})
        assert caught.value.http_status == 403
        assert broker.sign(root_token, ref, "balanceQuery", {}).headers["X-Signature"]


class TestCaches:
    def test_no_cache_is_keyed_by_the_raw_token(
        self, broker: Broker, ref: KeyRef, root_token: Secret
    ) -> None:
        """Decisions and identities are keyed by a keyed hash; the token text appears nowhere."""
        broker.copy(root_token, ref)
        broker.sign(root_token, ref, "accountQuery", {})
        keys = repr(list(broker._grants.decisions)) + repr(list(broker._grants.identities))
        assert broker._grants.decisions
        assert root_token.reveal() not in keys

    def test_the_worker_identity_is_remembered_with_the_decision(
        self, broker: Broker, ref: KeyRef, vault: Vault
    ) -> None:
        """identity() names the caller's Vault identity after a request, without asking Vault."""
        token = Provisioner(vault).create_token(["root"])
        assert broker.identity(token) == ""
        handout = broker.copy(token, ref)
        assert handout.identity == broker.identity(token) == vault.lookup_caller(token).identity
        assert handout.identity

    def test_a_status_change_drops_the_cached_secret_at_once(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, root_token: Secret
    ) -> None:
        """Within the cache window, a status event still makes the next request re-read."""
        broker = Broker(
            vault, settings(secret_cache_s=3600), grant_prefix=vault_settings.grant_prefix
        )
        broker.copy(root_token, ref)
        vault.set_status(ref, Status.RETIRED, now=NOW)
        broker.copy(root_token, ref)  # still cached: nobody told the broker
        broker.on_event(retired(ref))
        with pytest.raises(KeyNotUsable, match="retired"):
            broker.sign(root_token, ref, "accountQuery", {})

    def test_the_signer_is_reused_within_the_cache_window(
        self, broker: Broker, ref: KeyRef, root_token: Secret
    ) -> None:
        """Two signatures in the window use one loaded key (no second read)."""
        broker.sign(root_token, ref, "accountQuery", {})
        first = broker._keys.loaded.get(ref, now=time.time())
        assert first is not None
        broker.sign(root_token, ref, "accountQuery", {})
        assert broker._keys.loaded.get(ref, now=time.time()) is first


ORDER_PARAMS = {"symbol": "SOL_USDC", "side": "Bid", "orderType": "Limit", "quantity": "1"}


class TestGrantQuestions:
    def test_requests_missing_one_decision_at_once_ask_vault_once(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, root_token: Secret
    ) -> None:
        """Eight requests need the same expired decision together: one question to Vault,
        answered for all eight (under load, each used to ask and the Vault pool overflowed)."""
        counting = CountingVault(vault)
        arrived = threading.Barrier(8)
        broker = Broker(counting, settings(), grant_prefix=vault_settings.grant_prefix)
        broker.sign(root_token, ref, "accountQuery", {})  # key and identity cached
        broker._grants.decisions.clear()
        counting.calls.clear()
        counting.before["capabilities"] = lambda: time.sleep(0.3)  # the others queue up meanwhile
        signed: list[str] = []

        def sign() -> None:
            arrived.wait(5)
            signed.append(broker.sign(root_token, ref, "orderExecute", ORDER_PARAMS).key.name)

        workers = [threading.Thread(target=sign) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(10)
        assert signed == ["bot-a"] * 8
        assert counting.calls.count("capabilities") == 1

    def test_when_the_one_question_fails_the_others_ask_again(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, root_token: Secret
    ) -> None:
        """The request whose question failed gets the error; those waiting ask for themselves."""
        counting = CountingVault(vault)
        broker = Broker(counting, settings(), grant_prefix=vault_settings.grant_prefix)
        broker.sign(root_token, ref, "accountQuery", {})
        broker._grants.decisions.clear()
        started = threading.Event()

        def fail() -> None:
            started.set()
            time.sleep(0.3)
            counting.calls.append("failed")
            raise VaultUnavailable("Vault is sealed")

        counting.before["capabilities"] = fail
        outcomes: list[str] = []

        def sign() -> None:
            try:
                broker.sign(root_token, ref, "orderExecute", ORDER_PARAMS)
                outcomes.append("signed")
            except VaultUnavailable:
                outcomes.append("unavailable")

        first = threading.Thread(target=sign)
        first.start()
        assert started.wait(5)
        second = threading.Thread(target=sign)
        second.start()
        first.join(10)
        second.join(10)
        assert sorted(outcomes) == ["signed", "unavailable"]
        # The second waited for the first's question and asked only once it had failed.
        assert counting.calls[-3:] == ["capabilities", "failed", "capabilities"]


class CountingVault:
    """The session's real Vault behind the port, noting each call; ``before`` runs first."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self.calls: list[str] = []
        self.before: dict[str, Callable[[], None]] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.vault, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            hook = self.before.pop(name, None)
            if hook is not None:
                hook()
            return method(*args, **kwargs)

        return call


class TestAnswersFromMemory:
    def test_a_key_in_demand_gets_spare_copies(
        self, broker: Broker, ref: KeyRef, dev_vault: DevVault, root_token: Secret
    ) -> None:
        """After two quick copies, refill wraps spares; the next copy is one, from memory."""
        assert not broker.answers_from_memory(root_token, ref, COPY)
        broker.copy(root_token, ref)
        broker.copy(root_token, ref)
        broker.refill(ref)
        assert broker.outstanding == 4
        assert broker.answers_from_memory(root_token, ref, COPY)
        spare = broker.copy(root_token, ref)
        assert broker.outstanding == 4  # nothing new was wrapped
        assert 0 < spare.wrap_ttl <= 60
        assert unwrap(dev_vault.addr, spare.wrap_token).status_code == 200
        assert unwrap(dev_vault.addr, spare.wrap_token).status_code == 400

    def test_a_key_copied_rarely_gets_no_spares(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, root_token: Secret
    ) -> None:
        """Copies further apart than a spare's useful life cause no spare wraps."""
        clock = FakeClock()
        broker = Broker(
            vault, BrokerSettings(), grant_prefix=vault_settings.grant_prefix, clock=clock
        )
        broker.copy(root_token, ref)
        clock.advance(16)
        broker.copy(root_token, ref)
        broker.refill(ref)
        assert broker.outstanding == 2

    def test_an_aged_spare_is_not_handed_out(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, root_token: Secret
    ) -> None:
        """A spare older than a quarter of its wrapping TTL is skipped; copy wraps anew."""
        clock = FakeClock()
        broker = Broker(
            vault,
            settings(decision_cache_s=60, secret_cache_s=60),
            grant_prefix=vault_settings.grant_prefix,
            clock=clock,
        )
        broker.copy(root_token, ref)
        broker.copy(root_token, ref)
        broker.refill(ref)
        clock.advance(15.5)
        assert not broker.answers_from_memory(root_token, ref, COPY)
        assert broker.copy(root_token, ref).wrap_ttl == 60

    def test_spares_are_revoked_with_their_key(
        self,
        broker: Broker,
        events: list[Event],
        ref: KeyRef,
        vault: Vault,
        dev_vault: DevVault,
        root_token: Secret,
    ) -> None:
        """Spares sit in the ledger: retiring the key revokes every one of them."""
        broker.copy(root_token, ref)
        broker.copy(root_token, ref)
        broker.refill(ref)
        assert broker.answers_from_memory(root_token, ref, COPY)
        spare = broker.copy(root_token, ref)
        vault.set_status(ref, Status.RETIRED, now=NOW)
        broker.on_event(retired(ref))
        assert revoked_count(events, ref) == 4
        assert unwrap(dev_vault.addr, spare.wrap_token).status_code == 400
        assert not broker.answers_from_memory(root_token, ref, COPY)

    def test_signing_answers_from_memory_once_grant_and_key_are_cached(
        self, broker: Broker, ref: KeyRef, vault: Vault, root_token: Secret
    ) -> None:
        """A signature answers from memory once the grant and key are cached; refusals too."""
        assert not broker.answers_from_memory(root_token, ref, "sign/accountQuery")
        broker.sign(root_token, ref, "accountQuery", {})
        assert broker.answers_from_memory(root_token, ref, "sign/accountQuery")
        assert broker.sign(root_token, ref, "accountQuery", {}).headers["X-Signature"]
        stranger = Provisioner(vault).create_token(["default"])
        assert not broker.answers_from_memory(stranger, ref, "sign/accountQuery")
        with pytest.raises(NotPermitted):
            broker.sign(stranger, ref, "accountQuery", {})
        assert broker.answers_from_memory(stranger, ref, "sign/accountQuery")
        with pytest.raises(NotPermitted):
            broker.sign(stranger, ref, "accountQuery", {})

    def test_what_serves_from_memory_is_a_handover_never_a_refusal(
        self, broker: Broker, ref: KeyRef, vault: Vault, root_token: Secret
    ) -> None:
        """serves_from_memory: answered from memory with a result. A refusal from memory
        (no grant, a key not active) answers from memory, but serves nothing."""
        sign = "sign/accountQuery"
        assert not broker.serves_from_memory(root_token, ref, sign)  # nothing cached yet
        broker.sign(root_token, ref, "accountQuery", {})
        assert broker.serves_from_memory(root_token, ref, sign)
        assert not broker.serves_from_memory(root_token, ref, COPY)  # no grant cached for it
        assert not broker.serves_from_memory(root_token, ref, "sign/notAnInstruction")
        assert not broker.serves_from_memory(None, ref, sign)
        stranger = Provisioner(vault).create_token(["default"])
        with pytest.raises(NotPermitted):
            broker.sign(stranger, ref, "accountQuery", {})
        assert broker.answers_from_memory(stranger, ref, sign)
        assert not broker.serves_from_memory(stranger, ref, sign)
        vault.set_status(ref, Status.RETIRED, now=NOW)
        broker.on_event(retired(ref))
        with pytest.raises(KeyNotUsable):
            broker.sign(root_token, ref, "accountQuery", {})
        assert broker.answers_from_memory(root_token, ref, sign)
        assert not broker.serves_from_memory(root_token, ref, sign)

    def test_what_answers_from_memory_asks_vault_nothing(
        self, vault: Vault, vault_settings: VaultSettings, ref: KeyRef, root_token: Secret
    ) -> None:
        """Whenever answers_from_memory is True, copy or sign answers without a Vault call."""
        counting = CountingVault(vault)
        broker = Broker(counting, BrokerSettings(), grant_prefix=vault_settings.grant_prefix)
        stranger = Provisioner(vault).create_token(["default"])
        broker.copy(root_token, ref)
        broker.copy(root_token, ref)
        broker.refill(ref)
        broker.sign(root_token, ref, "accountQuery", {})
        with pytest.raises(NotPermitted):
            broker.copy(stranger, ref)
        answered: list[tuple[Secret | None, str, Callable[[], object]]] = [
            (root_token, COPY, lambda: broker.copy(root_token, ref)),
            (
                root_token,
                "sign/accountQuery",
                lambda: broker.sign(root_token, ref, "accountQuery", {}),
            ),
            (stranger, COPY, lambda: broker.copy(stranger, ref)),
            (None, COPY, lambda: broker.copy(None, ref)),
            (root_token, "sign/fooBar", lambda: broker.sign(root_token, ref, "fooBar", {})),
        ]
        for token, grant, call in answered:
            assert broker.answers_from_memory(token, ref, grant), grant
            counting.calls.clear()
            with contextlib.suppress(ServiceError):
                call()
            assert counting.calls == [], grant
        assert not broker.answers_from_memory(root_token, ref, "sign/orderExecute")
        assert not broker.answers_from_memory(Secret("s.unseen"), ref, COPY)
        assert not broker.answers_from_memory(root_token, KeyRef("main", "other"), COPY)

    def test_a_grant_must_be_copy_or_sign(self, broker: Broker, ref: KeyRef) -> None:
        """answers_from_memory names the grant as the API does: copy or sign/<instruction>."""
        with pytest.raises(ValueError, match="grant"):
            broker.answers_from_memory(Secret("s.x"), ref, "read")


class TestStatusEvents:
    def test_a_status_found_changed_is_emitted_once(
        self, broker: Broker, events: list[Event], ref: KeyRef, vault: Vault, root_token: Secret
    ) -> None:
        """A read that finds a new status emits KeyStatusChanged(OBSERVED) once; others nothing."""
        broker.copy(root_token, ref)
        broker.info(root_token, ref)
        broker.sweep()
        assert status_events(events) == []
        vault.set_status(ref, Status.REVOKED, now=NOW, verdict="REJECTED")
        broker.info(root_token, ref)
        broker.info(root_token, ref)
        broker.sweep()
        with pytest.raises(KeyNotUsable, match="revoked"):
            broker.copy(root_token, ref)
        [event] = status_events(events)
        assert (event.ref, event.old, event.new, event.cause) == (
            ref,
            Status.ACTIVE,
            Status.REVOKED,
            Cause.OBSERVED,
        )
        assert event.record is not None
        assert event.record.status is Status.REVOKED
        assert revoked_count(events, ref) == 1

    def test_its_own_event_coming_back_from_the_bus_is_harmless(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        ref: KeyRef,
        dev_vault: DevVault,
        root_token: Secret,
    ) -> None:
        """Wired as the daemon wires it, each change and each revocation is told once."""
        bus = EventBus()
        seen: list[Event] = []
        broker = Broker(
            vault, BrokerSettings(), grant_prefix=vault_settings.grant_prefix, emit=bus.emit
        )
        bus.subscribe(broker.on_event)
        bus.subscribe(seen.append)
        handouts = [broker.copy(root_token, ref) for _ in range(2)]
        vault.set_status(ref, Status.RETIRED, now=NOW)
        broker.sweep()
        broker.sweep()
        assert [(e.old, e.new) for e in status_events(seen)] == [(Status.ACTIVE, Status.RETIRED)]
        assert [e for e in seen if isinstance(e, CopiesRevoked)] == [CopiesRevoked(ref, 2)]
        assert broker.outstanding == 0
        for handout in handouts:
            assert unwrap(dev_vault.addr, handout.wrap_token).status_code == 400

    def test_a_final_status_event_revokes_unclaimed_copies(
        self,
        broker: Broker,
        events: list[Event],
        ref: KeyRef,
        dev_vault: DevVault,
        root_token: Secret,
    ) -> None:
        """on_event(revoked) revokes the copies; CopiesRevoked is emitted when there were any."""
        handout = broker.copy(root_token, ref)
        event = KeyStatusChanged(ref, Status.ACTIVE, Status.REVOKED, Cause.CHECK)
        broker.on_event(event)
        assert events == [CopiesRevoked(ref, 1)]
        assert unwrap(dev_vault.addr, handout.wrap_token).status_code == 400
        assert broker.outstanding == 0
        broker.on_event(event)
        broker.on_event(CopiesRevoked(ref, 1))
        assert events == [CopiesRevoked(ref, 1)]

    def test_a_status_event_that_is_not_final_drops_caches_and_keeps_copies(
        self,
        broker: Broker,
        events: list[Event],
        ref: KeyRef,
        dev_vault: DevVault,
        root_token: Secret,
    ) -> None:
        """An event for an active key makes the next request re-read; copies stay valid."""
        handout = broker.copy(root_token, ref)
        broker.sign(root_token, ref, "accountQuery", {})
        broker.on_event(KeyStatusChanged(ref, Status.PENDING, Status.ACTIVE, Cause.CHECK))
        assert not broker.answers_from_memory(root_token, ref, "sign/accountQuery")
        assert broker.outstanding == 1
        assert events == []
        assert unwrap(dev_vault.addr, handout.wrap_token).status_code == 200

    def test_a_key_deleted_from_vault_is_retired_by_sweep(
        self,
        broker: Broker,
        events: list[Event],
        ref: KeyRef,
        vault: Vault,
        dev_vault: DevVault,
        root_token: Secret,
    ) -> None:
        """sweep finds a deleted key: KeyStatusChanged(RETIRED, DELETED), its copies revoked."""
        handout = broker.copy(root_token, ref)
        vault.delete_key(ref)
        broker.sweep()
        broker.sweep()
        assert [(e.old, e.new, e.cause) for e in status_events(events)] == [
            (Status.ACTIVE, Status.RETIRED, Cause.DELETED)
        ]
        assert revoked_count(events, ref) == 1
        assert unwrap(dev_vault.addr, handout.wrap_token).status_code == 400

    def test_without_emit_the_broker_applies_what_it_observes(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        ref: KeyRef,
        dev_vault: DevVault,
        root_token: Secret,
    ) -> None:
        """With no bus (tests, CLI), a change found by a read still revokes the copies."""
        broker = Broker(vault, BrokerSettings(), grant_prefix=vault_settings.grant_prefix)
        handout = broker.copy(root_token, ref)
        vault.set_status(ref, Status.REVOKED, now=NOW, verdict="REJECTED")
        broker.info(root_token, ref)
        assert unwrap(dev_vault.addr, handout.wrap_token).status_code == 400
        assert broker.outstanding == 0

    def test_a_read_older_than_an_event_is_neither_news_nor_cached(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        ref: KeyRef,
        root_token: Secret,
    ) -> None:
        """An event that arrives while the key is being read wins over what the read found."""
        counting = CountingVault(vault)
        seen: list[Event] = []
        broker = Broker(
            counting, BrokerSettings(), grant_prefix=vault_settings.grant_prefix, emit=seen.append
        )
        revoked = KeyStatusChanged(ref, Status.ACTIVE, Status.REVOKED, Cause.CHECK)
        counting.before["read_key"] = lambda: broker.on_event(revoked)
        with pytest.raises(KeyNotUsable, match="revoked"):
            broker.copy(root_token, ref)  # Vault still says active: the check has not written yet
        assert status_events(seen) == []
        assert broker._keys.loaded.get(ref, now=time.time()) is None


def test_iso_utc_is_iso_8601_with_z() -> None:
    """iso_utc renders epoch seconds as ISO 8601 UTC with a Z suffix."""
    assert iso_utc(0) == "1970-01-01T00:00:00Z"


def test_errors_carry_no_secret(broker: Broker, vault: Vault, root_token: Secret) -> None:
    """Refusals name keys and statuses only, never the secret."""
    ref = KeyRef("main", "quiet")
    pair = store_key(vault, ref, read_only=True)
    seed_text = base64.b64decode(pair.secret.reveal()).hex()
    caught: list[ServiceError] = []
    for call in (
        lambda: broker.sign(root_token, ref, "orderExecute", {}),
        lambda: broker.sign(root_token, ref, "accountQuery", {"x": 1.5}),  # type: ignore[dict-item]
        lambda: broker.copy(Secret("s.bogus"), ref),
    ):
        with pytest.raises(ServiceError) as info:
            call()
        caught.append(info.value)
    text = " ".join(f"{e!s} {e!r}" for e in caught)
    assert pair.secret.reveal() not in text
    assert seed_text not in text
