"""The daemon's own calls to Backpack: status, server time and the signed liveness probe.

Every call returns a record and never raises an httpx error: a network failure
(refused, reset, DNS, TLS, timeout) becomes a :class:`ProbeResponse` marked
``network_error``, so ``checks.py`` classifies every outcome with one table.
Only :meth:`Exchange.measure_offset` raises, ``ExchangeUnavailable``, for
callers that just want the offset.

What is kept of an answer is its status, Backpack's ``code`` and a bounded
``message``: never the request headers (the window is the only replay
protection, docs/backpack-api.md section 5) and never a response body beyond that.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import httpx
import structlog

from backpack_vault.backpack.signing import DEFAULT_WINDOW_MS, Signer
from backpack_vault.core.verdicts import SANDBOX_HEADER, ProbeResponse, parse_answer
from backpack_vault.errors import ExchangeUnavailable

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PROBE_PATH",
    "ClockSync",
    "Exchange",
    "ExchangeStatus",
    "ProbeResponse",
]

log = structlog.get_logger()

DEFAULT_TIMEOUT_S: Final = 10.0
PROBE_PATH: Final = "/api/v1/account"
PROBE_INSTRUCTION: Final = "accountQuery"
_MESSAGE_CHARS: Final = 200
_HTTP_OK: Final = 200


@dataclass(frozen=True, slots=True)
class ExchangeStatus:
    """``GET /api/v1/status``: ``ok`` only for a 200 saying ``"Ok"``."""

    ok: bool
    maintenance: bool
    message: str
    response: ProbeResponse


@dataclass(frozen=True, slots=True)
class ClockSync:
    """``GET /api/v1/time``: ``ok`` when the server time was read and the offset updated."""

    ok: bool
    offset_ms: int
    round_trip_ms: float
    response: ProbeResponse


class Exchange:
    """Backpack's REST API as the daemon uses it. Thread-safe: the offset is one int."""

    def __init__(
        self,
        http: httpx.Client,
        base_url: str,
        *,
        clock: Callable[[], float] = time.time,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")
        self._clock = clock
        self._timeout = httpx.Timeout(timeout_s)
        self._offset_ms = 0

    @property
    def offset_ms(self) -> int:
        """Server time minus local time, as last measured (0 before any measurement)."""
        return self._offset_ms

    def now_ms(self) -> int:
        """Local time corrected by the measured offset: what to sign with."""
        return int(self._clock() * 1000) + self._offset_ms

    def _get(self, path: str, headers: dict[str, str] | None = None) -> tuple[ProbeResponse, str]:
        """One GET; returns the record and the body text (the caller decides what to keep)."""
        started = self._clock()
        try:
            response = self._http.get(
                f"{self.base_url}{path}", headers=headers, timeout=self._timeout
            )
        except httpx.RequestError as exc:
            elapsed = (self._clock() - started) * 1000
            log.info("exchange.unreachable", path=path, error=type(exc).__name__)
            return ProbeResponse(None, network_error=type(exc).__name__, elapsed_ms=elapsed), ""
        elapsed = (self._clock() - started) * 1000
        return _record(response, elapsed), response.text

    def status(self) -> ExchangeStatus:
        """``GET /api/v1/status``."""
        answer, text = self._get("/api/v1/status")
        state, message = "", ""
        if answer.status == _HTTP_OK and answer.is_object:
            body = _json_object(text)
            state = str(body.get("status") or "")
            message = str(body.get("message") or "")[:_MESSAGE_CHARS]
        return ExchangeStatus(
            ok=state == "Ok",
            maintenance=state == "Maintenance",
            message=message,
            response=answer,
        )

    def sync_clock(self) -> ClockSync:
        """``GET /api/v1/time``; on success the offset is updated (minus half the round trip)."""
        before = self._clock()
        answer, text = self._get("/api/v1/time")
        after = self._clock()
        round_trip = (after - before) * 1000
        if answer.status != _HTTP_OK or not text.strip().isdigit():
            return ClockSync(
                ok=False, offset_ms=self._offset_ms, round_trip_ms=round_trip, response=answer
            )
        midpoint_ms = (before + after) / 2 * 1000
        self._offset_ms = round(int(text.strip()) - midpoint_ms)
        return ClockSync(
            ok=True, offset_ms=self._offset_ms, round_trip_ms=round_trip, response=answer
        )

    def measure_offset(self) -> int:
        """Measure and store the clock offset; ExchangeUnavailable when it cannot be read."""
        sync = self.sync_clock()
        if not sync.ok:
            raise ExchangeUnavailable(
                f"Backpack's server time could not be read: {sync.response.describe()}"
            )
        return sync.offset_ms

    def probe(self, signer: Signer, window_ms: int = DEFAULT_WINDOW_MS) -> ProbeResponse:
        """The liveness probe: signed ``GET /api/v1/account`` (``accountQuery``, no parameters)."""
        headers = signer.headers(PROBE_INSTRUCTION, {}, self.now_ms(), window_ms)
        answer, _ = self._get(PROBE_PATH, headers)
        del headers  # signed headers are used once and never kept or logged
        return answer


def _json_object(text: str) -> dict[str, object]:
    try:
        body = json.loads(text)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _record(response: httpx.Response, elapsed_ms: float) -> ProbeResponse:
    return parse_answer(
        response.status_code,
        response.text,
        retry_after=response.headers.get("retry-after"),
        elapsed_ms=elapsed_ms,
        sandbox=response.headers.get(SANDBOX_HEADER, "").strip().lower() == "true",
    )
