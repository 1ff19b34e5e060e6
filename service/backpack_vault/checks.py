"""Liveness checks: probe -> verdict, and the status change it implies. Never schedules.

Steps for one key (``backpack/SPEC.md`` section 8)::

    read key from Vault --status revoked/retired/incomplete--> not probed
    local check (secret derives key, signature verifies) --fails--> MISCONFIGURED
    sub-account request budget --spent--> UNKNOWN(rate_limited), nothing sent
    GET /api/v1/status --not Ok--> UNKNOWN(maintenance), nothing signed
    GET /api/v1/time (offset) -> signed GET /api/v1/account -> VERDICT_TABLE
        "expired" --> resync the clock, retry once --still expired--> UNKNOWN(clock)
        REJECTED candidate --> resync, second probe --rejected again--> REJECTED
                                                   --anything else-----> UNKNOWN
    status change only: pending->active on VALID, active->revoked on REJECTED

The status and the clock offset belong to the exchange, not to a key: an Ok
status and a successful offset measurement are reused by every check for
``remeasure_s`` (5 s), so a sweep of many keys sends about one signed probe
per key instead of three requests. Failures are never reused (the next check
asks again), and the resync after "expired" and before a confirming probe is
always fresh.

A sweep (:meth:`Checker.check_many`) adds the systemic guard: when several keys
are probed and every one is rejected, Backpack probably changed, not the keys,
so all of them are reported UNKNOWN(systemic) and none is revoked.

A status the checker writes to Vault is announced once, as
``KeyStatusChanged(cause=CHECK)`` through ``emit``; what happens next (caches,
copies, metrics, alerts) is the listeners' business. ``daemon/`` decides when
checks run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Final

import structlog

from backpack_vault.backpack.rest import ClockSync, Exchange, ExchangeStatus
from backpack_vault.backpack.signing import Signer, verify
from backpack_vault.config import Secret
from backpack_vault.core.caches import RateLimiter
from backpack_vault.core.clock import iso_utc
from backpack_vault.core.keys import KeyRecord, KeyRef, Status
from backpack_vault.core.verdicts import CheckResult, ProbeResponse, Rule, Verdict, classify
from backpack_vault.errors import InvalidInput, KeyMismatch, ServiceError, UnknownKey, WriteConflict
from backpack_vault.events import Cause, KeyStatusChanged, Listener
from backpack_vault.vault.port import VaultPort

__all__ = [
    "DEFAULT_BUDGET_PER_MINUTE",
    "PROBE_WINDOW_MS",
    "REMEASURE_S",
    "Checker",
    "RequestBudget",
]

log = structlog.get_logger()

PROBE_WINDOW_MS: Final = 5000
DEFAULT_BUDGET_PER_MINUTE: Final = 120  # Backpack allows 2000/min per sub-account
SYSTEMIC_MIN_KEYS: Final = 3
REMEASURE_S: Final = 5.0  # reuse an Ok status and a measured clock offset this long
_PROBED: Final = frozenset({Status.PENDING, Status.ACTIVE})


# -- the per-sub-account request budget ----------------------------------------------------------


class RequestBudget:
    """``per_minute`` requests per sub-account, refilled continuously; thread-safe.

    The bucket arithmetic is ``core.caches.RateLimiter``'s; this adds the lock and the clock.
    """

    def __init__(
        self,
        per_minute: int = DEFAULT_BUDGET_PER_MINUTE,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._limiter: RateLimiter[str] = RateLimiter(per_minute, per=60.0)

    def try_acquire(self, subaccount: str, cost: float = 1.0) -> bool:
        """Take ``cost`` requests from the sub-account's bucket; False (and take none) if short."""
        with self._lock:
            return self._limiter.try_acquire(subaccount, now=self._clock(), cost=cost)

    def remaining(self, subaccount: str) -> float:
        with self._lock:
            return self._limiter.remaining(subaccount, now=self._clock())


