"""Storing keys in a real OpenBao: round trips, refusals that leave Vault unchanged, CAS races."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backpack_vault.cli import cli
from backpack_vault.config import Secret, VaultSettings
from backpack_vault.core.keys import (
    PRODUCTION_EXCHANGE,
    KeyRecord,
    KeyRef,
    Origin,
    Status,
    generate_pair,
)
from backpack_vault.dev.vault import DevVault, bao_binary, free_port
from backpack_vault.errors import UnknownKey, VaultDenied, WriteConflict
from backpack_vault.vault.client import Provisioner, Vault

VECTORS = json.loads((Path(__file__).parent / "data" / "vectors.json").read_text())
KEY = VECTORS["key"]

Invoke = Callable[..., Result]


@pytest.fixture
def invoke(vault_settings: VaultSettings) -> Invoke:
    """Run the CLI in-process against the test's Vault prefix."""

    def run(*args: str, stdin: str | None = None, token: Secret | None = None) -> Result:
        env = {
            "VAULT_ADDR": vault_settings.addr,
            "VAULT_TOKEN": (token or vault_settings.token or Secret("")).reveal(),
            "BACKPACK_VAULT_KV_PREFIX": vault_settings.kv_prefix,
            "BACKPACK_VAULT_LOG_FORMAT": "json",
        }
        return CliRunner().invoke(cli, list(args), input=stdin, env=env, catch_exceptions=False)

    return run


def bao(dev_vault: DevVault, *args: str) -> dict[str, Any]:
    """Run the real `bao` CLI; flags go before the final path argument."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ["HOME"],
        "BAO_ADDR": dev_vault.addr,
        "BAO_TOKEN": dev_vault.root_token.reveal(),
    }
    out = subprocess.run(
        [bao_binary(), *args[:-1], "-format=json", args[-1]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def snapshot(vault: Vault) -> list[tuple[str, int, str]]:
    """Everything stored under the test's prefix: names, versions and statuses."""
    return [(str(r.ref), r.version, r.status.value) for r in vault.list_records()]


class TestAdd:
    def test_round_trip_is_readable_by_the_bao_cli(
        self, invoke: Invoke, dev_vault: DevVault, kv_prefix: str
    ) -> None:
        """`keys add` stores exactly api_key and api_secret, and the metadata DESIGN names."""
        result = invoke(
            "keys",
            "add",
            "main/bot-a",
            "--api-key",
            KEY["api_key"],
            "--label",
            "desk 1",
            stdin=KEY["api_secret"] + "\n",
        )
        assert result.exit_code == 0, result.output
        data = bao(dev_vault, "kv", "get", "-mount=secret", f"{kv_prefix}/main/bot-a")
        assert data["data"]["data"] == {"api_key": KEY["api_key"], "api_secret": KEY["api_secret"]}
        meta = bao(dev_vault, "kv", "metadata", "get", "-mount=secret", f"{kv_prefix}/main/bot-a")
        custom = meta["data"]["custom_metadata"]
        assert custom["api_key"] == KEY["api_key"]
        assert custom["subaccount"] == "main"
        assert custom["read_only"] == "false"
        assert custom["label"] == "desk 1"
        assert custom["origin"] == "backpack-ui"
        assert custom["status"] == "active"
        assert custom["created_at"] == custom["status_since"]
        assert meta["data"]["cas_required"] is True

    def test_secret_file_and_read_only(self, invoke: Invoke, vault: Vault, tmp_path: Path) -> None:
        """--secret-file reads the secret; --read-only is recorded."""
        secret_file = tmp_path / "secret"
        secret_file.write_text(KEY["api_secret"])
        result = invoke(
            "keys",
            "add",
            "sub1/ro",
            "--api-key",
            KEY["api_key"],
            "--read-only",
            "--secret-file",
            str(secret_file),
        )
        assert result.exit_code == 0, result.output
        record, secret = vault.read_key(KeyRef("sub1", "ro"))
        assert record.read_only is True
        assert secret.reveal() == KEY["api_secret"]

    @pytest.mark.parametrize(
        ("check_id", "exit_code", "message"),
        [
            ("K1", 3, "64 bytes"),
            ("K4", 3, "does not belong"),
        ],
        ids=["64-byte-secret", "mismatch"],
    )
    def test_bad_material_is_refused_and_nothing_is_written(
        self, invoke: Invoke, vault: Vault, check_id: str, exit_code: int, message: str
    ) -> None:
        """Refused intakes exit with the documented code and leave Vault as it was."""
        check = next(c for c in VECTORS["key_format_checks"] if c["id"] == check_id)
        before = snapshot(vault)
        result = invoke(
            "keys", "add", "main/bad", "--api-key", check["api_key"], stdin=check["api_secret"]
        )
        assert result.exit_code == exit_code
        assert message in result.output
        assert check["api_secret"] not in result.output
        assert snapshot(vault) == before

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        api_key=st.one_of(st.text(max_size=60), st.just(KEY["api_key"])),
        secret=st.text(min_size=1, max_size=100),
    )
    def test_generated_garbage_never_reaches_vault(
        self, invoke: Invoke, vault: Vault, api_key: str, secret: str
    ) -> None:
        """Whatever is pasted, only a matching pair is stored; anything else changes nothing."""
        if secret.strip() == KEY["api_secret"] and api_key.strip() == KEY["api_key"]:
            return
        if not api_key.strip() or not secret.strip() or "\x00" in api_key:
            return
        before = snapshot(vault)
        result = invoke("keys", "add", "main/fuzz", "--api-key", api_key, stdin=secret)
        assert result.exit_code in (2, 3)
        assert snapshot(vault) == before

    def test_no_secret_on_stdin_is_a_clear_error(self, invoke: Invoke, vault: Vault) -> None:
        """An empty stdin says where the secret must come from."""
        result = invoke("keys", "add", "main/none", "--api-key", KEY["api_key"], stdin="")
        assert result.exit_code == 3
        assert "stdin" in result.output
        assert snapshot(vault) == []

    def test_the_secret_is_never_an_option(self, invoke: Invoke) -> None:
        """There is no command-line option that takes a secret."""
        result = invoke("keys", "add", "main/x", "--api-key", KEY["api_key"], "--secret", "x")
        assert result.exit_code == 2
        assert "No such option" in result.output

    def test_an_existing_name_is_a_conflict(self, invoke: Invoke, vault: Vault) -> None:
        """A second add of one name is refused; the first key is untouched."""
        first = invoke(
            "keys", "add", "main/dup", "--api-key", KEY["api_key"], stdin=KEY["api_secret"]
        )
        assert first.exit_code == 0
        other = generate_pair()
        second = invoke(
            "keys", "add", "main/dup", "--api-key", other.api_key, stdin=other.secret.reveal()
        )
        assert second.exit_code == 6
        assert "already stored" in second.output
        record, secret = vault.read_key(KeyRef("main", "dup"))
        assert (record.api_key, secret.reveal(), record.version) == (
            KEY["api_key"],
            KEY["api_secret"],
            1,
        )


