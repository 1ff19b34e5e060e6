"""Alerts: a JSON POST to an operator's webhook when a check changes a key's status.

:meth:`Webhook.on_event` listens on the daemon's event bus and alerts on
``KeyStatusChanged`` events a check caused (a change made with the CLI is the
operator's own doing); :meth:`Webhook.check_alert` covers results that need a
human without changing a status (systemic, misconfigured, unexpected answers).
Such an alert says, in ``advice``, what the operator can do. A systemic verdict
alerts once per outage: the checker marks only the first one (``checks.py``).

Delivery is best effort with bounded retries (stamina): connection failures,
timeouts, 429 and 5xx are retried; other answers are not. Nothing here ever
raises into the caller, since an alert must not break the check that caused it.
Payloads name keys, statuses and verdicts, and never carry secret material.
The webhook URL itself is treated as a secret (chat webhooks embed a token in
the path): logs show only its host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import httpx
import stamina
import structlog

from backpack_vault.config import Secret
from backpack_vault.core.clock import iso_utc
from backpack_vault.core.verdicts import CheckResult
from backpack_vault.events import Cause, Event, KeyRotated, KeyStatusChanged, PredecessorRetired

__all__ = [
    "ADVICE",
    "ALERT_FORMATS",
    "Webhook",
    "as_format",
    "check_alert_payload",
    "status_change_payload",
]

# How an alert is laid out for its receiver: our own JSON, a Slack incoming-webhook
# message, or an Alertmanager v2 POST /api/v2/alerts body.
ALERT_FORMATS: Final = ("json", "slack", "alertmanager")

log = structlog.get_logger()

_RETRY_STATUSES: Final = frozenset({408, 425, 429})
_HTTP_SERVER_ERROR: Final = 500

_RE_ADD: Final = (
    "The stored pair is unusable, so the key was not sent to Backpack and nothing was "
    "changed. Store it again with `backpack-vault keys add SUB/NAME` and the secret shown "
    "when the key was created (or create a new key in the Backpack web UI)."
)
# What an operator can do about a result that changed nothing, by its reason.
ADVICE: Final[dict[str, str]] = {
    "systemic": (
        "Backpack rejected this key and every other active key tried alongside it, so the "
        "change looks like Backpack's (an outage, or a change on its side), not the keys'. "
        "Nothing was revoked automatically: the keys stay active and are checked again with "
        "backoff until Backpack accepts them, and this is the only alert for this outage. "
        "Check Backpack's status page and announcements. If the keys really were revoked or "
        "deleted in the Backpack web UI, revoke each one here: "
        "`backpack-vault keys revoke SUB/NAME --reason '...'` (a wrong one is undone with "
        "`backpack-vault keys reinstate SUB/NAME`)."
    ),
    "secret_mismatch": _RE_ADD,
    "secret_invalid": _RE_ADD,
    "signature_invalid": _RE_ADD,
    "unexpected_response": (
        "Backpack answered the liveness probe in a way the verdict table does not know "
        "(see http_status, code and message); nothing was changed. Check that the exchange "
        "URL (BACKPACK_VAULT_BACKPACK_URL) is Backpack's REST API."
    ),
}


class _Retryable(Exception):
    """The receiver answered with a status worth retrying."""

    def __init__(self, status: int) -> None:
        super().__init__(f"webhook answered {status}")
        self.status = status


class Webhook:
    """POSTs alerts to one URL. ``send`` returns whether the receiver accepted the alert."""

    def __init__(
        self,
        http: httpx.Client,
        url: str | Secret,
        *,
        attempts: int = 4,
        timeout_s: float = 5.0,
        total_timeout_s: float = 30.0,
        wait_initial_s: float = 0.5,
        wait_max_s: float = 5.0,
        alert_format: str = "json",
    ) -> None:
        if alert_format not in ALERT_FORMATS:
            raise ValueError(f"alert format {alert_format!r} is not one of {ALERT_FORMATS}")
        self.format = alert_format
        self._http = http
        self._url = url if isinstance(url, Secret) else Secret(url)
        self._attempts = attempts
        self._timeout = httpx.Timeout(timeout_s)
        self._total_timeout_s = total_timeout_s
        self._wait_initial_s = wait_initial_s
        self._wait_max_s = wait_max_s
        try:
            self.host = httpx.URL(self._url.reveal()).host
        except httpx.InvalidURL:
            self.host = "(invalid url)"

    def __repr__(self) -> str:
        return f"Webhook(host={self.host!r})"

    def close(self) -> None:
        self._http.close()

    def send(self, payload: Mapping[str, Any]) -> bool:
        """Deliver one alert; log (never raise) when it cannot be delivered."""
        event = str(payload.get("event", "alert"))
        failure = self._deliver(payload)
        if failure:
            # The error's type or status only: an exception text may quote the URL.
            log.error("alert.failed", alert=event, host=self.host, error=failure)
            return False
        log.info("alert.sent", alert=event, host=self.host)
        return True

    def _deliver(self, payload: Mapping[str, Any]) -> str:
        """Empty when delivered, else what went wrong."""
        try:
            for attempt in stamina.retry_context(
                on=(httpx.TransportError, _Retryable),
                attempts=self._attempts,
                timeout=self._total_timeout_s,
                wait_initial=self._wait_initial_s,
                wait_max=self._wait_max_s,
            ):
                with attempt:
                    self._post(payload)
        except _Retryable as exc:
            return f"status {exc.status}"
        except httpx.HTTPStatusError as exc:
            return f"status {exc.response.status_code}"
        except Exception as exc:  # noqa: BLE001 - an alert must never break its caller
            return type(exc).__name__
        return ""

    def _post(self, payload: Mapping[str, Any]) -> None:
        body = as_format(payload, self.format)
        response = self._http.post(self._url.reveal(), json=body, timeout=self._timeout)
        if response.status_code in _RETRY_STATUSES or response.status_code >= _HTTP_SERVER_ERROR:
            raise _Retryable(response.status_code)
        response.raise_for_status()

    def on_event(self, event: Event) -> None:
        """Listener: alert on a status change a check caused, a switch the checks made,
        and a predecessor that may be deleted in the UI now."""
        if isinstance(event, KeyStatusChanged) and event.cause is Cause.CHECK:
            self.send(status_change_payload(event))
        elif isinstance(event, KeyRotated) and event.cause is Cause.CHECK:
            self.send(rotation_payload(event))
        elif isinstance(event, PredecessorRetired):
            self.send(predecessor_retired_payload(event))

    def check_alert(self, result: CheckResult) -> None:
        """Alert on a result that needs a human without changing a status (systemic, ...)."""
        self.send(check_alert_payload(result))


def check_alert_payload(result: CheckResult) -> dict[str, Any]:
    """The alert body for a result that changed nothing: public fields and what to do."""
    summary = f"{result.ref}: {result.label}; nothing was changed"
    if result.reason == "systemic":
        summary = (
            f"Backpack rejects every active key checked since {result.checked_at} "
            f"(first: {result.ref}); nothing was revoked"
        )
    return {
        "event": "check.alert",
        "key": str(result.ref),
        "verdict": result.label,
        "reason": result.reason,
        "http_status": result.http_status,
        "code": result.code,
        "message": result.message,
        "at": result.checked_at,
        "summary": summary,
        "advice": ADVICE.get(result.reason, ""),
    }


def status_change_payload(event: KeyStatusChanged) -> dict[str, Any]:
    """The alert body for a status change: public fields only."""
    record, result = event.record, event.result
    return {
        "event": "key.status_changed",
        "key": str(event.ref),
        "subaccount": event.ref.subaccount,
        "name": event.ref.name,
        # the public key, as shown in the Backpack web UI
        "api_key": record.api_key if record else "",
        "label": record.label if record else "",
        "old_status": event.old.value if event.old else None,
        "new_status": event.new.value,
        "verdict": result.label if result else "",
        "reason": result.reason if result else "",
        "http_status": result.http_status if result else None,
        "code": result.code if result else "",
        "message": result.message if result else "",
        "at": result.checked_at if result else "",
    }


def rotation_payload(event: KeyRotated) -> dict[str, Any]:
    """A switch: what the name hands out now, and what the operator does next."""
    record = event.record
    previous = record.previous if record else None
    safe_at = event.safe_at or (previous.safe_at if previous else "")
    if event.failover:
        summary = (
            f"{event.ref}: failover: {event.old_api_key} was revoked and the standby "
            f"{event.new_api_key} took over; store a new standby"
        )
        advice = (
            f"Create a key in the Backpack web UI and run `backpack-vault keys add {event.ref} "
            "--standby` (or `keys generate --standby`); until then a revocation is an outage."
        )
    else:
        summary = f"{event.ref}: rotated to {event.new_api_key} (was {event.old_api_key})"
        advice = (
            f"Delete {event.old_api_key} in the Backpack web UI after {safe_at}, when its "
            "last copy has expired; deleting it earlier fails workers still holding it."
        )
    return {
        "event": "key.failover" if event.failover else "key.rotated",
        "key": str(event.ref),
        "subaccount": event.ref.subaccount,
        "name": event.ref.name,
        "api_key": event.new_api_key,
        "previous_api_key": event.old_api_key,
        "new_status": "active",
        "safe_to_delete_at": "" if event.failover else safe_at,
        "at": record.status_since if record else iso_utc(),
        "summary": summary,
        "advice": advice,
    }


def predecessor_retired_payload(event: PredecessorRetired) -> dict[str, Any]:
    return {
        "event": "key.predecessor_retired",
        "key": str(event.ref),
        "subaccount": event.ref.subaccount,
        "name": event.ref.name,
        "api_key": event.api_key,
        "at": event.record.previous.since if event.record and event.record.previous else "",
        "summary": f"{event.ref}: the old key {event.api_key} is retired: no copy of it is left",
        "advice": f"Delete {event.api_key} in the Backpack web UI now; no worker uses it.",
    }


_CRITICAL: Final = frozenset({"revoked", "systemic", "secret_mismatch", "secret_invalid"})


def _severity(payload: Mapping[str, Any]) -> str:
    critical = payload.get("new_status") == "revoked" or payload.get("reason") in _CRITICAL
    if payload.get("event") in ("key.rotated", "key.predecessor_retired"):
        return "info"
    return "critical" if critical or payload.get("event") == "key.failover" else "warning"


_ALERT_NAMES: Final = {
    "key.status_changed": "BackpackVaultKeyStatusChanged",
    "key.rotated": "BackpackVaultKeyRotated",
    "key.failover": "BackpackVaultKeyFailover",
    "key.predecessor_retired": "BackpackVaultOldKeyRetired",
}


def _summary(payload: Mapping[str, Any]) -> str:
    if payload.get("summary"):
        return str(payload["summary"])
    return (
        f"{payload.get('key')}: {payload.get('old_status')} -> {payload.get('new_status')} "
        f"({payload.get('verdict') or 'no verdict'})"
    )


def as_format(payload: Mapping[str, Any], alert_format: str) -> Any:
    """The body to POST for one alert in ``alert_format`` (our JSON, Slack, Alertmanager)."""
    if alert_format == "slack":
        lines = [f"*backpack-vault*: {_summary(payload)}"]
        if payload.get("advice"):
            lines.append(str(payload["advice"]))
        fields = ("key", "verdict", "http_status", "code", "at")
        detail = ", ".join(f"{f}={payload[f]}" for f in fields if payload.get(f) not in (None, ""))
        lines.append(f"`{detail}`")
        return {"text": "\n".join(lines)}
    if alert_format == "alertmanager":
        labels = {
            "alertname": _ALERT_NAMES.get(str(payload.get("event")), "BackpackVaultCheckAlert"),
            "severity": _severity(payload),
            "service": "backpack-vault",
            "key": str(payload.get("key", "")),
        }
        for name in ("new_status", "reason"):
            if payload.get(name):
                labels[name] = str(payload[name])
        annotations = {"summary": _summary(payload)}
        if payload.get("advice"):
            annotations["description"] = str(payload["advice"])
        alert: dict[str, Any] = {"labels": labels, "annotations": annotations}
        if payload.get("at"):
            alert["startsAt"] = str(payload["at"])
        return [alert]
    return dict(payload)