# -- the checker ----------------------------------------------------------------------------------


class _Outcome:
    """One check in progress: counts the signed requests it sent."""

    __slots__ = ("probes", "ref", "sub")

    def __init__(self, ref: KeyRef) -> None:
        self.ref = ref
        self.sub = ref.subaccount
        self.probes = 0


class _Evaluator:
    """Reads a key and asks Backpack about it: a verdict, never a Vault write.

    The exchange's own status and clock offset are shared by every check for
    ``remeasure_s`` once measured successfully.
    """

    def __init__(
        self,
        vault: VaultPort,
        exchange: Exchange,
        *,
        clock: Callable[[], float],
        budget: RequestBudget,
        window_ms: int,
        confirm_delay_s: float,
        sleep: Callable[[float], None],
        remeasure_s: float,
    ) -> None:
        self._vault = vault
        self._exchange = exchange
        self._clock = clock
        self._budget = budget
        self._window_ms = window_ms
        self._confirm_delay_s = confirm_delay_s
        self._sleep = sleep
        self._running: set[KeyRef] = set()
        self._running_lock = threading.Lock()
        self._remeasure_s = remeasure_s
        self._measured_lock = threading.Lock()
        self._status_ok: tuple[float, ExchangeStatus] | None = None  # (when, the Ok answer)
        self._synced_at: float | None = None  # when the offset was last measured successfully

    def _now_iso(self) -> str:
        return iso_utc(self._clock())

    def result(
        self,
        ref: KeyRef,
        verdict: Verdict,
        reason: str,
        *,
        outcome: _Outcome | None = None,
        response: ProbeResponse | None = None,
        rule: Rule | None = None,
        old: Status | None = None,
        alert: bool = False,
    ) -> CheckResult:
        return CheckResult(
            ref=ref,
            verdict=verdict,
            reason=reason,
            checked_at=self._now_iso(),
            row=rule.row if rule else None,
            http_status=response.status if response else None,
            code=response.code if response else "",
            message=(response.message or response.network_error) if response else "",
            probes=outcome.probes if outcome else 0,
            alert=alert or (rule.alert if rule else False),
            old_status=old,
        )

    def evaluate(self, ref: KeyRef) -> tuple[CheckResult, KeyRecord | None]:
        with self._running_lock:
            if ref in self._running:
                return self.result(ref, Verdict.UNKNOWN, "already_running"), None
            self._running.add(ref)
        try:
            record, secret = self._vault.read_key(ref)
            result = self._evaluate_record(record, secret)
        finally:
            with self._running_lock:
                self._running.discard(ref)
        log.info(
            "check.verdict",
            key=str(ref),
            verdict=result.verdict.value,
            reason=result.reason,
            row=result.row,
            http_status=result.http_status,
            code=result.code,
            probes=result.probes,
        )
        return result, record

    def _evaluate_record(self, record: KeyRecord, secret: Secret) -> CheckResult:
        ref, old = record.ref, record.status
        if old not in _PROBED:
            return self.result(ref, Verdict.UNKNOWN, "not_probed", old=old)
        signer = _local_check(record, secret)
        if isinstance(signer, str):
            return self.result(ref, Verdict.MISCONFIGURED, signer, old=old, alert=True)
        return self._remote(record, signer)

    def _remote(self, record: KeyRecord, signer: Signer) -> CheckResult:
        ref, old = record.ref, record.status
        outcome = _Outcome(ref)
        if not self._budget.try_acquire(outcome.sub):
            return self.result(ref, Verdict.UNKNOWN, "rate_limited", old=old)
        status = self._status()
        if not status.ok:
            if status.maintenance:
                return self.result(
                    ref, Verdict.UNKNOWN, "maintenance", response=status.response, old=old
                )
            return self._unsigned_failure(ref, status.response, old)
        first = self._probe(outcome, signer, old, budgeted=True)
        if first.verdict is not Verdict.REJECTED:
            return first
        if self._confirm_delay_s > 0:
            self._sleep(self._confirm_delay_s)
        second = self._probe(outcome, signer, old, budgeted=False)
        if second.verdict is Verdict.REJECTED:
            return second
        log.warning(
            "check.rejection_unconfirmed", key=str(ref), first=first.label, second=second.label
        )
        return replace(
            second, verdict=Verdict.UNKNOWN, reason="unconfirmed_rejection", row=second.row
        )

    # -- what the exchange says of itself, shared by every check for remeasure_s ---------------

    def _recent(self, at: float | None) -> bool:
        age = None if at is None else self._clock() - at
        return age is not None and 0 <= age < self._remeasure_s

    def _status(self) -> ExchangeStatus:
        """``GET /api/v1/status``, or the last Ok answer while it is recent."""
        with self._measured_lock:
            cached = self._status_ok
        if cached is not None and self._recent(cached[0]):
            return cached[1]
        at = self._clock()
        status = self._exchange.status()
        if status.ok:
            with self._measured_lock:
                self._status_ok = (at, status)
        return status

    def _sync_clock(self, *, fresh: bool) -> ClockSync | None:
        """Measure the clock offset; None when ``fresh`` is not needed and the last is recent."""
        with self._measured_lock:
            synced_at = self._synced_at
        if not fresh and self._recent(synced_at):
            return None
        at = self._clock()
        sync = self._exchange.sync_clock()
        if sync.ok:
            with self._measured_lock:
                self._synced_at = at
        return sync

    def _unsigned_failure(self, ref: KeyRef, response: ProbeResponse, old: Status) -> CheckResult:
        """A public route failed: only the table's UNKNOWN reasons apply (nothing was signed)."""
        rule = classify(response)
        if rule.verdict is Verdict.UNKNOWN and not rule.resync:
            return self.result(
                ref, Verdict.UNKNOWN, rule.reason, response=response, rule=rule, old=old
            )
        return self.result(
            ref, Verdict.UNKNOWN, "unexpected_response", response=response, old=old, alert=True
        )

    def _probe(
        self, outcome: _Outcome, signer: Signer, old: Status, *, budgeted: bool
    ) -> CheckResult:
        """Measure the offset and probe; on "expired", resync and probe once more.

        Only the first probe of a check may use a recent offset; a confirming probe
        (``budgeted=False``) and the retry after "expired" always measure it again.
        """
        for attempt in range(2):
            sync = self._sync_clock(fresh=not budgeted or attempt > 0)
            if sync is not None and not sync.ok:
                return self._unsigned_failure(outcome.ref, sync.response, old)
            if not (budgeted and attempt == 0) and not self._budget.try_acquire(outcome.sub):
                return self.result(
                    outcome.ref, Verdict.UNKNOWN, "rate_limited", outcome=outcome, old=old
                )
            outcome.probes += 1
            response = self._exchange.probe(signer, self._window_ms)
            rule = classify(response)
            if not rule.resync:
                break
            if attempt == 0:
                log.info(
                    "check.clock_resync", key=str(outcome.ref), offset_ms=self._exchange.offset_ms
                )
        return self.result(
            outcome.ref,
            rule.verdict,
            rule.reason,
            outcome=outcome,
            response=response,
            rule=rule,
            old=old,
        )