class TestConcurrentWriters:
    def test_exactly_one_of_two_racing_writers_wins(self, vault_settings: VaultSettings) -> None:
        """Two writers of one key: one stores, the other gets WriteConflict; no mix of both."""
        ref = KeyRef("main", "race")
        pairs = [generate_pair() for _ in range(2)]
        barrier = threading.Barrier(2)
        outcomes: list[object] = [None, None]

        def write(i: int) -> None:
            client = Vault(vault_settings)
            client.login()
            record = KeyRecord(
                ref=ref,
                api_key=pairs[i].api_key,
                read_only=False,
                status=Status.ACTIVE,
                origin=Origin.BACKPACK_UI,
                created_at="t",
                status_since="t",
                label=f"writer {i}",
            )
            barrier.wait()
            try:
                outcomes[i] = client.create_key(record, pairs[i].secret)
            except WriteConflict as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, o in enumerate(outcomes) if isinstance(o, KeyRecord)]
        assert len(winners) == 1
        assert isinstance(outcomes[1 - winners[0]], WriteConflict)
        reader = Vault(vault_settings)
        reader.login()
        record, secret = reader.read_key(ref)
        assert record.api_key == pairs[winners[0]].api_key
        assert secret == pairs[winners[0]].secret
        assert record.label == f"writer {winners[0]}"


METADATA_ONLY = """
path "secret/metadata/{prefix}/*" {{ capabilities = ["read", "list"] }}
path "secret/metadata/{prefix}" {{ capabilities = ["list"] }}
"""


class TestMetadataOnlyAccess:
    def test_list_and_show_work_without_reading_secrets(
        self, invoke: Invoke, vault: Vault, kv_prefix: str
    ) -> None:
        """A metadata-only token lists and shows keys and is refused the secret."""
        assert (
            invoke(
                "keys", "add", "main/meta", "--api-key", KEY["api_key"], stdin=KEY["api_secret"]
            ).exit_code
            == 0
        )
        provisioner = Provisioner(vault)
        provisioner.ensure_policy(f"{kv_prefix}-meta", METADATA_ONLY.format(prefix=kv_prefix))
        token = provisioner.create_token([f"{kv_prefix}-meta"])

        listed = invoke("keys", "list", "--json", token=token)
        assert listed.exit_code == 0, listed.output
        assert [k["key"] for k in json.loads(listed.output)] == ["main/meta"]
        shown = invoke("keys", "show", "main/meta", "--json", token=token)
        assert json.loads(shown.output)["status"] == "active"
        assert KEY["api_secret"] not in listed.output + shown.output

        reader = Vault(VaultSettings(addr=vault.settings.addr, token=token, kv_prefix=kv_prefix))
        reader.login()
        with pytest.raises(VaultDenied, match="denied read"):
            reader.read_key(KeyRef("main", "meta"))


