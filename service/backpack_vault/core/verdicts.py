"""Backpack's answers -> verdicts: one data table, shared by the checks and the worker client.

``classify(response)`` returns the first row of :data:`VERDICT_TABLE` that
matches a :class:`ProbeResponse` (status, Backpack's ``code``, a bounded
message). A REJECTED row is only a candidate: the checks confirm it with a
second probe before any status changes (docs/verdicts.md). Pure data, no I/O.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Final

from backpack_vault.core.keys import KeyRef, Status

__all__ = [
    "SANDBOX_HEADER",
    "VERDICT_TABLE",
    "CheckResult",
    "ProbeResponse",
    "Rule",
    "Verdict",
    "classify",
    "is_key_rejection",
    "parse_answer",
]

MESSAGE_CHARS: Final = 200
# The header every answer of the sandbox exchange carries; Backpack's own never do.
SANDBOX_HEADER: Final = "X-Backpack-Sandbox"


@dataclass(frozen=True, slots=True)
class ProbeResponse:
    """What one request to Backpack came back with; fit for logs and audit."""

    status: int | None  # None when no HTTP answer arrived
    code: str = ""
    message: str = ""
    is_object: bool = False  # the body parsed as a JSON object
    network_error: str = ""  # exception class name, e.g. "ConnectTimeout"
    retry_after_s: float | None = None
    elapsed_ms: float = 0.0
    sandbox: bool = False  # the answer carried the sandbox's label (X-Backpack-Sandbox)

    @property
    def network_failure(self) -> bool:
        return self.status is None

    def describe(self) -> str:
        if self.network_failure:
            return f"no answer ({self.network_error})"
        parts = [str(self.status), self.code, self.message]
        return " ".join(p for p in parts if p)


def parse_answer(
    status: int,
    text: str,
    *,
    retry_after: str | None = None,
    elapsed_ms: float = 0.0,
    sandbox: bool = False,
) -> ProbeResponse:
    """A Backpack answer (status and body text) as a :class:`ProbeResponse`; the one parser.

    Backpack's JSON error shape is ``{"code", "message"}``; plain-text error bodies
    (Backpack before 2024-10-15) are the message itself. Code and message are cut
    to 200 characters.
    """
    try:
        body: object = json.loads(text)
    except ValueError:
        body = None
    code = message = ""
    if isinstance(body, dict):
        code = body["code"] if isinstance(body.get("code"), str) else ""
        message = body["message"] if isinstance(body.get("message"), str) else ""
    elif not 200 <= status < 300:  # noqa: PLR2004 - the success range
        message = text.strip()
    try:
        retry_after_s = None if retry_after is None else float(retry_after)
    except ValueError:
        retry_after_s = None
    return ProbeResponse(
        status=status,
        code=code[:MESSAGE_CHARS],
        message=message[:MESSAGE_CHARS],
        is_object=isinstance(body, dict),
        retry_after_s=retry_after_s,
        elapsed_ms=elapsed_ms,
        sandbox=sandbox,
    )


class Verdict(enum.StrEnum):
    VALID = "VALID"
    REJECTED = "REJECTED"
    UNKNOWN = "UNKNOWN"
    MISCONFIGURED = "MISCONFIGURED"


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of docs/backpack-api.md section 8's table. Empty sets match anything."""

    row: int
    verdict: Verdict  # REJECTED here means "a candidate": a second probe must agree
    reason: str
    statuses: frozenset[int] = frozenset()
    codes: frozenset[str] = frozenset()
    either: bool = False  # status OR code (rows 2-4); otherwise status AND code
    message: str = ""  # case-insensitive substring
    json_object: bool | None = None
    network: bool = False  # matches only "no HTTP answer"; every other row needs one
    resync: bool = False  # resync the clock and retry once (row 5)
    alert: bool = False
    # Outside the liveness probe (no parameters, a verified signature) the same answer
    # may be about the order, not the key (docs/backpack-api.md section 8): there the row also needs
    # this substring in the message.
    off_probe_message: str = ""

    def matches(self, r: ProbeResponse, *, probe: bool = True) -> bool:
        if not probe and self.off_probe_message not in r.message.lower():
            return False
        if r.network_failure or self.network:
            return r.network_failure and self.network
        status_hit = r.status in self.statuses
        code_hit = r.code in self.codes
        if self.either:
            if not (status_hit or code_hit):
                return False
        elif (self.statuses and not status_hit) or (self.codes and not code_hit):
            return False
        if self.message and self.message not in r.message.lower():
            return False
        return self.json_object is None or r.is_object == self.json_object