class Checker:
    """Checks keys against Backpack; writes a key's status to Vault only when it changes.

    ``emit`` receives one ``KeyStatusChanged(cause=CHECK)`` per status written.
    """

    def __init__(
        self,
        vault: VaultPort,
        exchange: Exchange,
        *,
        clock: Callable[[], float] = time.time,
        budget: RequestBudget | None = None,
        emit: Listener | None = None,
        on_change: Listener | None = None,
        window_ms: int = PROBE_WINDOW_MS,
        confirm_delay_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        systemic_min_keys: int = SYSTEMIC_MIN_KEYS,
        remeasure_s: float = REMEASURE_S,
        systemic_window_s: float = 3600.0,
    ) -> None:
        self._vault = vault
        self._clock = clock
        # on_change: the old name of emit, still passed by cli.py's `keys check`.
        self._emit = emit or on_change
        self._evaluator = _Evaluator(
            vault,
            exchange,
            clock=clock,
            budget=budget or RequestBudget(),
            window_ms=window_ms,
            confirm_delay_s=confirm_delay_s,
            sleep=sleep,
            remeasure_s=remeasure_s,
        )
        self._systemic_min_keys = systemic_min_keys
        self._systemic_window_s = systemic_window_s
        # What single checks saw lately, for the systemic guard (see check()).
        self._memory_lock = threading.Lock()
        self._accepted: dict[KeyRef, float] = {}
        self._rejected: dict[KeyRef, float] = {}

    # -- public ---------------------------------------------------------------------------

    def check(self, ref: KeyRef) -> CheckResult:
        """Check one key; raises UnknownKey, VaultUnavailable, ... from reading it.

        A confirmed rejection of an active key is cross-checked before it revokes:
        the most recently accepted other key is probed once. If Backpack accepts
        it, the rejection is this key's own and it is revoked; if Backpack rejects
        that key too, the change is on Backpack's side: UNKNOWN(systemic), an
        alert, and nothing revoked. With no other key accepted lately, rejections
        of ``systemic_min_keys`` keys within one window count as systemic.
        """
        result, record = self._evaluator.evaluate(ref)
        if record is not None and record.status is Status.ACTIVE:
            result = self._cross_check(ref, result)
        return self._settle(record, result)

    def check_many(self, refs: Iterable[KeyRef], *, concurrency: int = 1) -> list[CheckResult]:
        """Check several keys (a sweep) with the systemic guard; Vault errors become UNKNOWN."""
        refs = list(refs)
        if concurrency > 1 and len(refs) > 1:
            with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="check") as pool:
                evaluated = list(pool.map(self._evaluate_in_sweep, refs))
        else:
            evaluated = [self._evaluate_in_sweep(ref) for ref in refs]
        found = [item for item in evaluated if item is not None]
        found = _sweep_guard(found, self._systemic_min_keys)
        results = []
        for result, record in found:
            try:
                results.append(self._settle(record, result))
            except ServiceError as exc:
                log.warning("check.status_write_failed", key=str(result.ref), error=exc.message)
                results.append(result)
        return results

    # -- the systemic guard for single checks ------------------------------------------------

    def _cross_check(self, ref: KeyRef, result: CheckResult) -> CheckResult:
        if result.verdict is Verdict.VALID:
            with self._memory_lock:
                self._accepted[ref] = self._clock()
                self._rejected.pop(ref, None)
            return result
        if result.verdict is not Verdict.REJECTED:
            return result
        return self._confirm_rejection_is_specific(ref, result)

    def _confirm_rejection_is_specific(self, ref: KeyRef, result: CheckResult) -> CheckResult:
        now = self._clock()
        with self._memory_lock:
            self._accepted.pop(ref, None)
            self._rejected[ref] = now
            horizon = now - self._systemic_window_s
            for stale in [k for k, t in self._rejected.items() if t < horizon]:
                del self._rejected[stale]
            others = sorted(
                ((t, k) for k, t in self._accepted.items() if k != ref and t >= horizon),
                reverse=True,
            )
            rejected_lately = len(self._rejected)
        if not others:
            if rejected_lately >= self._systemic_min_keys:
                return self._systemic(result, rejected_lately)
            return result
        control = others[0][1]
        control_result, _ = self._evaluator.evaluate(control)
        with self._memory_lock:
            if control_result.verdict is Verdict.VALID:
                self._accepted[control] = self._clock()
            elif control_result.verdict is Verdict.REJECTED:
                self._accepted.pop(control, None)
                self._rejected[control] = self._clock()
        if control_result.verdict is Verdict.VALID:
            return result
        if control_result.verdict is Verdict.REJECTED:
            return self._systemic(result, rejected_lately + 1)
        log.warning("check.control_inconclusive", key=str(ref), control=str(control))
        return replace(result, verdict=Verdict.UNKNOWN, reason="unconfirmed_rejection")

    @staticmethod
    def _systemic(result: CheckResult, keys: int) -> CheckResult:
        log.error("check.systemic", key=str(result.ref), keys_rejected=keys)
        return replace(result, verdict=Verdict.UNKNOWN, reason="systemic", alert=True)

    def _evaluate_in_sweep(self, ref: KeyRef) -> tuple[CheckResult, KeyRecord | None] | None:
        try:
            return self._evaluator.evaluate(ref)
        except UnknownKey:
            log.info("check.key_gone", key=str(ref))
            return None
        except ServiceError as exc:
            log.warning("check.vault_error", key=str(ref), error=exc.message)
            return self._evaluator.result(ref, Verdict.UNKNOWN, "vault_unavailable"), None

    # -- the only Vault write ---------------------------------------------------------------

    def _settle(self, record: KeyRecord | None, result: CheckResult) -> CheckResult:
        """Write the status when the verdict changes it; emit the change once."""
        if record is None:
            return result
        old = record.status
        new: Status | None = None
        if result.verdict is Verdict.VALID and old is Status.PENDING:
            new = Status.ACTIVE
        elif result.verdict is Verdict.REJECTED and old is Status.ACTIVE:
            new = Status.REVOKED
        if new is None:
            return result
        try:
            updated = self._vault.set_status(
                record.ref, new, now=result.checked_at, verdict=result.label, expect=old
            )
        except WriteConflict as exc:
            log.warning("check.status_conflict", key=str(record.ref), error=exc.message)
            return result
        result = replace(result, new_status=new)
        log.warning(
            "key.status_changed",
            key=str(record.ref),
            old=old.value,
            new=new.value,
            verdict=result.label,
        )
        if self._emit is not None:
            event = KeyStatusChanged(
                record.ref, old, new, Cause.CHECK, record=updated, result=result
            )
            try:
                self._emit(event)
            except Exception as exc:  # noqa: BLE001 - the cascade must not undo a recorded change
                # Not log.exception: a rendered traceback may show locals (the records).
                # The event name predates emit; log queries rely on it.
                log.error(  # noqa: TRY400
                    "check.on_change_failed", key=str(record.ref), error=type(exc).__name__
                )
        return result


