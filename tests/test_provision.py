"""Vault setup: policy text, idempotent `vault setup`, and what each policy lets a token do.

Everything that touches Vault runs on real OpenBao dev servers started by this module (not
the session one), so mounts, policies and auth methods start out absent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import hvac
import pytest
from click.testing import CliRunner

from backpack_vault.cli import cli
from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyRecord, KeyRef, Origin, Status, generate_pair
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import ConfigError, InvalidInput, VaultDenied
from backpack_vault.vault import setup as provision
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.setup import KubernetesAuth, Outcome

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "service" / "backpack_vault" / "vault" / "policies"
DEPLOYED = REPO / "deploy" / "vault" / "policies"
PATH = re.compile(r'^path "([^"]+)"', re.MULTILINE)
STANZA = re.compile(r'^path "([^"]+)" \{ capabilities = \["(\w+)"\] \}$', re.MULTILINE)

# Non-default names everywhere, so that every substitution is exercised against Vault.
KV_MOUNT = "bp-kv"
KV_PREFIX = "keys"
GRANTS = "grants"
MAX_WRAP = 120
CUSTOM_ENV = {
    "BACKPACK_VAULT_KV_MOUNT": KV_MOUNT,
    "BACKPACK_VAULT_KV_PREFIX": KV_PREFIX,
    "BACKPACK_VAULT_GRANT_PREFIX": GRANTS,
    "BACKPACK_VAULT_MAX_WRAP_TTL": str(MAX_WRAP),
}


def settings_for(addr: str, token: Secret | None = None, **vault: str) -> Settings:
    return Settings(
        vault=VaultSettings(addr=addr, token=token, **vault),  # type: ignore[arg-type]
        broker=BrokerSettings(max_wrap_ttl=MAX_WRAP),
        checks=CheckSettings(),
    )


def custom_settings(addr: str, token: Secret | None = None) -> Settings:
    return settings_for(addr, token, kv_mount=KV_MOUNT, kv_prefix=KV_PREFIX, grant_prefix=GRANTS)


def logged_in(settings: VaultSettings) -> Vault:
    client = Vault(settings)
    client.login()
    return client


def grants(hcl: str) -> dict[str, str]:
    """Path -> capability of every stanza in a rendered worker policy."""
    return dict(STANZA.findall(hcl))


def approle_login(addr: str, role_id: str, secret_id: Secret) -> Secret:
    client = hvac.Client(url=addr, token="")
    body = client.auth.approle.login(role_id=role_id, secret_id=secret_id.reveal(), use_token=False)
    return Secret(body["auth"]["client_token"])


def new_record(sub: str = "desk") -> tuple[KeyRecord, Secret]:
    pair = generate_pair()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = KeyRecord(
        ref=KeyRef(sub, f"k-{uuid.uuid4().hex[:8]}"),
        api_key=pair.api_key,
        read_only=False,
        status=Status.ACTIVE,
        origin=Origin.GENERATED,
        created_at=now,
        status_since=now,
    )
    return record, pair.secret


class TestWorkerPolicyText:
    def test_default_grants_signing_of_read_only_instructions_only(self) -> None:
        """Without instructions a worker may have read-only instructions signed: no copy."""
        hcl = provision.render_worker_policy("backpack-broker", "scalper")
        expected = {
            f"backpack-broker/scalper/+/sign/{i}": "update"
            for i in provision.READ_ONLY_INSTRUCTIONS
        }
        assert grants(hcl) == expected
        assert "balanceQuery" in provision.READ_ONLY_INSTRUCTIONS
        assert not {"orderExecute", "withdraw", "orderCancelAll"} & set(
            provision.READ_ONLY_INSTRUCTIONS
        )

    def test_instructions_are_the_only_sign_grants(self) -> None:
        """Given instructions are granted exactly, once each, and still without a copy."""
        hcl = provision.render_worker_policy(
            "backpack-broker",
            "scalper",
            instructions=["orderExecute", "orderCancel", "orderExecute"],
        )
        assert grants(hcl) == {
            "backpack-broker/scalper/+/sign/orderCancel": "update",
            "backpack-broker/scalper/+/sign/orderExecute": "update",
        }
        assert "No copy grant" in hcl

    def test_copy_is_granted_only_on_request_and_a_key_narrows_the_scope(self) -> None:
        """A copy grant appears only with copy=True; a key name replaces the `+` wildcard."""
        hcl = provision.render_worker_policy(
            "grants", "scalper", "bot-a", ["orderExecute"], copy=True
        )
        assert grants(hcl) == {
            "grants/scalper/bot-a/copy": "read",
            "grants/scalper/bot-a/sign/orderExecute": "update",
        }
        assert "COPY GRANT" in hcl

    @pytest.mark.parametrize(
        ("args", "error"),
        [
            (("backpack-broker", "scalper", None, ["orderExecut"]), InvalidInput),
            (("backpack-broker", "scalper", None, ["../../secret"]), InvalidInput),
            (("backpack-broker", "Scalper"), InvalidInput),
            (("backpack-broker", "scalper", "bot/a"), InvalidInput),
            (('backpack"broker', "scalper"), ConfigError),
        ],
        ids=["unknown-instruction", "path-instruction", "bad-sub", "bad-key", "bad-prefix"],
    )
    def test_refuses_what_cannot_be_a_grant_path(
        self, args: tuple[object, ...], error: type[Exception]
    ) -> None:
        """Unknown instructions and names that cannot be a path part are refused."""
        with pytest.raises(error):
            provision.render_worker_policy(*args)  # type: ignore[arg-type]


REGENERATE = "backpack-vault policy export deploy/vault/policies"


class TestPolicyExport:
    def test_the_deploy_copy_is_what_the_command_exports(self, tmp_path: Path) -> None:
        """deploy/vault/policies holds exactly the .hcl files `policy export` writes, no others."""
        done = subprocess.run(
            [sys.executable, "-m", "backpack_vault", "policy", "export", str(tmp_path / "out")],
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        exported = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
        deployed = {p.name: p.read_bytes() for p in DEPLOYED.glob("*.hcl")}
        assert exported == deployed, (
            "deploy/vault/policies/ differs from the policies in the package (their one copy, "
            f"{SHIPPED.relative_to(REPO)}/): regenerate it with `{REGENERATE}`"
        )
        assert set(exported) == {
            f"{name}.hcl" for name in (*provision.POLICY_FILES, provision.TEMPLATED_WORKER_POLICY)
        }
        assert sorted(done.stdout.splitlines()) == sorted(
            str(tmp_path / "out" / n) for n in exported
        )

    def test_exports_the_shipped_defaults_whatever_the_settings(self, tmp_path: Path) -> None:
        """Without --configured the files are as shipped, even with other names configured."""
        result = CliRunner().invoke(
            cli, ["policy", "export", str(tmp_path)], env=CUSTOM_ENV, catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
            p.name: p.read_text() for p in SHIPPED.glob("*.hcl")
        }

    def test_configured_export_is_what_setup_writes(self, tmp_path: Path) -> None:
        """With --configured the configured names are in place, as `vault setup` writes them."""
        (tmp_path / "keep.txt").write_text("not a policy")
        result = CliRunner().invoke(
            cli,
            ["policy", "export", "--configured", str(tmp_path)],
            env=CUSTOM_ENV,
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        written = {p.stem: p.read_text() for p in tmp_path.glob("*.hcl")}
        loaded = provision.load_policy_files(
            custom_settings("http://127.0.0.1:1"), approle_accessor=provision.ACCESSOR_PLACEHOLDER
        )
        assert written == loaded
        assert provision.ACCESSOR_PLACEHOLDER in written[provision.TEMPLATED_WORKER_POLICY]
        assert (tmp_path / "keep.txt").read_text() == "not a policy"

    def test_an_unwritable_directory_is_a_config_error(self, tmp_path: Path) -> None:
        """A DIR that cannot be created exits 2 and names it."""
        (tmp_path / "file").write_text("")
        result = CliRunner().invoke(cli, ["policy", "export", str(tmp_path / "file" / "sub")])
        assert result.exit_code == 2
        assert "cannot write the policies into" in result.output


class TestPolicyFiles:
    def test_templated_file_is_the_rendered_default(self) -> None:
        """The templated worker policy file is what the renderer writes from the instructions."""
        text = (SHIPPED / f"{provision.TEMPLATED_WORKER_POLICY}.hcl").read_text()
        assert text == provision.render_templated_worker_policy(), (
            "regenerate service/backpack_vault/vault/policies/backpack-vault-worker-templated.hcl "
            f"from provision.render_templated_worker_policy(), then its deploy copy: `{REGENERATE}`"
        )

    def test_default_settings_load_the_files_unchanged(self) -> None:
        """With default names the loaded policies are the files; templated only with an accessor."""
        settings = Settings(vault=VaultSettings(), broker=BrokerSettings(), checks=CheckSettings())
        loaded = provision.load_policy_files(settings)
        assert loaded == {
            name: (SHIPPED / f"{name}.hcl").read_text() for name in provision.POLICY_FILES
        }
        with_templated = provision.load_policy_files(settings, approle_accessor="auth_approle_1f2e")
        templated = with_templated[provision.TEMPLATED_WORKER_POLICY]
        assert "{{identity.entity.aliases.auth_approle_1f2e.metadata.role_name}}" in templated
        assert provision.ACCESSOR_PLACEHOLDER not in templated

    def test_configured_names_replace_every_default(self) -> None:
        """Configured mount, prefixes and wrap bound replace the defaults in every path."""
        loaded = provision.load_policy_files(
            custom_settings("http://127.0.0.1:1"), approle_accessor="auth_approle_1f2e"
        )
        paths = {p for hcl in loaded.values() for p in PATH.findall(hcl)}
        assert f"{KV_MOUNT}/data/{KV_PREFIX}/*" in paths
        assert f"{KV_MOUNT}/metadata/{KV_PREFIX}/*" in paths
        assert f"{KV_MOUNT}/data/{KV_PREFIX}-leader" in paths
        assert not [p for p in paths if p.startswith(("secret/", "backpack-broker/"))]
        assert all(p.startswith(f"{GRANTS}/") for p in paths if "/sign/" in p)
        daemon = loaded[provision.DAEMON_POLICY]
        assert f'max_wrapping_ttl = "{MAX_WRAP}s"' in daemon
        assert '"300s"' not in daemon

    @pytest.mark.parametrize(
        "vault",
        [{"kv_mount": 'se"cret'}, {"kv_prefix": "back pack"}, {"grant_prefix": "x/../"}],
        ids=["quote", "space", "dotdot"],
    )
    def test_refuses_names_that_cannot_be_a_path(self, vault: dict[str, str]) -> None:
        """A setting that would break out of an HCL path string is a ConfigError."""
        with pytest.raises(ConfigError):
            provision.load_policy_files(settings_for("http://127.0.0.1:1", **vault))

    def test_refuses_an_accessor_that_is_not_one(self) -> None:
        """Only accessor-shaped strings are put into the templated policy."""
        settings = settings_for("http://127.0.0.1:1")
        with pytest.raises(ConfigError):
            provision.load_policy_files(settings, approle_accessor='x"}} path "*')


K8S = KubernetesAuth(worker_subaccounts=("alpha",), worker_namespaces=("trading",))


class TestSetup:
    def test_first_run_creates_and_second_run_changes_nothing(self, blank: DevVault) -> None:
        """On a fresh server every item is created; running again reports no change."""
        settings = custom_settings(blank.addr, blank.root_token)
        admin = logged_in(settings.vault)
        subs = ["alpha", "beta", "alpha"]
        first = provision.setup(
            admin, settings, approle_subaccounts=subs, approle_daemon=True, kubernetes=K8S
        )
        second = provision.setup(
            admin, settings, approle_subaccounts=subs, approle_daemon=True, kubernetes=K8S
        )
        admin.close()
        root = hvac.Client(url=blank.addr, token=blank.root_token.reveal())
        daemon_role = root.auth.kubernetes.read_role("backpack-vault")
        worker_role = root.auth.kubernetes.read_role("backpack-worker-alpha")
        assert daemon_role["bound_service_account_names"] == ["backpack-vault"]
        assert daemon_role["bound_service_account_namespaces"] == ["backpack-vault"]
        assert daemon_role["token_policies"] == ["backpack-vault-daemon"]
        assert worker_role["bound_service_account_names"] == ["backpack-worker-alpha"]
        assert worker_role["bound_service_account_namespaces"] == ["trading"]
        assert worker_role["token_policies"] == ["backpack-worker-alpha"]
        assert [(i.kind, i.name) for i in first.items] == [
            ("secrets engine", f"{KV_MOUNT}/"),
            ("policy", "backpack-vault-daemon"),
            ("policy", "backpack-vault-operator"),
            ("policy", "backpack-vault-metadata-reader"),
            ("auth method", "approle/"),
            ("policy", "backpack-vault-worker-templated"),
            ("policy", "backpack-worker-alpha"),
            ("policy", "backpack-worker-beta"),
            ("approle role", "approle/backpack-worker-alpha"),
            ("approle role", "approle/backpack-worker-beta"),
            ("approle role", "approle/backpack-vault-daemon"),
            ("auth method", "kubernetes/"),
            ("kubernetes role", "kubernetes/backpack-vault"),
            ("kubernetes role", "kubernetes/backpack-worker-alpha"),
        ]
        assert {i.outcome for i in first.items} == {Outcome.CREATED}
        assert first.changed
        assert [(i.kind, i.name) for i in second.items] == [(i.kind, i.name) for i in first.items]
        assert {i.outcome for i in second.items} == {Outcome.UNCHANGED}
        assert not second.changed
        assert second.as_dict()["changed"] is False

    def test_default_mount_of_a_dev_server_is_kept(self, blank: DevVault) -> None:
        """The dev server's pre-mounted secret/ is reported unchanged, not created."""
        settings = settings_for(blank.addr, blank.root_token)
        admin = logged_in(settings.vault)
        report = provision.setup(admin, settings)
        admin.close()
        assert report.outcome("secrets engine", "secret/") is Outcome.UNCHANGED
        assert [i.kind for i in report.items] == ["secrets engine", "policy", "policy", "policy"]

    def test_edited_policy_is_restored_and_a_tailored_worker_policy_kept(
        self, blank: DevVault
    ) -> None:
        """A drifted shared policy is rewritten (changed); an operator's worker policy is kept."""
        settings = settings_for(blank.addr, blank.root_token, grant_prefix="drift")
        admin = logged_in(settings.vault)
        provision.setup(admin, settings, approle_subaccounts=["gamma"])
        tailored = provision.render_worker_policy("drift", "gamma", instructions=["orderExecute"])
        p = Provisioner(admin)
        p.ensure_policy("backpack-vault-operator", 'path "x/*" { capabilities = ["read"] }')
        p.ensure_policy("backpack-worker-gamma", tailored)
        report = provision.setup(admin, settings, approle_subaccounts=["gamma"])
        assert report.outcome("policy", "backpack-vault-operator") is Outcome.CHANGED
        assert report.outcome("policy", "backpack-worker-gamma") is Outcome.UNCHANGED
        assert not p.ensure_policy("backpack-worker-gamma", tailored)  # still the operator's
        assert "kept" in str(report)
        admin.close()


