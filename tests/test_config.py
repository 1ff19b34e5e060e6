"""Settings come from flags over a file over the environment, and bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from backpack_vault.config import Secret, load
from backpack_vault.errors import ConfigError


class TestLoad:
    def test_defaults_match_the_design(self) -> None:
        """With nothing set, the documented defaults apply."""
        settings = load({})
        assert settings.listen == "127.0.0.1:8280"
        assert settings.checks.backpack_url == "https://api.backpack.exchange"
        assert settings.checks.interval == 300
        assert (settings.vault.kv_mount, settings.vault.kv_prefix, settings.vault.grant_prefix) == (
            "secret",
            "backpack",
            "backpack-broker",
        )
        assert (settings.broker.copy_ttl, settings.broker.wrap_ttl) == (900, 60)
        assert settings.vault.auth == "token"
        assert settings.checks.webhook_url is None
        assert settings.log_format == "json"

    def test_console_logs_on_a_terminal(self) -> None:
        """The log format defaults to console when stderr is a terminal."""
        assert load({}, tty=True).log_format == "console"

    def test_environment_names_are_the_contract(self) -> None:
        """Every documented variable lands in its setting."""
        settings = load(
            {
                "BACKPACK_VAULT_LISTEN": "0.0.0.0:9000",
                "BACKPACK_VAULT_BACKPACK_URL": "http://127.0.0.1:8300/",
                "BACKPACK_VAULT_CHECK_INTERVAL": "5",
                "BACKPACK_VAULT_CHECK_TIMEOUT": "2.5",
                "BACKPACK_VAULT_KV_MOUNT": "kv",
                "BACKPACK_VAULT_KV_PREFIX": "bp",
                "BACKPACK_VAULT_GRANT_PREFIX": "grants",
                "BACKPACK_VAULT_COPY_TTL": "120",
                "BACKPACK_VAULT_WRAP_TTL": "30",
                "BACKPACK_VAULT_AUTH": "approle",
                "BACKPACK_VAULT_WEBHOOK_URL": "https://hooks.example/x",
                "BACKPACK_VAULT_LOG_FORMAT": "console",
                "VAULT_ADDR": "https://vault:8200",
                "VAULT_TOKEN": "s.abc",
                "VAULT_CACERT": "/ca.pem",
                "VAULT_NAMESPACE": "team",
            }
        )
        assert settings.listen_host_port == ("0.0.0.0", 9000)
        assert settings.checks.backpack_url == "http://127.0.0.1:8300"
        assert settings.checks.interval == 5.0
        assert settings.checks.timeout == 2.5
        assert settings.vault.kv_mount == "kv"
        assert settings.vault.kv_prefix == "bp"
        assert settings.vault.grant_prefix == "grants"
        assert settings.broker.copy_ttl == 120
        assert settings.broker.wrap_ttl == 30
        assert settings.vault.auth == "approle"
        assert settings.checks.webhook_url == Secret("https://hooks.example/x")
        assert settings.log_format == "console"
        assert settings.vault.addr == "https://vault:8200"
        assert settings.vault.token == Secret("s.abc")
        assert settings.vault.cacert == "/ca.pem"
        assert settings.vault.namespace == "team"

    def test_flags_beat_the_file_which_beats_the_environment(self, tmp_path: Path) -> None:
        """Precedence: flags > file > environment."""
        file = tmp_path / "bv.toml"
        file.write_text('listen = "127.0.0.1:7000"\ncheck_interval = 60\nkv_prefix = "file"\n')
        env = {
            "BACKPACK_VAULT_LISTEN": "127.0.0.1:6000",
            "BACKPACK_VAULT_KV_PREFIX": "env",
            "BACKPACK_VAULT_COPY_TTL": "100",
        }
        settings = load(env, file, {"listen": "127.0.0.1:8000", "kv_prefix": None})
        assert settings.listen == "127.0.0.1:8000"
        assert settings.vault.kv_prefix == "file"
        assert settings.checks.interval == 60.0
        assert settings.broker.copy_ttl == 100

    def test_config_file_from_the_environment(self, tmp_path: Path) -> None:
        """BACKPACK_VAULT_CONFIG names the file when no flag does."""
        file = tmp_path / "bv.toml"
        file.write_text('grant_prefix = "g"\n')
        assert load({"BACKPACK_VAULT_CONFIG": str(file)}).vault.grant_prefix == "g"

    @pytest.mark.parametrize(
        ("env", "match"),
        [
            ({"BACKPACK_VAULT_LISTEN": "8280"}, "HOST:PORT"),
            ({"BACKPACK_VAULT_CHECK_INTERVAL": "-1"}, "greater than 0"),
            ({"BACKPACK_VAULT_CHECK_INTERVAL": "often"}, "check_interval"),
            ({"BACKPACK_VAULT_AUTH": "ldap"}, "token, token-file, approle, kubernetes"),
            ({"BACKPACK_VAULT_BACKPACK_URL": "api.backpack.exchange"}, "http"),
            ({"BACKPACK_VAULT_WRAP_TTL": "600"}, "max_wrap_ttl"),
        ],
        ids=["listen", "negative", "not-a-number", "auth", "url", "wrap-over-max"],
    )
    def test_bad_values_name_the_setting(self, env: dict[str, str], match: str) -> None:
        """A bad value raises ConfigError naming the variable and what is expected."""
        with pytest.raises(ConfigError, match=match):
            load(env)

    def test_a_bad_webhook_url_is_not_echoed(self) -> None:
        """The webhook URL may carry a token: an error about it never shows the value."""
        with pytest.raises(ConfigError) as info:
            load({"BACKPACK_VAULT_WEBHOOK_URL": "hooks.example/T0KEN-in-the-url"})
        assert "T0KEN" not in info.value.message
        assert "BACKPACK_VAULT_WEBHOOK_URL" in info.value.message
        assert "T0KEN" not in repr(load({"BACKPACK_VAULT_WEBHOOK_URL": "https://h/T0KEN"}))

    def test_unknown_file_settings_are_refused(self, tmp_path: Path) -> None:
        """A typo in the file is an error listing the known names."""
        file = tmp_path / "bv.toml"
        file.write_text('lisen = "x"\n')
        with pytest.raises(ConfigError, match=r"unknown setting.*lisen"):
            load({}, file)

    def test_a_missing_file_is_a_clear_error(self, tmp_path: Path) -> None:
        """A config path that does not exist says so."""
        with pytest.raises(ConfigError, match="does not exist"):
            load({}, tmp_path / "nope.toml")


class TestSecret:
    def test_a_derived_value_is_worked_out_once_per_secret(self) -> None:
        """The daemon hashes a worker's token several times per request: once, in fact."""
        calls: list[str] = []

        def digest(value: str) -> str:
            calls.append(value)
            return f"h({len(value)})"

        token = Secret("s.worker")
        assert [token.derived(digest) for _ in range(3)] == ["h(8)"] * 3
        assert calls == ["s.worker"]
        assert Secret("s.worker").derived(digest) == "h(8)"  # another object: worked out again
        assert len(calls) == 2

    def test_another_function_is_not_answered_from_the_memo(self) -> None:
        token = Secret("abc")
        assert token.derived(str.upper) == "ABC"
        assert token.derived(str.title) == "Abc"
        assert token.derived(str.upper) == "ABC"

    def test_the_memo_never_shows_the_value(self) -> None:
        token = Secret("s.canary-value")
        assert token.derived(lambda value: f"h({value})") == "h(s.canary-value)"  # memo holds it
        assert "canary" not in repr(token)
        assert "canary" not in f"{token}"
        assert token == Secret("s.canary-value")  # equality is the value's alone
