"""Leadership: one replica at a time checks keys; it holds the lease and keeps the key set.

::

    hold_lease()   job: acquire or renew the lease; on gaining it sync at once,
                   on losing it drop every check job
    sync_keys()    job, leader only: one check job per pending or active key of the
                   exchange the checks probe; keys added, retired or deleted in Vault are
                   picked up without a restart, and final keys are read again once per
                   interval (a revoked key may be reinstated)
    on_event()     listener: a status written elsewhere (CLI, another replica) schedules
                   or unschedules the key at once
    run_check()    the check job of one key: verdict -> metrics -> the rotation step
                   (rotation.py: a successor accepted, a standby ready, a predecessor
                   retired); a final key leaves the schedule unless its ready standby is
                   still to take over; a systemic or unconfirmed verdict is re-checked soon

Re-checks: a verdict the checker could not settle (``checks.UNRESOLVED``: systemic,
unconfirmed rejection) brings a one-shot re-check of that key after 2 s, then 4, 8, ...
until it resolves or the delay reaches the interval, from where the key's regular
check carries on. A re-check runs on the pool of the check that asked for it, so a
worker's report is followed up on the reports pool, on any replica.

Every replica serves workers; only the leader probes Backpack on schedule. The
lease is a KV document written with check-and-set, so two replicas never both hold it.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable

from backpack_vault.checks import UNRESOLVED, Checker
from backpack_vault.core.keys import KeyRecord, KeyRef, Status
from backpack_vault.core.rotation import Role
from backpack_vault.core.verdicts import CheckResult, Verdict
from backpack_vault.daemon.jobs import Scheduler
from backpack_vault.errors import ServiceError, UnknownKey, WriteConflict
from backpack_vault.events import Cause, Event, KeyStatusChanged
from backpack_vault.logging import get_logger
from backpack_vault.metrics import Metrics
from backpack_vault.rotation import Rotator
from backpack_vault.vault.port import VaultPort

__all__ = ["Leadership", "Lease"]

log = get_logger("backpack_vault.daemon")

_SCHEDULED = frozenset({Status.PENDING, Status.ACTIVE})
_NEVER_CHECKED = frozenset({Status.REVOKED, Status.RETIRED, Status.INCOMPLETE})
RECHECK_FIRST_S = 2.0  # the first re-check of an unsettled verdict; doubles after


class Lease:
    """One leader among replicas: a KV document renewed with check-and-set.

    The document holds ``holder`` and ``expires_at`` (epoch seconds). A holder
    renews before expiry; anyone may take over once it has expired. Every write
    carries the version just read, so two contenders never both win.
    """

    def __init__(
        self,
        vault: VaultPort,
        holder: str | None = None,
        *,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        name: str = "leader",
    ) -> None:
        self._vault = vault
        self.holder = holder or f"replica-{uuid.uuid4().hex[:12]}"
        self.ttl_s = ttl_s
        self._clock = clock
        self._name = name
        self._expires_at = 0.0

    def held(self, now: float | None = None) -> bool:
        """Whether this replica holds an unexpired lease, as far as it last knew."""
        return (self._clock() if now is None else now) < self._expires_at

    def acquire_or_renew(self, now: float | None = None) -> bool:
        """Take the lease if free or expired, renew it if ours; False when another holds it."""
        now = self._clock() if now is None else now
        try:
            current = self._vault.read_document(self._name)
            cas = 0
            if current is not None:
                data, cas = current
                holder = str(data.get("holder", ""))
                expires_at = _float(data.get("expires_at"))
                if holder != self.holder and expires_at > now:
                    self._expires_at = 0.0
                    return False
            self._vault.write_document(
                self._name,
                {"holder": self.holder, "expires_at": now + self.ttl_s, "renewed_at": now},
                cas=cas,
            )
        except WriteConflict:
            log.info("lease.lost_race", holder=self.holder)
            self._expires_at = 0.0
            return False
        except ServiceError as exc:
            log.warning("lease.unavailable", holder=self.holder, error=exc.message)
            self._expires_at = 0.0
            return False
        if self._expires_at <= now:
            log.info("lease.acquired", holder=self.holder, ttl_s=self.ttl_s)
        self._expires_at = now + self.ttl_s
        return True

    def release(self) -> None:
        """Give the lease up now (on shutdown) so another replica need not wait for expiry."""
        was_held = self._expires_at > 0
        self._expires_at = 0.0
        if not was_held:
            return
        now = self._clock()
        try:
            current = self._vault.read_document(self._name)
            if current is None or current[0].get("holder") != self.holder:
                return
            self._vault.write_document(
                self._name,
                {"holder": self.holder, "expires_at": 0, "released_at": now},
                cas=current[1],
            )
        except ServiceError as exc:
            log.warning("lease.release_failed", holder=self.holder, error=exc.message)
            return
        log.info("lease.released", holder=self.holder)


def _float(value: object) -> float:
    if isinstance(value, int | float | str):
        try:
            return float(value)
        except ValueError:
            return 0.0
    return 0.0


class Leadership:
    """While this replica holds the lease, one check job per pending or active key."""

    def __init__(
        self,
        vault: VaultPort,
        lease: Lease,
        scheduler: Scheduler,
        checker: Checker,
        metrics: Metrics,
        *,
        interval_s: float,
        jitter_s: float,
        alert: Callable[[CheckResult], None] | None = None,
        recheck_first_s: float = RECHECK_FIRST_S,
        clock: Callable[[], float] = time.monotonic,
        offset_ms: Callable[[], int] | None = None,
        checked: Callable[[CheckResult], None] | None = None,
        rotator: Rotator | None = None,
    ) -> None:
        """``alert`` receives results that need a human without changing a status;
        ``offset_ms`` reads the exchange's clock offset after a check; ``checked`` sees
        every result (the operator page's last-check column)."""
        self._offset_ms = offset_ms
        self._on_checked = checked
        self._rotator = rotator
        self._vault = vault
        self.lease = lease
        self._scheduler = scheduler
        self._checker = checker
        self._metrics = metrics
        self._interval_s = interval_s
        self._jitter_s = jitter_s
        self._alert = alert
        self._recheck_first_s = recheck_first_s
        self._clock = clock
        self.held = False
        self._checked: dict[KeyRef, str] = {}  # ref -> scheduler job id, while leader
        self._final: set[KeyRef] = set()  # revoked, retired or incomplete: not checked
        self._foreign: dict[KeyRef, str] = {}  # keys of another exchange -> its URL
        self._reread_at = clock()  # when final and foreign keys were last read again
        self._backoff: dict[KeyRef, float] = {}  # the delay of a key's next re-check
        # Leadership changes and the set of check jobs change together, under this lock.
        self._lock = threading.RLock()

    # -- jobs -----------------------------------------------------------------------------

    def hold_lease(self) -> None:
        """Job: acquire or renew the leader lease; start or stop scheduling checks with it."""
        leader = self.lease.acquire_or_renew()
        with self._lock:
            if leader and not self.held:
                log.info("checks.leader_acquired", holder=self.lease.holder)
                self.held = True
                self._scheduler.run_soon(self.sync_keys, job_id="checks.sync.now")
            elif not leader and self.held:
                log.warning("checks.leader_lost", holder=self.lease.holder)
                self.held = False
                for ref in list(self._checked):
                    self.unschedule(ref)
            self._metrics.set_leader(leader=self.held)

    def sync_keys(self) -> None:
        """Job: one check job per pending or active key of this exchange, leader only."""
        if not self.held:
            return
        try:
            # Names only, then the metadata of keys not seen before (and, once per interval,
            # of final and foreign keys): a sync costs a few list calls, not one read per key.
            # Scheduled keys learn their status when checked.
            refs = set(self._vault.list_refs())
            with self._lock:
                known = set(self._checked) | self._final | set(self._foreign)
                again = self._due_for_reread() & refs
            fresh = sorted((refs - known) | again)
            new = [r for r in map(self._read_if_present, fresh) if r is not None]
        except ServiceError as exc:
            log.warning("checks.sync_failed", error=exc.code, detail=exc.message)
            return
        with self._lock:
            for gone in (set(self._checked) | self._final | set(self._foreign)) - refs:
                self._metrics.forget_key(str(gone))  # deleted from Vault: drop its status series
            self._final &= refs
            self._foreign = {ref: url for ref, url in self._foreign.items() if ref in refs}
            for record in new:  # every key shows in key_status, retired and revoked ones too
                self._metrics.set_key_status(str(record.ref), record.status)
            scheduled = {r.ref for r in new if self._sort(r)}
            wanted = (refs & set(self._checked)) | scheduled
            # Listing takes a while with many keys: if the lease was lost meanwhile, the jobs
            # are gone and must stay gone, or two replicas would check every key.
            if self.held:
                self._schedule_exactly(wanted)

    def run_check(self, ref: KeyRef, trigger: str = "schedule") -> CheckResult | None:
        """Job: one liveness check of one key; never raises into the scheduler."""
        return self._run(ref, trigger, "reports" if trigger == "report" else "checks")

    def on_event(self, event: Event) -> None:
        """Listener: a status written elsewhere puts the key on or off the schedule at once.

        A key made active again (``keys reinstate``) is read and scheduled; one revoked
        or retired by an operator is not probed again. Changes this replica's checks
        made are handled where they are made (``run_check``).
        """
        if not isinstance(event, KeyStatusChanged) or event.cause is Cause.CHECK:
            return
        with self._lock:
            if not self.held:
                return
            ref = event.ref
            if event.cause is Cause.DELETED:
                self.unschedule(ref)
                self._final.discard(ref)
                self._foreign.pop(ref, None)
            elif event.new in _NEVER_CHECKED and _standby_waits(event.record):
                # Revoked by an operator, with a standby ready: it takes over now.
                self._final.discard(ref)
                self._scheduler.run_soon(
                    self.run_check, job_id=f"failover:{ref}", args=(ref, "failover")
                )
            elif event.new in _NEVER_CHECKED:
                self.unschedule(ref)
                self._final.add(ref)
            elif ref in self._final:  # active or pending again: read it as a new key
                self._final.discard(ref)
                self._scheduler.run_soon(self.sync_keys, job_id="checks.sync.now")

    # -- the set of check jobs ------------------------------------------------------------

    def unschedule(self, ref: KeyRef) -> None:
        with self._lock:
            job_id = self._checked.pop(ref, None)
            if job_id is not None:
                self._scheduler.remove_job(job_id)
            self._scheduler.remove_job(_recheck_id(ref))
            self._backoff.pop(ref, None)

    def release(self) -> None:
        """On shutdown: give the lease up so another replica takes over at once."""
        with self._lock:
            if self.held:
                self.lease.release()
                self.held = False

    def _run(self, ref: KeyRef, trigger: str, pool: str) -> CheckResult | None:
        started = time.monotonic()
        try:
            checked = self._checker.examine(ref)
        except UnknownKey:
            log.info("check.key_gone", key=str(ref))
            self.unschedule(ref)
            return None
        except ServiceError as exc:
            log.warning("check.failed", key=str(ref), error=exc.code, detail=exc.message)
            return None
        result, record = checked.result, checked.record
        self._metrics.record_check(str(ref), result.verdict.value, result.reason)
        probed = result.probes > 0
        offset = self._offset_ms() if probed and self._offset_ms is not None else None
        self._metrics.observe_check(time.monotonic() - started, offset)
        if self._on_checked is not None:
            self._on_checked(result)
        if trigger != "schedule":
            log.info("check.triggered", key=str(ref), trigger=trigger, verdict=result.label)
        if result.alert and self._alert is not None:
            self._alert(result)
        if result.new_status is None and result.old_status is not None:
            # Unchanged: the gauge shows what the check saw. A change reaches the gauge as
            # a KeyStatusChanged event.
            self._metrics.set_key_status(str(ref), result.old_status)
        if record is not None and not checked.foreign:
            record = self._advance(record)
        self._file(ref, result, record, pool)
        return result

    def _file(self, ref: KeyRef, result: CheckResult, record: KeyRecord | None, pool: str) -> None:
        """After a check: off the schedule, a re-check soon, or the regular next check."""
        # The record is the key after the check (and after a switch, active again).
        status = record.status if record is not None else result.new_status or result.old_status
        if status is not None and status.final and _standby_waits(record):
            self._schedule_one(ref)  # a standby that did not take over yet is tried again
        elif status is not None and status.final:  # revoked here, or retired elsewhere
            with self._lock:
                self.unschedule(ref)
                self._final.add(ref)
        elif result.verdict is Verdict.UNKNOWN and result.reason in UNRESOLVED:
            self._recheck_later(ref, pool)
        elif result.reason != "already_running":  # settled: the next check is the regular one
            with self._lock:
                self._backoff.pop(ref, None)
                self._scheduler.remove_job(_recheck_id(ref))

    def _advance(self, record: KeyRecord) -> KeyRecord:
        """The rotation step after a key's check: a switch, a standby ready, a retirement."""
        if self._rotator is None or (record.next is None and record.previous is None):
            return record
        try:
            done = self._rotator.advance(record)
            if not done:
                return record
            log.info("rotation.advanced", key=str(record.ref), step=done)
            return self._vault.read_record(record.ref)
        except ServiceError as exc:
            log.warning("rotation.failed", key=str(record.ref), error=exc.code, detail=exc.message)
            return record

    def _schedule_one(self, ref: KeyRef) -> None:
        with self._lock:
            self._final.discard(ref)
            if self.held and ref not in self._checked:
                self._schedule_exactly({*self._checked, ref})

    def _recheck_later(self, ref: KeyRef, pool: str) -> None:
        """One re-check of ``ref`` after the key's current delay (2 s, doubling)."""
        with self._lock:
            if pool != "reports" and ref not in self._checked:
                return  # not this replica's key to check (no longer leader, or unscheduled)
            delay = self._backoff.get(ref, self._recheck_first_s)
            if delay >= self._interval_s:
                return  # from here the key's regular check, every interval, carries on
            self._backoff[ref] = delay * 2
            self._scheduler.add_job(
                self._recheck,
                seconds=self._interval_s,  # a one-shot: the job removes itself when it runs
                job_id=_recheck_id(ref),
                first_run_in=delay,
                args=(ref, pool),
                executor=pool,
            )
        log.info("check.recheck_scheduled", key=str(ref), in_s=delay, pool=pool)

    def _recheck(self, ref: KeyRef, pool: str) -> None:
        """Job: the one-shot re-check of a key whose last verdict was unsettled."""
        self._scheduler.remove_job(_recheck_id(ref))
        self._run(ref, "recheck", pool)

    def _sort(self, record: KeyRecord) -> bool:
        """File a key read from Vault (under the lock); True when it is to be checked."""
        ref = record.ref
        if record.status in _NEVER_CHECKED and not _standby_waits(record):
            self._final.add(ref)
            self._foreign.pop(ref, None)
            return False
        self._final.discard(ref)
        if not self._checker.foreign(record):
            self._foreign.pop(ref, None)
            return record.status in _SCHEDULED or _standby_waits(record)
        if self._foreign.get(ref) != record.exchange:
            # Its verdicts here could never be written: it is not probed at all.
            log.warning(
                "checks.key_of_another_exchange",
                key=str(ref),
                exchange=record.exchange,
                checks_probe=self._checker.exchange_url,
            )
        self._foreign[ref] = record.exchange
        return False

    def _due_for_reread(self) -> set[KeyRef]:
        """Final and foreign keys, once per interval (under the lock)."""
        now = self._clock()
        if now - self._reread_at < self._interval_s:
            return set()
        self._reread_at = now
        return self._final | set(self._foreign)

    def _schedule_exactly(self, wanted: Iterable[KeyRef]) -> None:
        wanted = set(wanted)
        for ref in set(self._checked) - wanted:
            self.unschedule(ref)
        for ref in sorted(wanted - set(self._checked)):
            job_id = f"check:{ref}"
            self._scheduler.add_job(
                self.run_check,
                seconds=self._interval_s,
                job_id=job_id,
                jitter=self._jitter_s,
                # Spread first runs over the interval: a restart does not probe every key
                # at once.
                first_run_in=random.uniform(0, self._interval_s),  # noqa: S311 - spreading
                args=(ref,),
                executor="checks",
            )
            self._checked[ref] = job_id
        self._metrics.set_checked_keys(len(self._checked))

    def _read_if_present(self, ref: KeyRef) -> KeyRecord | None:
        try:
            return self._vault.read_record(ref)
        except UnknownKey:  # deleted between the listing and the read
            return None


def _standby_waits(record: KeyRecord | None) -> bool:
    """A revoked key whose ready standby has not taken over yet: it is checked, to fail over."""
    if record is None or record.status is not Status.REVOKED or record.next is None:
        return False
    return record.next.role is Role.STANDBY and record.next.ready


def _recheck_id(ref: KeyRef) -> str:
    return f"recheck:{ref}"
