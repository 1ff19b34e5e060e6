"""*When* the daemon's jobs run: apscheduler 3.x, imported here and nowhere else.

Jobs are plain callables (``session.renew_token``, ``leadership.sync_keys``, ...);
they say *what* runs. This module runs them on four bounded thread pools:

    default    token renewal, health, sweep, lease, key sync   4 threads
    frequent   the change feed poll, several times a second     1 thread, runs not logged
    checks     one scheduled liveness check per key            settings.checks.concurrency
    reports    a check a worker's report asked for             2 threads, never behind checks

A job never overlaps itself, and missed runs coalesce into one. While shutdown
runs, adding or removing a job does nothing: apscheduler's shutdown holds its job
store lock while it waits for running jobs, so a job that adds one (the lease
job scheduling a key sync) would otherwise wait for it forever. A job on the
``frequent`` pool would log two lines per run and, while Vault hangs, a "skipped"
warning per interval: both are dropped for it (its own code logs its failures).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Self

from apscheduler.executors.pool import ThreadPoolExecutor  # type: ignore[import-untyped]
from apscheduler.jobstores.base import JobLookupError  # type: ignore[import-untyped]
from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
    BackgroundScheduler,
)
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]

from backpack_vault.config import CheckSettings

__all__ = ["FREQUENT", "Intervals", "Scheduler"]

_JOB_DEFAULTS: Final = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
FREQUENT: Final = "frequent"


class _SchedulerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """apscheduler's scheduler logger, without "skipped: maximum number of running
    instances" for jobs on the frequent pool."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("apscheduler.scheduler"), {})
        self.quiet: set[str] = set()

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        if args and getattr(args[0], "id", None) in self.quiet:
            return
        super().warning(msg, *args, **kwargs)


@dataclass(frozen=True, slots=True)
class Intervals:
    """Seconds between two runs of each periodic job."""

    renew_s: float
    health_s: float
    sweep_s: float
    lease_s: float
    sync_s: float
    feed_s: float

    @classmethod
    def of(
        cls,
        checks: CheckSettings,
        *,
        renew_s: float,
        health_s: float,
        sweep_s: float,
        feed_s: float,
        sync_s: float | None = None,
    ) -> Self:
        """The lease is renewed three times per TTL; keys are synced at least every 30 s."""
        return cls(
            renew_s=renew_s,
            health_s=health_s,
            sweep_s=sweep_s,
            lease_s=max(checks.lease_ttl / 3, 0.5),
            sync_s=sync_s or min(checks.interval, 30.0),
            feed_s=feed_s,
        )


class Scheduler:
    """Runs plain callables periodically or once, on named thread pools."""

    def __init__(self, *, check_workers: int, report_workers: int = 2) -> None:
        self._log = _SchedulerLog()
        self._lock = threading.Lock()  # held by each call into apscheduler but shutdown
        self._stopping = False
        # Each run of a frequent job would log "Running job" and "executed successfully".
        logging.getLogger(f"apscheduler.executors.{FREQUENT}").setLevel(logging.WARNING)
        self._scheduler = BackgroundScheduler(
            logger=self._log,
            timezone="UTC",
            job_defaults=dict(_JOB_DEFAULTS),
            executors={
                "default": ThreadPoolExecutor(4),
                # The change feed: its own thread, so a hung Vault read delays nothing else.
                FREQUENT: ThreadPoolExecutor(1),
                # Checks have their own bounded pool so they never starve token renewal.
                "checks": ThreadPoolExecutor(check_workers),
                # A reported key is checked at once, not behind a backlog of scheduled checks.
                "reports": ThreadPoolExecutor(report_workers),
            },
        )

    def add_job(
        self,
        func: Callable[..., object],
        *,
        seconds: float,
        job_id: str,
        jitter: float | None = None,
        first_run_in: float | None = None,
        args: tuple[Any, ...] = (),
        executor: str = "default",
    ) -> None:
        """Run ``func(*args)`` every ``seconds`` (plus up to ``jitter`` s); never overlapping.

        ``first_run_in`` seconds from now is the first run (default: one interval from now).
        A job of the same id is replaced.
        """
        extra: dict[str, Any] = {}
        if executor == FREQUENT:
            self._log.quiet.add(job_id)
        if first_run_in is not None:
            extra["next_run_time"] = datetime.now(UTC) + timedelta(seconds=first_run_in)
        with self._lock:
            if self._stopping:
                return
            self._scheduler.add_job(
                func,
                IntervalTrigger(seconds=seconds, jitter=jitter, timezone="UTC"),
                args=args,
                id=job_id,
                name=job_id,
                replace_existing=True,
                executor=executor,
                **extra,
            )

    def run_soon(
        self,
        func: Callable[..., object],
        *,
        job_id: str,
        args: tuple[Any, ...] = (),
        executor: str = "default",
    ) -> None:
        """Run ``func(*args)`` once, as soon as a thread of ``executor`` is free."""
        with self._lock:
            if self._stopping:
                return
            self._scheduler.add_job(
                func, args=args, id=job_id, name=job_id, replace_existing=True, executor=executor
            )

    def remove_job(self, job_id: str) -> None:
        """Stop running ``job_id``; nothing happens when there is no such job."""
        with self._lock, contextlib.suppress(JobLookupError):
            if not self._stopping:
                self._scheduler.remove_job(job_id)

    def get_job(self, job_id: str) -> Any:
        """The scheduled job (apscheduler's ``Job``), or None."""
        with self._lock:
            return None if self._stopping else self._scheduler.get_job(job_id)

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def start(self) -> None:
        with self._lock:
            self._scheduler.start()

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop scheduling; with ``wait``, let running jobs finish first."""
        with self._lock:  # no job is inside apscheduler now, and none enters it meanwhile
            self._stopping = True
        try:
            if self._scheduler.running:
                self._scheduler.shutdown(wait=wait)
        finally:
            with self._lock:
                self._stopping = False
