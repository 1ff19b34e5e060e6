"""Rotation and failover: when a name switches to its next key. Never schedules.

The leader's check job of a name calls :meth:`Rotator.advance` with the record
the check just read; the checker calls :meth:`Rotator.failover` when a confirmed
rejection would revoke a key whose standby is ready::

    switch stopped between its two writes (the pair is the next key's)  --> finish it
    predecessor retiring, past safe_at (its last copy expired)            --> retired, alert
    successor (keys rotate)          --probe VALID--> switch: the old key retiring, "rotated"
                                     --anything else--> stays pending (verdict recorded)
    standby pending                  --probe VALID--> ready
    standby ready, name active       --probe REJECTED, confirmed--> pending again, warning
    standby ready, name revoked (by an operator, or a failover that could not probe)
                                     --probe VALID--> failover: the old key revoked, "rotated"
    confirmed REJECTED of an active key with a ready standby (checks.py)
                                     --standby probe VALID--> failover instead of a revocation
                                     --anything else--> the key is revoked as usual

A switch is one check-and-set write of the pair into the name (``Vault.write_next_pair``),
then its metadata; every replica and watch stream learns of it from the change feed
as ``rotated``. The old key's copies may still be out: it is ``retiring`` until
``safe_at`` (now + the copy lifetime + a grace for replicas), then ``retired``. Its
rejection by Backpack (the operator deleted it in the UI) is never probed for, so it
can never count as a revocation or an outage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Final

from backpack_vault.checks import CHECK_ACTOR, Checker
from backpack_vault.config import Secret
from backpack_vault.core.clock import iso_utc, parse_iso
from backpack_vault.core.keys import (
    RETIRING,
    KeyRecord,
    Origin,
    Status,
    retire_predecessor_patch,
    switch_patch,
)
from backpack_vault.core.rotation import NextKey, NextState, Role
from backpack_vault.core.verdicts import CheckResult, Verdict
from backpack_vault.errors import ServiceError, WriteConflict
from backpack_vault.events import Cause, Event, KeyRotated, PredecessorRetired
from backpack_vault.logging import get_logger
from backpack_vault.vault.port import VaultPort

__all__ = ["GRACE_S", "Rotator"]

log = get_logger("backpack_vault.rotation")

GRACE_S: Final = 5.0  # replicas learn of a switch within a second; copies made then expire later


class Rotator:
    """Switches names to their next key; moves retiring predecessors to retired."""

    def __init__(
        self,
        vault: VaultPort,
        checker: Checker,
        *,
        copy_ttl_s: float,
        emit: Callable[[Event], None],
        clock: Callable[[], float] = time.time,
        grace_s: float = GRACE_S,
    ) -> None:
        self._vault = vault
        self._checker = checker
        self._copy_ttl_s = copy_ttl_s
        self._emit = emit
        self._clock = clock
        self._grace_s = grace_s

    # -- the check job's step ---------------------------------------------------------------

    def advance(self, record: KeyRecord) -> str:
        """Act on what stands beside ``record``'s current key; say what happened ("" none)."""
        nxt, previous = record.next, record.previous
        if nxt is not None and nxt.api_key == record.api_key:
            return self._finish_stopped_switch(record)
        done = ""
        if previous is not None and previous.status == RETIRING and self._safe(previous.safe_at):
            done = self._retire_predecessor(record)
            record = self._vault.read_record(record.ref) if done else record
            nxt = record.next
        if nxt is None or record.status is Status.RETIRED:
            return done
        if nxt.role is Role.SUCCESSOR:
            return self._try_successor(record, nxt) or done
        if record.status is Status.REVOKED and nxt.ready:
            return "failover" if self.failover(record) is not None else done
        return self._check_standby(record, nxt) or done

    def failover(self, record: KeyRecord, result: CheckResult | None = None) -> KeyRecord | None:
        """Switch a revoked (or about to be revoked) key's name to its ready standby.

        The standby is probed first; only a VALID from the key's own exchange lets it
        take over. Returns the switched record, or None (the caller revokes as usual).
        """
        nxt = record.next
        if nxt is None or nxt.role is not Role.STANDBY:
            return None
        probed = self._probe(record, nxt, confirm=False)
        if probed is None:
            return None
        secret, verdict = probed
        if verdict.verdict is not Verdict.VALID:
            log.error(
                "rotation.standby_refused",
                key=str(record.ref),
                api_key=nxt.api_key,
                verdict=verdict.label,
            )
            return None
        why = result.label if result is not None else verdict.label
        return self._switch(record, secret, failover=True, verdict=why)

    # -- the steps --------------------------------------------------------------------------

    def _try_successor(self, record: KeyRecord, nxt: NextKey) -> str:
        if record.status is not Status.ACTIVE:
            return ""
        probed = self._probe(record, nxt, confirm=False)
        if probed is None:
            return ""
        secret, result = probed
        if result.verdict is Verdict.VALID:
            return (
                "rotated"
                if self._switch(record, secret, failover=False, verdict=result.label)
                else ""
            )
        # Not accepted (yet): the operator has not registered it, or Backpack is busy.
        self._note(
            record, replace(nxt, last_verdict=result.label, last_checked_at=result.checked_at)
        )
        return ""

    def _check_standby(self, record: KeyRecord, nxt: NextKey) -> str:
        probed = self._probe(record, nxt, confirm=nxt.ready)
        if probed is None:
            return ""
        _secret, result = probed
        state = nxt.state
        if result.verdict is Verdict.VALID and not nxt.ready:
            state = NextState.READY
            log.info("rotation.standby_ready", key=str(record.ref), api_key=nxt.api_key)
        elif result.verdict is Verdict.REJECTED and nxt.ready:
            state = NextState.PENDING
            log.error(
                "rotation.standby_rejected",
                key=str(record.ref),
                api_key=nxt.api_key,
                advice="Backpack no longer accepts the standby: store a new one",
            )
        self._note(
            record,
            replace(nxt, state=state, last_verdict=result.label, last_checked_at=result.checked_at),
        )
        return "standby_ready" if state is not nxt.state and state is NextState.READY else ""

    def _probe(
        self, record: KeyRecord, nxt: NextKey, *, confirm: bool
    ) -> tuple[Secret, CheckResult] | None:
        """The next key's secret and one verdict on it; None when it cannot be had here."""
        try:
            secret = self._vault.read_next_secret(record.ref, nxt.api_key)
        except ServiceError as exc:
            log.warning("rotation.next_unreadable", key=str(record.ref), error=exc.message)
            return None
        checked = self._checker.probe_pair(_as_record(record, nxt), secret, confirm=confirm)
        if checked.foreign:
            log.warning("rotation.not_written", key=str(record.ref), why=checked.foreign)
            return None
        return secret, checked.result

    def _note(self, record: KeyRecord, nxt: NextKey) -> None:
        """Record the next key's latest verdict (and state) when it changed."""
        if nxt == record.next:
            return
        try:
            self._vault.patch_record(record.ref, nxt.to_metadata())
        except ServiceError as exc:
            log.warning("rotation.note_failed", key=str(record.ref), error=exc.message)

    def _switch(
        self, record: KeyRecord, secret: Secret, *, failover: bool, verdict: str
    ) -> KeyRecord | None:
        nxt = record.next
        if nxt is None:
            return None
        now_s = self._clock()
        now, safe_at = iso_utc(now_s), self._safe_at(now_s)
        patch = switch_patch(
            record, now=now, failover=failover, safe_at=safe_at, verdict=verdict, actor=CHECK_ACTOR
        )
        try:
            version = self._vault.write_next_pair(record, secret)
        except WriteConflict as exc:
            log.warning("rotation.switch_conflict", key=str(record.ref), error=exc.message)
            return None
        except ServiceError as exc:
            log.error(  # noqa: TRY400 - no traceback: nothing in it is of use, and it is long
                "rotation.switch_failed",
                key=str(record.ref),
                error=exc.code,
                detail=exc.message,
                advice="the name keeps its current key; if Vault denied the write, run "
                "`backpack-vault vault setup` to update the daemon's policy",
            )
            return None
        # The name points to the next key from this write on: this replica stops handing
        # out the old one now, before the metadata follows; other replicas learn of it from
        # the feed, which finish_switch writes.
        self._emit(
            KeyRotated(
                record.ref,
                record.api_key,
                nxt.api_key,
                failover,
                Cause.CHECK,
                safe_at="" if failover else safe_at,
            )
        )
        log.warning(
            "rotation.switched",
            key=str(record.ref),
            api_key=nxt.api_key,
            previous=record.api_key,
            failover=failover,
            safe_to_delete_at="" if failover else safe_at,
        )
        try:
            return self._vault.finish_switch(
                record.ref, patch, event="rotated", at=now, version=version
            )
        except ServiceError as exc:  # the pair is written: the next check finishes the rest
            log.warning("rotation.finish_failed", key=str(record.ref), error=exc.message)
            return self._vault.read_record(record.ref)

    def _finish_stopped_switch(self, record: KeyRecord) -> str:
        """The pair was written but not the metadata: finish from what the metadata says."""
        meta = self._vault.read_record(record.ref)  # its api_key is still the old key's
        nxt = meta.next
        if nxt is None or nxt.api_key == meta.api_key:
            return ""
        failover = meta.status is Status.REVOKED
        now_s = self._clock()
        now = iso_utc(now_s)
        before = replace(meta, version=max(1, meta.version - 1))
        patch = switch_patch(
            before,
            now=now,
            failover=failover,
            safe_at=self._safe_at(now_s),
            verdict=meta.next.last_verdict if meta.next else "",
            actor=CHECK_ACTOR,
        )
        switched = self._vault.finish_switch(
            record.ref, patch, event="rotated", at=now, version=meta.version
        )
        log.warning("rotation.switch_finished", key=str(record.ref), api_key=nxt.api_key)
        self._emit(
            KeyRotated(record.ref, meta.api_key, nxt.api_key, failover, Cause.CHECK, switched)
        )
        return "finished"

    def _safe_at(self, switched_s: float) -> str:
        """When the old key's last copy has expired: copies made until every replica
        knew of the switch live the copy lifetime, and the grace covers that knowing."""
        return iso_utc(switched_s + self._copy_ttl_s + self._grace_s)

    def _safe(self, safe_at: str) -> bool:
        try:
            return self._clock() >= parse_iso(safe_at)
        except ValueError:
            return True  # no time recorded (or a damaged one): nothing to wait for

    def _retire_predecessor(self, record: KeyRecord) -> str:
        previous = record.previous
        if previous is None:
            return ""
        now = iso_utc(self._clock())
        try:
            updated = self._vault.patch_record(
                record.ref, retire_predecessor_patch(record, now=now, actor=CHECK_ACTOR)
            )
        except ServiceError as exc:
            log.warning("rotation.retire_failed", key=str(record.ref), error=exc.message)
            return ""
        log.warning(
            "rotation.predecessor_retired",
            key=str(record.ref),
            api_key=previous.api_key,
            advice="delete this key in the Backpack UI now",
        )
        self._emit(PredecessorRetired(record.ref, previous.api_key, updated))
        return "retired"


def _as_record(record: KeyRecord, nxt: NextKey) -> KeyRecord:
    """The next key as a record of its own, for the checker's probe."""
    try:
        origin = Origin(nxt.origin)
    except ValueError:
        origin = Origin.GENERATED
    return KeyRecord(
        ref=record.ref,
        api_key=nxt.api_key,
        read_only=nxt.read_only,
        status=Status.PENDING,
        origin=origin,
        created_at=nxt.created_at,
        status_since=nxt.created_at,
        exchange=record.exchange,
    )