class TestLifecycleCommands:
    def test_generate_stores_pending_and_prints_the_public_key(
        self, invoke: Invoke, vault: Vault
    ) -> None:
        """`keys generate` prints a 44-character public key and the web UI steps."""
        result = invoke("keys", "generate", "sub1/gen", "--read-only")
        assert result.exit_code == 0, result.output
        public = result.stdout.strip().splitlines()[0]
        record, secret = vault.read_key(KeyRef("sub1", "gen"))
        assert record.api_key == public
        assert len(public) == 44
        assert (record.status, record.origin, record.read_only) == (
            Status.PENDING,
            Origin.GENERATED,
            True,
        )
        assert "Public Key" in result.stderr
        assert "Read Only ON" in result.stderr
        assert secret.reveal() not in result.output

    def test_a_key_belongs_to_the_exchange_it_is_stored_for(
        self, invoke: Invoke, vault: Vault
    ) -> None:
        """Backpack itself by default; ``--exchange`` (a sandbox, say) when given."""
        assert invoke("keys", "generate", "main/prod").exit_code == 0
        made = invoke("keys", "generate", "main/sbx", "--exchange", "http://127.0.0.1:9/")
        assert made.exit_code == 0, made.output
        assert vault.read_record(KeyRef("main", "prod")).exchange == PRODUCTION_EXCHANGE
        assert vault.read_record(KeyRef("main", "sbx")).exchange == "http://127.0.0.1:9"
        bad = invoke("keys", "generate", "main/bad", "--exchange", "ftp://x")
        assert bad.exit_code == 3
        assert "not an http(s) URL" in bad.stderr
        with pytest.raises(UnknownKey):
            vault.read_record(KeyRef("main", "bad"))

    def test_retire_then_delete(self, invoke: Invoke, vault: Vault) -> None:
        """Retire marks the key final; delete needs --yes and removes every version."""
        invoke("keys", "add", "main/old", "--api-key", KEY["api_key"], stdin=KEY["api_secret"])
        assert invoke("keys", "retire", "main/old").exit_code == 0
        assert vault.read_record(KeyRef("main", "old")).status is Status.RETIRED
        again = invoke("keys", "retire", "main/old")
        assert again.exit_code == 0
        refused = invoke("keys", "delete", "main/old")
        assert refused.exit_code == 2
        assert "--yes" in refused.output
        assert invoke("keys", "delete", "main/old", "--yes").exit_code == 0
        with pytest.raises(UnknownKey):
            vault.read_record(KeyRef("main", "old"))

    def test_unknown_keys_exit_5(self, invoke: Invoke) -> None:
        """show, retire and delete of a missing key exit 5 and name it."""
        for verb in (("show",), ("retire",), ("delete", "--yes")):
            result = invoke("keys", verb[0], "main/ghost", *verb[1:])
            assert result.exit_code == 5
            assert "main/ghost" in result.output

    def test_a_retired_key_cannot_be_revived(self, invoke: Invoke, vault: Vault) -> None:
        """Status changes follow the lifecycle: retired stays retired, and a revoked key
        cannot be retired (only reinstated, after a VALID probe)."""
        invoke("keys", "add", "main/rv", "--api-key", KEY["api_key"], stdin=KEY["api_secret"])
        other = generate_pair()
        invoke("keys", "add", "main/rt", "--api-key", other.api_key, stdin=other.secret.reveal())
        vault.set_status(KeyRef("main", "rt"), Status.RETIRED, now="t")
        with pytest.raises(WriteConflict, match="cannot become active"):
            vault.set_status(KeyRef("main", "rt"), Status.ACTIVE, now="t")
        vault.set_status(KeyRef("main", "rv"), Status.REVOKED, now="t", verdict="REJECTED")
        result = invoke("keys", "retire", "main/rv")
        assert result.exit_code == 6


class TestVaultErrors:
    def test_vault_down_is_exit_9_with_a_clear_message(self) -> None:
        """An unreachable Vault exits 9 and says so."""
        env = {"VAULT_ADDR": f"http://127.0.0.1:{free_port()}", "VAULT_TOKEN": "x"}
        result = CliRunner().invoke(cli, ["keys", "list"], env=env)
        assert result.exit_code == 9
        assert "unreachable" in result.output

    def test_a_bad_operator_token_is_exit_10(self, vault_settings: VaultSettings) -> None:
        """A token Vault does not know is refused with an actionable message."""
        env = {"VAULT_ADDR": vault_settings.addr, "VAULT_TOKEN": "not-a-token"}
        result = CliRunner().invoke(cli, ["keys", "list"], env=env)
        assert result.exit_code == 10
        assert "policy" in result.output or "log in" in result.output

    def test_no_token_at_all_is_a_config_error(self, vault_settings: VaultSettings) -> None:
        """Without VAULT_TOKEN the CLI says which variable to set."""
        result = CliRunner().invoke(cli, ["keys", "list"], env={"VAULT_ADDR": vault_settings.addr})
        assert result.exit_code == 2
        assert "VAULT_TOKEN" in result.output
