"""Liveness checks: probe -> verdict -> the status change it implies. Never schedules.

Steps for one key (``docs/backpack-api.md`` section 8; the rules, each with its test,
are the table in ``docs/verdicts.md``)::

    read key from Vault --status revoked/retired/incomplete--> not probed
    local check (secret derives key, signature verifies) --fails--> MISCONFIGURED
    sub-account request budget --spent--> UNKNOWN(rate_limited), nothing sent
    GET /api/v1/status --not Ok--> UNKNOWN(maintenance), nothing signed
    GET /api/v1/time (offset) -> signed GET /api/v1/account -> VERDICT_TABLE
        "expired" --> resync the clock, retry once --still expired--> UNKNOWN(clock)
        REJECTED candidate --> resync, second probe --rejected again--> confirmed
                                           --anything else--> UNKNOWN(unconfirmed_rejection)
    the key belongs to another exchange, or a sandbox answered for a production key
        --> the verdict is returned and logged, never written, never emitted, never remembered
    a confirmed REJECTED of an active key --> the cross-check below
    status change only: pending->active on VALID, active->revoked on REJECTED

The cross-check (a confirmed rejection of an active key)::

    controls, in order: keys VALID lately (most recent first), then the other keys in
    Vault, then keys rejected lately (longest ago first); each re-read and used only when
    it is active now and belongs to this exchange; one probe each, at most max_controls
        a control VALID --> probe the key once more --rejected--> REJECTED: revoked
                                                    --VALID----> VALID (nothing happens)
        every other active key rejected, one of them by a probe now
            --> UNKNOWN(systemic); the first one of an outage alerts, later ones do not
        a control inconclusive, or controls left untried --> UNKNOWN(unconfirmed_rejection)
        no other active key at all --> the second probe's confirmation stands: revoked

Keys revoked, retired or deleted never count: a control is read again before it is
probed. The outage (systemic state) starts with the first systemic verdict and ends
with the next VALID of any key. The daemon re-checks a key whose verdict is
systemic or unconfirmed sooner than its interval (``daemon/leader.py``).

The status and the clock offset belong to the exchange, not to a key: an Ok
status and a successful offset measurement are reused by every check for
``remeasure_s`` (5 s). Failures are never reused, and the resync after
"expired" and before a confirming probe is always fresh.

A status the checker writes to Vault is announced once, as
``KeyStatusChanged(cause=CHECK)`` through ``emit``; what happens next (caches,
copies, metrics, alerts) is the listeners' business. ``daemon/`` decides when
checks run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Final

import structlog

from backpack_vault.backpack.rest import ClockSync, Exchange, ExchangeStatus
from backpack_vault.backpack.signing import Signer, verify
from backpack_vault.config import Secret
from backpack_vault.core.caches import RateLimiter
from backpack_vault.core.clock import iso_utc
from backpack_vault.core.keys import (
    PRODUCTION_EXCHANGE,
    KeyRecord,
    KeyRef,
    Status,
    same_exchange,
)
from backpack_vault.core.rotation import Role
from backpack_vault.core.verdicts import CheckResult, ProbeResponse, Rule, Verdict, classify
from backpack_vault.errors import InvalidInput, KeyMismatch, ServiceError, UnknownKey, WriteConflict
from backpack_vault.events import Cause, KeyStatusChanged, Listener
from backpack_vault.vault.port import VaultPort

__all__ = [
    "CHECK_ACTOR",
    "DEFAULT_BUDGET_PER_MINUTE",
    "MAX_CONTROLS",
    "PROBE_WINDOW_MS",
    "REMEASURE_S",
    "UNRESOLVED",
    "Checked",
    "Checker",
    "RequestBudget",
]

log = structlog.get_logger()

PROBE_WINDOW_MS: Final = 5000
DEFAULT_BUDGET_PER_MINUTE: Final = 120  # Backpack allows 2000/min per sub-account
REMEASURE_S: Final = 5.0  # reuse an Ok status and a measured clock offset this long
RECENT_S: Final = 3600.0  # a VALID or a rejection this old still counts as "lately"
MAX_CONTROLS: Final = 5  # control keys probed for one rejection, at most
CHECK_ACTOR: Final = "check"  # status_by of a status a check wrote
# Verdicts that are not the end of the story: the daemon re-checks the key soon.
UNRESOLVED: Final = frozenset({"systemic", "unconfirmed_rejection"})
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


# -- one evaluation: read the key, ask the exchange ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Checked:
    """What a check found, and why its verdict was not written when it must not be.

    ``foreign`` is empty unless the answer is not the key's own exchange's: then the
    verdict is shown (returned, logged, printed) and nothing else happens.
    """

    result: CheckResult
    foreign: str = ""
    record: KeyRecord | None = None  # the key as the check read it (None: not read)


@dataclass(frozen=True, slots=True)
class _Evaluated:
    result: CheckResult
    record: KeyRecord | None  # None: the key's check was already running
    sandbox: bool = False  # some answer of this check said it came from a sandbox


class _Outcome:
    """One check in progress: counts the signed requests it sent."""

    __slots__ = ("probes", "ref", "sandbox", "sub")

    def __init__(self, ref: KeyRef) -> None:
        self.ref = ref
        self.sub = ref.subaccount
        self.probes = 0
        self.sandbox = False

    def saw(self, response: ProbeResponse) -> None:
        self.sandbox = self.sandbox or _from_sandbox(response)


def _from_sandbox(response: ProbeResponse) -> bool:
    """Whether an answer carried the sandbox's label (an answer that does not is Backpack's)."""
    return response.sandbox


def _any(_record: KeyRecord) -> bool:
    return True


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

    def evaluate(
        self,
        ref: KeyRef,
        *,
        statuses: frozenset[Status] = _PROBED,
        probe_if: Callable[[KeyRecord], bool] = _any,
        confirm: bool = True,
    ) -> _Evaluated:
        """Probe ``ref`` when its status is one of ``statuses`` and ``probe_if`` holds.

        ``confirm=False`` stops at the first probe: a REJECTED then is a candidate only.
        """
        with self._running_lock:
            if ref in self._running:
                return _Evaluated(self.result(ref, Verdict.UNKNOWN, "already_running"), None)
            self._running.add(ref)
        try:
            record, secret = self._vault.read_key(ref)
            outcome = _Outcome(ref)
            if record.status in statuses and probe_if(record):
                result = self._evaluate_record(record, secret, outcome, confirm=confirm)
            else:
                result = self.result(ref, Verdict.UNKNOWN, "not_probed", old=record.status)
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
        return _Evaluated(result, record, outcome.sandbox)

    def evaluate_pair(self, record: KeyRecord, secret: Secret, *, confirm: bool) -> _Evaluated:
        """Probe a pair that is not the name's current key (its successor or standby)."""
        outcome = _Outcome(record.ref)
        result = self._evaluate_record(record, secret, outcome, confirm=confirm)
        log.info(
            "check.verdict",
            key=str(record.ref),
            api_key=record.api_key,
            verdict=result.verdict.value,
            reason=result.reason,
            row=result.row,
            probes=result.probes,
        )
        return _Evaluated(result, record, outcome.sandbox)

    def _evaluate_record(
        self, record: KeyRecord, secret: Secret, outcome: _Outcome, *, confirm: bool
    ) -> CheckResult:
        signer = _local_check(record, secret)
        if isinstance(signer, str):
            return self.result(
                record.ref, Verdict.MISCONFIGURED, signer, old=record.status, alert=True
            )
        return self._remote(record, signer, outcome, confirm=confirm)

    def _remote(
        self, record: KeyRecord, signer: Signer, outcome: _Outcome, *, confirm: bool
    ) -> CheckResult:
        ref, old = record.ref, record.status
        if not self._budget.try_acquire(outcome.sub):
            return self.result(ref, Verdict.UNKNOWN, "rate_limited", old=old)
        status = self._status()
        outcome.saw(status.response)
        if not status.ok:
            if status.maintenance:
                return self.result(
                    ref, Verdict.UNKNOWN, "maintenance", response=status.response, old=old
                )
            return self._unsigned_failure(ref, status.response, old)
        first = self._probe(outcome, signer, old, budgeted=True)
        if first.verdict is not Verdict.REJECTED or not confirm:
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
            if sync is not None:
                outcome.saw(sync.response)
                if not sync.ok:
                    return self._unsigned_failure(outcome.ref, sync.response, old)
            if not (budgeted and attempt == 0) and not self._budget.try_acquire(outcome.sub):
                return self.result(
                    outcome.ref, Verdict.UNKNOWN, "rate_limited", outcome=outcome, old=old
                )
            outcome.probes += 1
            response = self._exchange.probe(signer, self._window_ms)
            outcome.saw(response)
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


