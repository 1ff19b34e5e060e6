"""Log lines are events with context, and nothing secret survives rendering."""

from __future__ import annotations

import io
import json
import logging

import structlog

from backpack_vault.config import Secret, VaultSettings
from backpack_vault.logging import REDACTED, configure, get_logger
from backpack_vault.vault.client import Vault

CANARY = "c4n4ry-S3CRET-value"


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


class TestRedaction:
    def test_sensitive_fields_are_masked_before_rendering(self) -> None:
        """Fields named like secrets, nested ones too, render as ***."""
        stream = io.StringIO()
        configure("json", "debug", stream)
        get_logger().info(
            "broker.copy_issued",
            key="main/a",
            api_secret=CANARY,
            token=CANARY,
            wrap_token=CANARY,
            extra={"headers": {"X-Signature": CANARY}, "Authorization": CANARY},
            items=[{"secret_id": CANARY}],
        )
        [event] = lines(stream)
        assert CANARY not in stream.getvalue()
        assert event["event"] == "broker.copy_issued"
        assert event["key"] == "main/a"
        assert event["api_secret"] == REDACTED
        assert event["items"] == [{"secret_id": REDACTED}]

    def test_secret_values_are_masked_whatever_their_field(self) -> None:
        """A Secret value under any name renders as ***."""
        stream = io.StringIO()
        configure("console", "info", stream)
        get_logger().info("vault.logged_in", whatever=Secret(CANARY))
        assert CANARY not in stream.getvalue()
        assert "vault.logged_in" in stream.getvalue()

    def test_stdlib_loggers_go_through_the_same_pipeline(self) -> None:
        """uvicorn, apscheduler and the rest render as JSON events too."""
        stream = io.StringIO()
        configure("json", "info", stream)
        try:
            logging.getLogger("uvicorn.error").info("Started server process")
            logging.getLogger("httpx").info("HTTP Request: POST https://hooks.example/%s", CANARY)
        finally:
            configure("json", "info", io.StringIO())
        [event] = lines(stream)
        assert event["event"] == "Started server process"
        assert event["logger"] == "uvicorn.error"
        assert CANARY not in stream.getvalue()

    def test_levels_below_the_setting_are_dropped(self) -> None:
        """log_level=warning drops info events."""
        stream = io.StringIO()
        configure("json", "warning", stream)
        get_logger().info("quiet.event")
        get_logger().warning("loud.event")
        assert [e["event"] for e in lines(stream)] == ["loud.event"]
        structlog.reset_defaults()


class TestVaultClientSettings:
    def test_the_ca_bundle_reaches_every_vault_call(self) -> None:
        """VAULT_CACERT is used by the session that every hvac call goes through."""
        for client in (
            Vault(VaultSettings(cacert="/etc/ca/vault.pem")),
            Vault.for_service(VaultSettings(cacert="/etc/ca/vault.pem")),
        ):
            assert client._session.verify == "/etc/ca/vault.pem"
            client.close()