def _span(low: int, high: int) -> frozenset[int]:
    return frozenset(range(low, high + 1))


_AUTH_STATUSES: Final = frozenset({400, 401, 403})

# First match wins. Correct a row here once Backpack's live answers are known.
VERDICT_TABLE: Final[tuple[Rule, ...]] = (
    Rule(1, Verdict.VALID, "accepted", statuses=frozenset({200}), json_object=True),
    Rule(2, Verdict.UNKNOWN, "rate_limited", statuses=frozenset({429}),
         codes=frozenset({"TOO_MANY_REQUESTS"}), either=True),
    Rule(3, Verdict.UNKNOWN, "maintenance", statuses=frozenset({503}),
         codes=frozenset({"MAINTENANCE"}), either=True),
    Rule(4, Verdict.UNKNOWN, "server_error", statuses=_span(500, 599),
         codes=frozenset({"SERVER_ERROR", "TIMEOUT"}), either=True),
    Rule(5, Verdict.UNKNOWN, "clock", statuses=_span(400, 499), message="expired", resync=True),
    Rule(6, Verdict.REJECTED, "signature_rejected", statuses=_AUTH_STATUSES,
         codes=frozenset({"INVALID_CLIENT_REQUEST"}), off_probe_message="signature"),
    Rule(7, Verdict.REJECTED, "key_rejected", statuses=_AUTH_STATUSES,
         codes=frozenset({"UNAUTHORIZED", "INVALID_SIGNATURE", "FORBIDDEN"})),
    Rule(8, Verdict.REJECTED, "account_deactivated", statuses=_AUTH_STATUSES,
         codes=frozenset({"ACCOUNT_DEACTIVATED"})),
    Rule(9, Verdict.REJECTED, "key_rejected", statuses=frozenset({401, 403})),
    Rule(10, Verdict.UNKNOWN, "unexpected_response", alert=True),
    Rule(11, Verdict.UNKNOWN, "network", network=True),
)  # fmt: skip


def classify(response: ProbeResponse, *, probe: bool = True) -> Rule:
    """The first row of :data:`VERDICT_TABLE` that matches (row 10 or 11 always does).

    ``probe=False`` classifies the answer to any other request (a bot's order, say):
    row 6 then also needs ``signature`` in the message (see ``Rule.off_probe_message``).
    """
    return next(rule for rule in VERDICT_TABLE if rule.matches(response, probe=probe))


def is_key_rejection(response: ProbeResponse) -> bool:
    """Whether an answer to any signed request means Backpack refused the key itself
    (not a clock, order or server problem): a REJECTED row of the same table."""
    return classify(response, probe=False).verdict is Verdict.REJECTED


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check: verdict, why, and the answer it rests on (never headers)."""

    ref: KeyRef
    verdict: Verdict
    reason: str
    checked_at: str
    row: int | None = None
    http_status: int | None = None
    code: str = ""
    message: str = ""
    probes: int = 0  # signed requests sent
    alert: bool = False
    old_status: Status | None = None
    new_status: Status | None = None  # set only when this check changed the status

    @property
    def label(self) -> str:
        """``VALID``, ``REJECTED(key_rejected)``, ``UNKNOWN(network)``: for ``last_verdict``."""
        return (
            self.verdict.value
            if self.verdict is Verdict.VALID
            else f"{self.verdict}({self.reason})"
        )

    @property
    def changed(self) -> bool:
        return self.new_status is not None

    def as_dict(self) -> dict[str, object]:
        return {
            "key": str(self.ref),
            "verdict": self.verdict.value,
            "reason": self.reason,
            "label": self.label,
            "checked_at": self.checked_at,
            "row": self.row,
            "http_status": self.http_status,
            "code": self.code,
            "message": self.message,
            "probes": self.probes,
            "alert": self.alert,
            "old_status": self.old_status.value if self.old_status else None,
            "new_status": self.new_status.value if self.new_status else None,
        }
