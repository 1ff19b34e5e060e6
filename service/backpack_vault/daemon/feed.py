"""The change-feed poller: how every replica learns of a status change within a second.

Community Vault and OpenBao send no event notifications, so a change reaches the
replicas through Vault itself. Every status write (``Vault.set_status``, from the
CLI, a check on any replica, ``delete_key``) appends an entry to one small KV v2
document, written with check-and-set so that each entry gets the next ``seq``.
Each replica runs :meth:`FeedPoller.poll` every 0.2 s (``Daemon(feed_interval_s=)``):
one KV read of a document of at most ``FEED_KEEP`` entries. So the cost is about
five reads a second per replica, and an operator's ``keys retire`` or ``keys
revoke`` reaches every replica within one interval plus a read or two::

    poll()   read the feed --nothing after our seq--> done
             --first poll---------------------------> remember its seq (nothing is cached yet)
             --entries after our seq---------------> notify(changes): the watch streams, by seq
                                                     (from a "rotated" entry on: after the emits)
                                                     per key changed: read its record, emit
                                                     KeyStatusChanged(OBSERVED) (DELETED when
                                                     the key is gone) -> broker drops caches and,
                                                     for a final status, revokes unclaimed copies;
                                                     a "rotated" entry: KeyRotated(OBSERVED)
             --our seq pruned, or the feed restarted-> recheck(): every key this replica holds
             --Vault error--------------------------> logged once; the seq stays; next tick

The seq survives a daemon restart, which is why the watch streams use it as the
SSE ``id``. The poller keeps no state but two numbers: a replica that restarts
starts from the feed's current seq.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from backpack_vault.core.keys import KeyRef, Status
from backpack_vault.errors import ServiceError, UnknownKey
from backpack_vault.events import Cause, Event, KeyRotated, KeyStatusChanged
from backpack_vault.logging import get_logger
from backpack_vault.vault.port import Change, VaultPort

__all__ = ["DEFAULT_INTERVAL_S", "FeedPoller"]

log = get_logger("backpack_vault.daemon")

DEFAULT_INTERVAL_S = 0.2


def _nothing() -> None:
    return None


def _ignore(_changes: Sequence[Change]) -> None:
    return None


class FeedPoller:
    """Follows the change feed; turns its entries into events. ``poll`` is the job."""

    def __init__(
        self,
        vault: VaultPort,
        *,
        emit: Callable[[Event], None],
        notify: Callable[[Sequence[Change]], None] = _ignore,
        recheck: Callable[[], None] = _nothing,
    ) -> None:
        """``notify`` gets every new entry once, in seq order (the watch streams);
        ``recheck`` re-reads what this replica holds when entries were missed."""
        self._vault = vault
        self._emit = emit
        self._notify = notify
        self._recheck = recheck
        self._lock = threading.Lock()
        self._seq: int | None = None  # every change up to here is applied
        self._notified = 0  # every change up to here went to ``notify``
        self._failures = 0

    @property
    def seq(self) -> int | None:
        """The last seq applied; None before the first successful poll."""
        return self._seq

    def poll(self) -> None:
        """Job: read the feed once and act on what changed since the last poll."""
        with self._lock:
            try:
                feed = self._vault.read_changes()
            except ServiceError as exc:
                self._failed("read", exc)
                return
            if self._seq is None:
                self._follow(feed.seq)
                return
            if feed.seq < self._seq or not feed.covers(self._seq):
                self._gap(feed.seq)
                return
            changes = feed.since(self._seq)
            if not changes:
                self._recovered()
                return
            fresh = [c for c in changes if c.seq > self._notified]
            # Status news reaches the watch streams before anything else (the cutoff). A
            # switch is told only once this replica's broker has applied it: a worker that
            # hears ``rotated`` and asks for a copy at once must get the successor, not a
            # spare of the old key. Streams still see the entries in seq order.
            switch = next((i for i, c in enumerate(fresh) if c.event == "rotated"), len(fresh))
            if switch:
                self._notified = fresh[switch - 1].seq
                self._notify(fresh[:switch])
            if not self._apply(changes):
                return  # the rest is told once it is applied: the next poll reads it again
            if fresh[switch:]:
                self._notified = fresh[-1].seq
                self._notify(fresh[switch:])
            self._seq = changes[-1].seq
            self._recovered()

    def _follow(self, seq: int) -> None:
        self._seq = self._notified = seq
        self._recovered()
        log.info("feed.following", seq=seq)

    def _gap(self, seq: int) -> None:
        """Entries were pruned before we read them (or the feed started over): recheck all."""
        log.warning("feed.gap", last_seq=self._seq, feed_seq=seq)
        self._seq = self._notified = seq
        self._recovered()
        self._recheck()

    def _apply(self, changes: Sequence[Change]) -> bool:
        """One event per key changed, with the record as Vault has it now; False on an error.

        On an error nothing is marked: the next poll applies the same entries again,
        which does no harm (the broker applies an event twice as once).
        """
        latest: dict[KeyRef, Change] = {}
        rotated: set[KeyRef] = set()
        for change in changes:
            latest.pop(change.ref, None)
            latest[change.ref] = change  # in the order of each key's last change
            if change.event == "rotated":
                rotated.add(change.ref)
        for ref in latest:
            try:
                event = self._event_for(ref, rotated=ref in rotated)
            except ServiceError as exc:
                self._failed("read_record", exc, key=str(ref))
                return False
            self._emit(event)
        return True

    def _event_for(self, ref: KeyRef, *, rotated: bool) -> Event:
        try:
            record = self._vault.read_record(ref)
        except UnknownKey:
            return KeyStatusChanged(ref, None, Status.RETIRED, Cause.DELETED)
        previous = record.previous
        if rotated and previous is not None and record.status is Status.ACTIVE:
            failover = previous.status == Status.REVOKED.value
            return KeyRotated(
                ref, previous.api_key, record.api_key, failover, Cause.OBSERVED, record=record
            )
        return KeyStatusChanged(ref, None, record.status, Cause.OBSERVED, record=record)

    def _failed(self, step: str, exc: ServiceError, **context: str) -> None:
        self._failures += 1
        if self._failures == 1:  # at five polls a second, once per outage is enough
            log.warning(
                "feed.unavailable", step=step, error=exc.code, detail=exc.message, **context
            )
        else:
            log.debug("feed.unavailable", step=step, error=exc.code, failures=self._failures)

    def _recovered(self) -> None:
        if self._failures:
            log.info("feed.recovered", failures=self._failures, seq=self._seq)
            self._failures = 0