def _sweep_guard(
    found: list[tuple[CheckResult, KeyRecord | None]], min_keys: int
) -> list[tuple[CheckResult, KeyRecord | None]]:
    """Every probed key of a sweep rejected, one of them active: Backpack changed, not they."""
    probed = [(r, rec) for r, rec in found if r.probes > 0]
    would_revoke = any(rec is not None and rec.status is Status.ACTIVE for _, rec in probed)
    if (
        len(probed) < min_keys
        or not would_revoke
        or any(r.verdict is not Verdict.REJECTED for r, _ in probed)
    ):
        return found
    log.error("check.systemic", keys=len(probed), reasons=sorted({r.reason for r, _ in probed}))
    return [
        (replace(r, verdict=Verdict.UNKNOWN, reason="systemic", alert=True), rec)
        if r.probes > 0
        else (r, rec)
        for r, rec in found
    ]


def _local_check(record: KeyRecord, secret: Secret) -> Signer | str:
    """Step 1, no network: a Signer, or the reason the stored pair is unusable."""
    try:
        signer = Signer(record.api_key, secret)
    except KeyMismatch:
        return "secret_mismatch"
    except InvalidInput:
        return "secret_invalid"
    message = "instruction=accountQuery&timestamp=1&window=1"
    if not verify(record.api_key, message, signer.sign(message)):
        return "signature_invalid"
    return signer