# -- what checks saw lately: the reference set and the outage -----------------------------------


@dataclass(slots=True)
class _Outage:
    since: str  # ISO-8601, for logs and the alert
    checks: int = 0  # systemic verdicts during it


class _Memory:
    """VALID and rejected keys lately, keys that are no control, and the outage; thread-safe.

    Times are the checker's clock; ``valids`` counts VALID verdicts so that a check can
    tell whether any key was accepted while it ran, whatever the clock does.
    """

    def __init__(self, recent_s: float) -> None:
        self._recent_s = recent_s
        self._lock = threading.Lock()
        self._valid_at: dict[KeyRef, float] = {}
        self._rejected_at: dict[KeyRef, float] = {}
        self._no_control: dict[KeyRef, float] = {}  # read lately: not active, or elsewhere
        self.valids = 0
        self.outage: _Outage | None = None

    def _prune(self, now: float) -> None:
        horizon = now - self._recent_s
        for seen in (self._valid_at, self._rejected_at, self._no_control):
            for ref in [r for r, t in seen.items() if t < horizon]:
                del seen[ref]

    def valid(self, ref: KeyRef, now: float) -> _Outage | None:
        """``ref`` was accepted: a reference again; an outage ends (returned, to log it)."""
        with self._lock:
            self._valid_at[ref] = now
            self._rejected_at.pop(ref, None)
            self._no_control.pop(ref, None)
            self.valids += 1
            ended, self.outage = self.outage, None
        return ended

    def rejected(self, ref: KeyRef, now: float) -> None:
        """``ref`` was rejected: a suspect, no longer a reference."""
        with self._lock:
            self._valid_at.pop(ref, None)
            self._rejected_at[ref] = now

    def no_control(self, ref: KeyRef, now: float) -> None:
        """``ref`` is not an active key of this exchange (final, pending, deleted, elsewhere)."""
        with self._lock:
            self._valid_at.pop(ref, None)
            self._rejected_at.pop(ref, None)
            self._no_control[ref] = now

    def forget(self, ref: KeyRef) -> None:
        with self._lock:
            self._valid_at.pop(ref, None)
            self._rejected_at.pop(ref, None)

    def snapshot(self, now: float) -> tuple[list[KeyRef], list[KeyRef], frozenset[KeyRef]]:
        """(VALID lately, most recent first; rejected lately, longest ago first; no controls)."""
        with self._lock:
            self._prune(now)
            valid = sorted(self._valid_at, key=lambda r: self._valid_at[r], reverse=True)
            rejected = sorted(self._rejected_at, key=lambda r: self._rejected_at[r])
            return valid, rejected, frozenset(self._no_control)

    def systemic(self, valids_before: int, since: str) -> tuple[bool, bool]:
        """(whether the verdict stands, whether it is the outage's first and alerts).

        It does not stand when a key was accepted while the check ran: then the
        rejections may be the keys' own after all.
        """
        with self._lock:
            if self.valids != valids_before:
                return False, False
            first = self.outage is None
            if self.outage is None:
                self.outage = _Outage(since)
            self.outage.checks += 1
            return True, first


