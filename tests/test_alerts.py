"""Alerts in the formats teams use: our JSON, Slack's incoming webhook, Alertmanager's v2 API."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backpack_vault.alerts import Webhook
from backpack_vault.config import load
from backpack_vault.core.keys import KeyRef, Status
from backpack_vault.core.verdicts import CheckResult, Verdict
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.errors import ConfigError
from backpack_vault.events import Cause, KeyStatusChanged
from backpack_vault.testing import make_record

REF = KeyRef("main", "bot-a")


class Receiver:
    """A local webhook receiver that fails its first ``fail`` requests with a 503."""

    def __init__(self) -> None:
        self.bodies: list[object] = []
        self.fail = 0

    async def receive(self, request: Request) -> Response:
        if self.fail > 0:
            self.fail -= 1
            return Response(status_code=503)
        self.bodies.append(json.loads(await request.body()))
        return Response(status_code=200)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    state = Receiver()
    app = Starlette(routes=[Route("/hook/T0KEN", state.receive, methods=["POST"])])
    with ServerThread(app) as server:
        yield state, f"{server.url}/hook/T0KEN"


def _revoked() -> KeyStatusChanged:
    result = CheckResult(
        REF, Verdict.REJECTED, "key_rejected", "2026-01-01T00:00:00Z", row=7, http_status=401
    )
    record = make_record(REF, "A" * 43 + "=", status=Status.REVOKED)
    return KeyStatusChanged(REF, Status.ACTIVE, Status.REVOKED, Cause.CHECK, record, result)


def _systemic() -> CheckResult:
    return CheckResult(REF, Verdict.UNKNOWN, "systemic", "2026-01-01T00:00:00Z", alert=True)


def _hook(url: str, alert_format: str) -> Webhook:
    return Webhook(
        httpx.Client(), url, alert_format=alert_format, wait_initial_s=0.01, wait_max_s=0.02
    )


class TestFormats:
    @pytest.mark.parametrize("alert_format", ["json", "slack", "alertmanager"])
    def test_each_format_is_delivered_with_retries(
        self, receiver: tuple[Receiver, str], alert_format: str
    ) -> None:
        """A 503 is retried; then the receiver gets one body in its own format."""
        state, url = receiver
        state.fail = 1
        hook = _hook(url, alert_format)
        hook.on_event(_revoked())
        hook.close()
        assert len(state.bodies) == 1

    def test_json_is_our_own_payload(self, receiver: tuple[Receiver, str]) -> None:
        """The json format is the documented key.status_changed object."""
        state, url = receiver
        hook = _hook(url, "json")
        hook.on_event(_revoked())
        hook.close()
        body = state.bodies[0]
        assert isinstance(body, dict)
        assert (body["event"], body["key"], body["new_status"]) == (
            "key.status_changed",
            "main/bot-a",
            "revoked",
        )

    def test_slack_is_an_incoming_webhook_message(self, receiver: tuple[Receiver, str]) -> None:
        """Slack gets {"text": ...} naming the key, the change and, for systemic, the advice."""
        state, url = receiver
        hook = _hook(url, "slack")
        hook.on_event(_revoked())
        hook.check_alert(_systemic())
        hook.close()
        revoked, systemic = state.bodies
        assert isinstance(revoked, dict)
        assert set(revoked) == {"text"}
        assert "main/bot-a: active -> revoked" in revoked["text"]
        assert isinstance(systemic, dict)
        assert "keys revoke" in systemic["text"]

    def test_alertmanager_gets_v2_alerts(self, receiver: tuple[Receiver, str]) -> None:
        """Alertmanager's POST /api/v2/alerts body: a list of {labels, annotations, startsAt}."""
        state, url = receiver
        hook = _hook(url, "alertmanager")
        hook.on_event(_revoked())
        hook.check_alert(_systemic())
        hook.close()
        (revoked,), (systemic,) = state.bodies  # type: ignore[misc]
        assert revoked["labels"] == {
            "alertname": "BackpackVaultKeyStatusChanged",
            "severity": "critical",
            "service": "backpack-vault",
            "key": "main/bot-a",
            "new_status": "revoked",
            "reason": "key_rejected",
        }
        assert revoked["startsAt"] == "2026-01-01T00:00:00Z"
        assert "active -> revoked" in revoked["annotations"]["summary"]
        assert systemic["labels"]["alertname"] == "BackpackVaultCheckAlert"
        assert "keys revoke" in systemic["annotations"]["description"]

    def test_the_format_is_a_setting(self) -> None:
        """BACKPACK_VAULT_ALERT_FORMAT takes json, slack or alertmanager, nothing else."""
        assert load({"BACKPACK_VAULT_ALERT_FORMAT": "slack"}).checks.alert_format == "slack"
        assert load({}).checks.alert_format == "json"
        with pytest.raises(ConfigError, match="BACKPACK_VAULT_ALERT_FORMAT"):
            load({"BACKPACK_VAULT_ALERT_FORMAT": "pagerduty"})