@pytest.fixture
def blank() -> Iterator[DevVault]:
    """An OpenBao dev server of this test's own, with nothing set up on it yet."""
    with DevVault() as server:
        yield server


@pytest.fixture(scope="module")
def ready() -> Iterator[tuple[Settings, Vault]]:
    """A server of this module's own, set up with non-default names, and its admin client."""
    with DevVault() as server:
        settings = custom_settings(server.addr, server.root_token)
        admin = logged_in(settings.vault)
        provision.setup(admin, settings, approle_subaccounts=["alpha"], approle_daemon=True)
        yield settings, admin
        admin.close()


def client_with(ready: tuple[Settings, Vault], *policies: str, prefix: str = KV_PREFIX) -> Vault:
    settings, admin = ready
    token = Provisioner(admin).create_token(list(policies))
    return logged_in(replace(settings.vault, token=token, kv_prefix=prefix))


class TestGrantedAccess:
    def test_metadata_reader_lists_and_shows_but_cannot_read_secrets(
        self, ready: tuple[Settings, Vault]
    ) -> None:
        """The metadata-reader lists keys and reads their records; reading a secret is a 403."""
        _, admin = ready
        record, secret = new_record()
        admin.create_key(record, secret)
        reader = client_with(ready, provision.METADATA_READER_POLICY)
        assert record.ref in reader.list_refs()
        assert reader.read_record(record.ref).api_key == record.api_key
        with pytest.raises(VaultDenied):
            reader.read_key(record.ref)
        with pytest.raises(VaultDenied):
            reader.create_key(*new_record())
        reader.close()

    def test_operator_manages_keys_without_reading_secrets(
        self, ready: tuple[Settings, Vault]
    ) -> None:
        """The operator stores, lists, retires and deletes keys, and cannot read a secret."""
        operator = client_with(ready, provision.OPERATOR_POLICY)
        record, secret = new_record()
        stored = operator.create_key(record, secret)
        assert stored.version == 1
        assert record.ref in operator.list_refs()
        retired = operator.set_status(record.ref, Status.RETIRED, now="2026-01-01T00:00:00Z")
        assert retired.status is Status.RETIRED
        with pytest.raises(VaultDenied):
            operator.read_key(record.ref)
        operator.delete_key(record.ref)
        assert record.ref not in operator.list_refs()
        operator.close()

    def test_daemon_reads_keys_patches_status_keeps_its_lease_and_wraps(
        self, ready: tuple[Settings, Vault]
    ) -> None:
        """The daemon reads keys, moves status, owns its lease, and wraps within the bound."""
        _, admin = ready
        record, secret = new_record()
        admin.create_key(record, secret)
        daemon = client_with(ready, provision.DAEMON_POLICY)
        assert daemon.read_key(record.ref)[1] == secret
        assert record.ref in daemon.list_refs()
        revoked = daemon.set_status(record.ref, Status.REVOKED, now="2026-01-01T00:00:00Z")
        assert revoked.status is Status.REVOKED
        lease = daemon.read_document("leader")
        version = daemon.write_document("leader", {"holder": "a"}, lease[1] if lease else 0)
        assert daemon.read_document("leader") == ({"holder": "a"}, version)
        wrapped = daemon.wrap({"api_key": record.api_key}, MAX_WRAP)
        daemon.revoke_accessor(wrapped.accessor)
        with pytest.raises(VaultDenied):
            daemon.wrap({"api_key": record.api_key}, MAX_WRAP + 1)
        with pytest.raises(VaultDenied):
            daemon.create_key(*new_record())
        daemon.close()
        elsewhere = client_with(ready, provision.DAEMON_POLICY, prefix="other")
        with pytest.raises(VaultDenied):
            elsewhere.read_key(record.ref)
        elsewhere.close()

    def test_worker_policy_grants_exactly_its_grant_paths(
        self, ready: tuple[Settings, Vault]
    ) -> None:
        """A rendered worker policy answers capabilities-self as written, and deny on KV."""
        _, admin = ready
        hcl = provision.render_worker_policy(
            GRANTS, "scalper", "bot-a", ["orderExecute"], copy=True
        )
        Provisioner(admin).ensure_policy("t-worker-scalper", hcl)
        token = Provisioner(admin).create_token(["t-worker-scalper"])
        expected = {
            f"{GRANTS}/scalper/bot-a/copy": {"read"},
            f"{GRANTS}/scalper/bot-a/sign/orderExecute": {"update"},
            f"{GRANTS}/scalper/bot-a/sign/withdraw": {"deny"},
            f"{GRANTS}/scalper/bot-b/copy": {"deny"},
            f"{GRANTS}/other/bot-a/sign/orderExecute": {"deny"},
            "backpack-broker/scalper/bot-a/copy": {"deny"},
            f"{KV_MOUNT}/data/{KV_PREFIX}/scalper/bot-a": {"deny"},
            f"{KV_MOUNT}/metadata/{KV_PREFIX}/scalper/bot-a": {"deny"},
            f"{KV_MOUNT}/metadata/{KV_PREFIX}/": {"deny"},
        }
        answers = admin.capabilities(token, list(expected))
        assert answers == expected

    def test_templated_policy_follows_the_approle_role_name(
        self, ready: tuple[Settings, Vault]
    ) -> None:
        """A role named after a sub-account gets that sub-account's default grants, no other's."""
        settings, admin = ready
        p = Provisioner(admin)
        p.ensure_approle_role("scalper", [provision.TEMPLATED_WORKER_POLICY])
        token = approle_login(settings.vault.addr, *p.approle_credentials("scalper"))
        paths = [
            f"{GRANTS}/scalper/bot-a/sign/balanceQuery",
            f"{GRANTS}/scalper/bot-a/sign/orderExecute",
            f"{GRANTS}/scalper/bot-a/copy",
            f"{GRANTS}/alpha/bot-a/sign/balanceQuery",
            f"{KV_MOUNT}/data/{KV_PREFIX}/scalper/bot-a",
        ]
        assert admin.capabilities(token, paths) == dict(
            zip(paths, [{"update"}, {"deny"}, {"deny"}, {"deny"}, {"deny"}], strict=True)
        )

    def test_setup_roles_log_in_with_their_own_policies(
        self, ready: tuple[Settings, Vault]
    ) -> None:
        """A sub-account's AppRole login gets its default grants; the daemon's gets the daemon's."""
        settings, admin = ready
        p = Provisioner(admin)
        worker = approle_login(settings.vault.addr, *p.approle_credentials("backpack-worker-alpha"))
        paths = [
            f"{GRANTS}/alpha/bot/sign/accountQuery",
            f"{GRANTS}/alpha/bot/sign/orderExecute",
            f"{GRANTS}/alpha/bot/copy",
            f"{GRANTS}/beta/bot/sign/accountQuery",
        ]
        assert admin.capabilities(worker, paths) == dict(
            zip(paths, [{"update"}, {"deny"}, {"deny"}, {"deny"}], strict=True)
        )
        role_id, secret_id = p.approle_credentials(provision.DAEMON_APPROLE_ROLE)
        daemon = Vault(
            replace(
                settings.vault,
                token=None,
                auth="approle",
                approle_role_id=role_id,
                approle_secret_id=secret_id,
            )
        )
        info = daemon.login()
        assert provision.DAEMON_POLICY in info.policies
        record, secret = new_record()
        admin.create_key(record, secret)
        assert daemon.read_key(record.ref)[1] == secret
        daemon.close()