# -- the checker ----------------------------------------------------------------------------------


class Checker:
    """Checks keys against Backpack; writes a key's status to Vault only when it changes.

    ``emit`` receives one ``KeyStatusChanged(cause=CHECK)`` per status a check wrote.
    """

    def __init__(
        self,
        vault: VaultPort,
        exchange: Exchange,
        *,
        clock: Callable[[], float] = time.time,
        budget: RequestBudget | None = None,
        emit: Listener | None = None,
        window_ms: int = PROBE_WINDOW_MS,
        confirm_delay_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        remeasure_s: float = REMEASURE_S,
        recent_s: float = RECENT_S,
        max_controls: int = MAX_CONTROLS,
        failover: Callable[[KeyRecord, CheckResult], KeyRecord | None] | None = None,
    ) -> None:
        """``failover`` is asked, when a confirmed rejection would revoke a key whose
        standby is ready, to switch the name to the standby instead (``rotation.py``);
        it returns the switched record, or None when the standby did not take over."""
        self._failover = failover
        self._vault = vault
        self._clock = clock
        self.exchange_url = exchange.base_url
        self._emit = emit
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
        self._memory = _Memory(recent_s)
        self._max_controls = max(1, max_controls)
        self._remeasure_s = remeasure_s
        self._listed_lock = threading.Lock()
        self._listed: tuple[float, tuple[KeyRef, ...]] | None = None

    # -- public ---------------------------------------------------------------------------

    def check(self, ref: KeyRef) -> CheckResult:
        """Check one key; raises UnknownKey, VaultUnavailable, ... from reading it."""
        return self.examine(ref).result

    def examine(self, ref: KeyRef) -> Checked:
        """Check one key, and say why its verdict was not written when it must not be."""
        valids_before = self._memory.valids
        return self._finish(self._evaluator.evaluate(ref), valids_before)

    def probe_pair(self, record: KeyRecord, secret: Secret, *, confirm: bool = False) -> Checked:
        """Probe a key that is not (yet) its name's current one: a successor or a standby.

        ``record`` describes that key. Nothing is written and nothing is remembered for
        the cross-check; a foreign answer is said, as for any check.
        """
        evaluated = self._evaluator.evaluate_pair(record, secret, confirm=confirm)
        return Checked(
            evaluated.result, self.foreign(record, sandbox=evaluated.sandbox), evaluated.record
        )

    def check_many(self, refs: Iterable[KeyRef], *, concurrency: int = 1) -> list[CheckResult]:
        """Check several keys (a sweep); Vault errors become UNKNOWN, deleted keys drop out.

        Every key is probed first (``concurrency`` at a time), then each verdict goes
        through the guards in turn, with what the whole sweep saw already remembered.
        """
        refs = list(refs)
        if concurrency > 1 and len(refs) > 1:
            with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="check") as pool:
                found = list(pool.map(self._evaluate_in_sweep, refs))
        else:
            found = [self._evaluate_in_sweep(ref) for ref in refs]
        evaluated = [item for item in found if item is not None]
        for item in evaluated:
            self._remember(item)
        valids_before = self._memory.valids
        results = []
        for item in evaluated:
            try:
                results.append(self._finish(item, valids_before).result)
            except ServiceError as exc:
                log.warning(
                    "check.status_write_failed", key=str(item.result.ref), error=exc.message
                )
                results.append(item.result)
        return results

    def reinstate(self, ref: KeyRef, *, reason: str, actor: str) -> Checked:
        """Probe a revoked key once; a VALID from its own exchange makes it active again.

        Only VALID writes (``expect=REVOKED``: nothing else is overwritten); any other
        verdict, or a foreign answer, changes nothing. ``reason`` and ``actor`` are
        recorded with the change. An operator's act: nothing is emitted (replicas
        learn of it from the change feed) and no alert goes out.
        """
        evaluated = self._evaluator.evaluate(
            ref, statuses=frozenset({Status.REVOKED}), confirm=False
        )
        record, result = evaluated.record, evaluated.result
        if record is None:
            return Checked(result)
        foreign = self.foreign(record, sandbox=evaluated.sandbox)
        if foreign:
            log.warning("check.not_written", key=str(ref), verdict=result.label, why=foreign)
            return Checked(result, foreign)
        if record.status is not Status.REVOKED or result.verdict is not Verdict.VALID:
            return Checked(result)
        self._vault.set_status(
            ref,
            Status.ACTIVE,
            now=result.checked_at,
            verdict=result.label,
            expect=Status.REVOKED,
            reason=reason,
            actor=actor,
        )
        self._valid(ref)
        log.warning(
            "key.status_changed", key=str(ref), old="revoked", new="active", by=actor, why=reason
        )
        return Checked(replace(result, new_status=Status.ACTIVE))

    def foreign(self, record: KeyRecord, *, sandbox: bool = False) -> str:
        """Why a verdict about ``record`` reached here must not be written ("" when it may)."""
        if not same_exchange(record.exchange, self.exchange_url):
            return (
                f"{record.ref} belongs to {record.exchange}, and this verdict came from "
                f"{self.exchange_url}"
            )
        if sandbox and same_exchange(record.exchange, PRODUCTION_EXCHANGE):
            return (
                f"{record.ref} belongs to Backpack ({record.exchange}), and the answer came "
                "from a sandbox exchange (it says so in every answer)"
            )
        return ""

    @property
    def outage_since(self) -> str | None:
        """When the current outage (systemic state) began; None when there is none."""
        outage = self._memory.outage
        return outage.since if outage else None

    # -- the cross-check --------------------------------------------------------------------

    def _judge(self, result: CheckResult, valids_before: int) -> tuple[CheckResult, str]:
        """An active key's verdict, through the guards; and the detail recorded with a change."""
        if result.verdict is Verdict.VALID:
            self._valid(result.ref)
            return result, ""
        if result.verdict is not Verdict.REJECTED:
            return result, ""
        return self._cross_check(result, valids_before)

    def _cross_check(self, result: CheckResult, valids_before: int) -> tuple[CheckResult, str]:
        ref = result.ref
        self._memory.rejected(ref, self._clock())
        listed = self._listed_refs()
        rejected: list[KeyRef] = []
        unsure: list[KeyRef] = []
        tried, untried = 0, listed is None  # unlisted keys may hold a control
        for control, suspect in self._controls(ref, listed or ()):
            if suspect and rejected:
                break  # the rest were rejected lately, and one of them again just now
            if tried >= self._max_controls:
                untried = True
                break
            verdict = self._probe_control(control)
            if verdict is None:
                continue
            tried += 1
            if verdict is Verdict.VALID:
                return self._after_valid_control(result, control)
            (rejected if verdict is Verdict.REJECTED else unsure).append(control)
        if untried or unsure:
            log.warning(
                "check.rejection_unconfirmed",
                key=str(ref),
                controls_rejected=[str(c) for c in rejected],
                controls_inconclusive=[str(c) for c in unsure],
                controls_left=untried,
            )
            return _unconfirmed(result), ""
        if rejected:
            return self._systemic(result, rejected, valids_before), ""
        log.info("check.no_control", key=str(ref))
        return result, "rejected twice; no other active key to compare with"

    def _controls(self, ref: KeyRef, listed: Iterable[KeyRef]) -> Iterator[tuple[KeyRef, bool]]:
        """Candidate controls for a rejection of ``ref``, best first; True marks a suspect."""
        valid, rejected, no_control = self._memory.snapshot(self._clock())
        suspects = set(rejected)
        seen = {ref}
        for control in valid:
            seen.add(control)
            yield control, False
        for control in listed:
            if control not in seen and control not in suspects and control not in no_control:
                seen.add(control)
                yield control, False
        for control in rejected:
            if control not in seen:
                yield control, True

    def _listed_refs(self) -> tuple[KeyRef, ...] | None:
        """Every key in Vault, listed at most once per ``remeasure_s``; None when Vault fails."""
        now = self._clock()
        with self._listed_lock:
            listed = self._listed
        if listed is not None and 0 <= now - listed[0] < self._remeasure_s:
            return listed[1]
        try:
            refs = tuple(self._vault.list_refs())
        except ServiceError as exc:
            log.warning("check.list_failed", error=exc.code)
            return None
        with self._listed_lock:
            self._listed = (now, refs)
        return refs

    def _is_control(self, record: KeyRecord) -> bool:
        return record.status is Status.ACTIVE and not self.foreign(record)

    def _probe_control(self, control: KeyRef) -> Verdict | None:
        """One probe of a control: its verdict, or None when it is no control (not active,
        another exchange's, deleted, misconfigured)."""
        try:
            evaluated = self._evaluator.evaluate(
                control,
                statuses=frozenset({Status.ACTIVE}),
                probe_if=self._is_control,
                confirm=False,
            )
        except UnknownKey:
            self._memory.no_control(control, self._clock())
            return None
        except ServiceError as exc:
            log.warning("check.control_unreadable", control=str(control), error=exc.code)
            return Verdict.UNKNOWN
        record, result = evaluated.record, evaluated.result
        if record is None:  # its own check is running: no answer from it now
            return Verdict.UNKNOWN
        unusable = result.reason == "not_probed" or result.verdict is Verdict.MISCONFIGURED
        if unusable or self.foreign(record, sandbox=evaluated.sandbox):
            self._memory.no_control(control, self._clock())
            return None
        if result.verdict is Verdict.VALID:
            self._valid(control)
        elif result.verdict is Verdict.REJECTED:
            self._memory.rejected(control, self._clock())
        return result.verdict

    def _after_valid_control(self, result: CheckResult, control: KeyRef) -> tuple[CheckResult, str]:
        """Backpack accepts ``control``: probe the key once more, after that answer.

        Only a rejection that outlasts an accepted control is the key's own; this
        also keeps the end of an outage (keys accepted again between the key's probes
        and the control's) from revoking anything.
        """
        ref = result.ref
        again = self._evaluator.evaluate(ref, statuses=frozenset({Status.ACTIVE}), confirm=False)
        third = again.result
        if again.record is None:
            return _unconfirmed(result), ""
        if third.reason == "not_probed":  # its status changed meanwhile: nothing to write
            return third, ""
        if third.verdict is Verdict.VALID:
            self._valid(ref)
            log.warning("check.rejection_withdrawn", key=str(ref), control=str(control))
            return third, ""
        if third.verdict is not Verdict.REJECTED:
            return _unconfirmed(third), ""
        log.info("check.rejection_specific", key=str(ref), control=str(control))
        combined = replace(third, probes=result.probes + third.probes)
        return combined, f"rejected three times while {control} was accepted"

    def _systemic(
        self, result: CheckResult, rejected: list[KeyRef], valids_before: int
    ) -> CheckResult:
        stands, first = self._memory.systemic(valids_before, result.checked_at)
        if not stands:
            log.warning(
                "check.rejection_unconfirmed", key=str(result.ref), why="accepted_meanwhile"
            )
            return _unconfirmed(result)
        log.error(
            "check.systemic",
            key=str(result.ref),
            controls_rejected=[str(c) for c in rejected],
            outage_since=self.outage_since,
            alert=first,
        )
        return replace(result, verdict=Verdict.UNKNOWN, reason="systemic", alert=first)

    def _valid(self, ref: KeyRef) -> None:
        ended = self._memory.valid(ref, self._clock())
        if ended is not None:
            log.warning(
                "check.systemic_cleared", key=str(ref), since=ended.since, checks=ended.checks
            )

    def _finish(self, evaluated: _Evaluated, valids_before: int) -> Checked:
        record, result = evaluated.record, evaluated.result
        if record is None:
            return Checked(result)
        foreign = self.foreign(record, sandbox=evaluated.sandbox)
        if foreign:
            log.warning("check.not_written", key=str(record.ref), verdict=result.label, why=foreign)
            return Checked(result, foreign, record)
        why = ""
        if record.status is Status.ACTIVE:
            result, why = self._judge(result, valids_before)
        elif result.verdict is Verdict.VALID:  # pending: it becomes active now
            self._valid(record.ref)
        elif record.status not in _PROBED:
            self._memory.forget(record.ref)
        settled, after = self._settle(record, result, why)
        return Checked(settled, "", after)

    def _remember(self, evaluated: _Evaluated) -> None:
        """What a sweep saw of an active key of this exchange, before any guard runs."""
        record, result = evaluated.record, evaluated.result
        if record is None or record.status is not Status.ACTIVE:
            return
        if self.foreign(record, sandbox=evaluated.sandbox):
            return
        if result.verdict is Verdict.VALID:
            self._valid(record.ref)
        elif result.verdict is Verdict.REJECTED:
            self._memory.rejected(record.ref, self._clock())

    def _evaluate_in_sweep(self, ref: KeyRef) -> _Evaluated | None:
        try:
            return self._evaluator.evaluate(ref)
        except UnknownKey:
            log.info("check.key_gone", key=str(ref))
            return None
        except ServiceError as exc:
            log.warning("check.vault_error", key=str(ref), error=exc.message)
            return _Evaluated(
                self._evaluator.result(ref, Verdict.UNKNOWN, "vault_unavailable"), None
            )

    # -- the only Vault write ---------------------------------------------------------------

    def _settle(
        self, record: KeyRecord, result: CheckResult, why: str
    ) -> tuple[CheckResult, KeyRecord]:
        """Write the status when the verdict changes it; emit the change once.

        A confirmed rejection of a key whose standby is ready is a failover instead:
        the standby takes the name over, and the old key is revoked in the same write.
        """
        old = record.status
        new: Status | None = None
        if result.verdict is Verdict.VALID and old is Status.PENDING:
            new = Status.ACTIVE
        elif result.verdict is Verdict.REJECTED and old is Status.ACTIVE:
            new = Status.REVOKED
        if new is None:
            return result, record
        if new is Status.REVOKED and self._failover is not None and _standby_ready(record):
            switched = self._failover(record, result)
            if switched is not None:
                self._memory.forget(record.ref)
                return replace(result, reason=f"{result.reason}; failover"), switched
        try:
            updated = self._vault.set_status(
                record.ref,
                new,
                now=result.checked_at,
                verdict=result.label,
                expect=old,
                reason=f"{result.label}: {why}" if why else result.label,
                actor=CHECK_ACTOR,
            )
        except WriteConflict as exc:
            log.warning("check.status_conflict", key=str(record.ref), error=exc.message)
            return result, record
        result = replace(result, new_status=new)
        if new is Status.REVOKED:
            self._memory.no_control(record.ref, self._clock())
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
        return result, updated


def _standby_ready(record: KeyRecord) -> bool:
    nxt = record.next
    return nxt is not None and nxt.role is Role.STANDBY and nxt.ready


def _unconfirmed(result: CheckResult) -> CheckResult:
    return replace(result, verdict=Verdict.UNKNOWN, reason="unconfirmed_rejection", alert=False)


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
