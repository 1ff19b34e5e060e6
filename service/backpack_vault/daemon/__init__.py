"""Composition root and lifecycle of ``backpack-vault serve``.

::

    run()
      capture SIGTERM/SIGINT        the handler only sets a flag
      serve the worker API          at once: /healthz 200, /readyz 503 until logged in
      session.login_until()         Vault unreachable or refusing us: retried with backoff,
                                    each attempt logged; SIGTERM meanwhile exits 0
      scheduler.start()             change feed (every replica), token renewal, readiness,
                                    ledger sweep, leader lease, key sync and one liveness
                                    check per key (leader only)
      serve                         until the flag is set
      close watch streams, drain    in-flight requests finish; streams would never end
      stop the jobs, close clients  reverse order, via the ExitStack
    return 0

Who does what::

    jobs.py      when (apscheduler)       session.py   the daemon's own Vault token
    leader.py    lease, key sync, checks  serving.py   uvicorn, signals, draining
    feed.py      the change feed, polled  ../watch.py  the watch streams it feeds

Status changes travel as events on one bus, never as callbacks that call back::

    Checker (a verdict wrote a status)   --\\                 --> broker.on_event (caches, copies)
    Broker (a read saw a change)         ---> EventBus.emit  --> metrics.on_event (gauge, counter)
    FeedPoller (the CLI, other replicas) ---/                --> webhook.on_event (check-caused)
    key_status_changed (tests)           --/
    FeedPoller --the feed's entries, by seq--> Watchers --> GET .../watch streams

A worker's report goes ``POST .../report`` -> ``Daemon.report`` -> a check on
the reports pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from types import FrameType, TracebackType
from typing import Self

import httpx
from prometheus_client import CollectorRegistry

from backpack_vault.alerts import Webhook
from backpack_vault.api import ReportCallback, create_app
from backpack_vault.backpack.rest import Exchange
from backpack_vault.broker import Broker
from backpack_vault.checks import Checker, RequestBudget
from backpack_vault.config import Settings
from backpack_vault.core.keys import KeyRef, Status
from backpack_vault.core.verdicts import CheckResult
from backpack_vault.daemon.feed import DEFAULT_INTERVAL_S, FeedPoller
from backpack_vault.daemon.jobs import FREQUENT, Intervals, Scheduler
from backpack_vault.daemon.leader import Leadership, Lease
from backpack_vault.daemon.serving import (
    ReloadableTLS,
    ServerThread,
    capture_signals,
    on_reload_signal,
)
from backpack_vault.daemon.session import LOGIN_BACKOFF_S, Session
from backpack_vault.errors import ServiceError
from backpack_vault.events import Cause, CopiesRevoked, Event, EventBus, KeyStatusChanged
from backpack_vault.logging import get_logger
from backpack_vault.metrics import Metrics
from backpack_vault.rotation import Rotator
from backpack_vault.ui import create_ui
from backpack_vault.ui.source import Activity, DaemonSource
from backpack_vault.vault.client import Vault
from backpack_vault.watch import DEFAULT_HEARTBEAT_S, Watchers

__all__ = ["Daemon", "capture_signals"]

log = get_logger("backpack_vault.daemon")


class _Tally(threading.local):
    """Copies revoked by the events emitted in this thread (the bus runs listeners inline)."""

    revoked = 0


class Daemon:
    """Wires Vault, broker, checks, metrics, the API and the jobs; ``run()`` is the lifecycle."""

    def __init__(
        self,
        settings: Settings,
        *,
        vault: Vault | None = None,
        report: ReportCallback | None = None,
        registry: CollectorRegistry | None = None,
        health_interval_s: float = 5.0,
        renew_interval_s: float = 5.0,
        sweep_interval_s: float = 5.0,
        report_interval_s: float = 10.0,
        graceful_s: int = 10,
        clock: Callable[[], float] = time.time,
        exchange_http: httpx.Client | None = None,
        key_sync_interval_s: float | None = None,
        confirm_delay_s: float = 1.0,
        feed_interval_s: float = DEFAULT_INTERVAL_S,
        watch_heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        login_backoff_s: tuple[float, float] = LOGIN_BACKOFF_S,
    ) -> None:
        """``report`` replaces :meth:`report` as what the API calls (tests use it).

        ``feed_interval_s`` is how often the change feed is polled: the bound on how
        long an operator's retire or revoke takes to reach this replica.
        """
        self.settings = settings
        self.vault = vault or Vault.for_service(settings.vault, clock=clock)
        self._owns_vault = vault is None
        self.metrics = Metrics(registry or CollectorRegistry(auto_describe=True))
        self.events = EventBus()
        self.broker = Broker(
            self.vault,
            settings.broker,
            grant_prefix=settings.vault.grant_prefix,
            clock=clock,
            emit=self.events.emit,
        )
        self.scheduler = Scheduler(check_workers=settings.checks.concurrency)
        self.session = Session(
            self.vault,
            self.metrics,
            auth=settings.vault.auth,
            clock=clock,
            backoff_s=login_backoff_s,
        )
        self.watchers = Watchers(self.vault, heartbeat_s=watch_heartbeat_s)
        self.feed = FeedPoller(
            self.vault, emit=self.events.emit, notify=self.watchers.publish, recheck=self.recheck
        )
        self.activity = Activity()
        self._wire_checks(clock, exchange_http, confirm_delay_s)
        self._subscribe()
        self.tls = (
            ReloadableTLS(settings.tls_cert, settings.tls_key)
            if settings.tls_cert and settings.tls_key
            else None
        )
        self.app = create_app(
            self.broker,
            readiness=self.session.readiness,
            metrics=self.metrics,
            report=report or self.report,
            report_interval_s=report_interval_s,
            watch=self.watchers,
            ui=create_ui(self._ui_source(), secure_cookies=self.tls is not None),
            activity=self.activity,
        )
        self._intervals = Intervals.of(
            settings.checks,
            renew_s=renew_interval_s,
            health_s=health_interval_s,
            sweep_s=sweep_interval_s,
            feed_s=feed_interval_s,
            sync_s=key_sync_interval_s,
        )
        self._graceful_s = graceful_s
        self._tally = _Tally()
        self.exit_requested = False
        self._reload_requested = False
        self._signals = 0
        self._started = False

    def _wire_checks(
        self, clock: Callable[[], float], http: httpx.Client | None, confirm_delay_s: float
    ) -> None:
        """The exchange client, the webhook, the checker and the leadership that runs it."""
        checks = self.settings.checks
        self._exchange_http = http or httpx.Client(
            timeout=httpx.Timeout(checks.timeout), headers={"User-Agent": "backpack-vault"}
        )
        # timeout_s too: Exchange passes its own per-request timeout, which beats the client's.
        self.exchange = Exchange(
            self._exchange_http, checks.backpack_url, clock=clock, timeout_s=checks.timeout
        )
        self.webhook = (
            Webhook(
                httpx.Client(timeout=httpx.Timeout(5.0)),
                checks.webhook_url,
                alert_format=checks.alert_format,
            )
            if checks.webhook_url
            else None
        )
        self.checker = Checker(
            self.vault,
            self.exchange,
            clock=clock,
            budget=RequestBudget(checks.subaccount_budget_per_minute),
            emit=self.events.emit,
            confirm_delay_s=confirm_delay_s,
            # The rotator is made next, with this checker: the lambda finds it when called.
            failover=lambda record, result: self.rotator.failover(record, result),  # noqa: PLW0108
        )
        self.rotator = Rotator(
            self.vault,
            self.checker,
            copy_ttl_s=self.settings.broker.copy_ttl,
            emit=self.events.emit,
            clock=clock,
        )
        self.leadership = Leadership(
            self.vault,
            Lease(self.vault, ttl_s=checks.lease_ttl, clock=clock),
            self.scheduler,
            self.checker,
            self.metrics,
            interval_s=checks.interval,
            jitter_s=checks.interval * checks.jitter,
            alert=self.webhook.check_alert if self.webhook else None,
            offset_ms=lambda: self.exchange.offset_ms,
            checked=self._checked,
            rotator=self.rotator,
        )

    def _checked(self, result: CheckResult) -> None:
        self.activity.checked(str(result.ref), result.verdict.value, result.reason, now=time.time())

    def _ui_source(self) -> DaemonSource:
        leadership = self.leadership
        return DaemonSource(
            self.vault,
            kv_mount=self.settings.vault.kv_mount,
            kv_prefix=self.settings.vault.kv_prefix,
            activity=self.activity,
            outstanding=self.broker.outstanding_by_key,
            leader=lambda: leadership.lease.holder if leadership.held else None,
            readiness=self.session.readiness,
        )

    def _subscribe(self) -> None:
        """Listeners in order: copies are revoked before anyone is told."""
        self.events.subscribe(self.broker.on_event)
        self.events.subscribe(self.metrics.on_event)
        if self.webhook is not None:
            self.events.subscribe(self.webhook.on_event)
        self.events.subscribe(self._count_revoked)
        self.events.subscribe(self.leadership.on_event)  # a reinstated key is checked again

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; in-flight requests finish; return the exit code.

        Vault need not be up: the API answers /healthz at once and /readyz 503 while
        the daemon logs in with backoff. Only a ConfigError ends it early.
        """
        with ExitStack() as stack:
            stack.enter_context(capture_signals(self.request_exit))  # handlers only set a flag
            stack.enter_context(on_reload_signal(self.request_reload))  # SIGHUP: new TLS files
            stack.callback(self.close)  # last: clients, caches, our Vault session
            stack.callback(self.stop_jobs)  # after serving has drained; nothing if not started
            server = self.start_serving()
            stack.callback(self.stop_serving, server)  # first: close watch streams, drain
            if not self.session.login_until(lambda: self.exit_requested):
                return 0  # asked to stop while waiting for Vault
            self.start_jobs()
            server.serve_until(self._serving_done)
        return 0

    def request_reload(self, _signum: int | None = None, _frame: FrameType | None = None) -> None:
        """SIGHUP handler: only sets a flag; the serving loop reloads the TLS files."""
        self._reload_requested = True

    def _serving_done(self) -> bool:
        if self._reload_requested:
            self._reload_requested = False
            self.reload_tls()
        return self.exit_requested

    def reload_tls(self) -> None:
        """Load the certificate and key again; open connections keep the old ones."""
        if self.tls is None:
            log.info("daemon.reload_ignored", reason="no TLS configured")
            return
        try:
            self.tls.reload()
        except ServiceError as exc:
            log.error("daemon.tls_reload_failed", error=exc.message)  # noqa: TRY400
            return
        log.info("daemon.tls_reloaded", cert=self.tls.cert_file)

    def request_exit(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Signal handler: only sets flags (serving polls them); a second one hurries."""
        self._signals += 1
        self.exit_requested = True
        del signum

    def start(self) -> Self:
        """Log in (fail fast) and start the jobs; serving is separate (``run``, or a test)."""
        self.session.login()
        self.start_jobs()
        return self

    def start_jobs(self) -> None:
        """The first health check and feed poll, then the scheduler: what runs and how often."""
        self.session.refresh_health()
        self.feed.poll()  # its seq, before any watch stream reads its own
        every, i = self.scheduler.add_job, self._intervals
        every(self.feed.poll, seconds=i.feed_s, job_id="feed.poll", executor=FREQUENT)
        every(self.session.renew_token, seconds=i.renew_s, job_id="vault.renew")
        every(self.session.refresh_health, seconds=i.health_s, job_id="vault.health")
        every(self.sweep, seconds=i.sweep_s, job_id="broker.sweep")
        every(self.leadership.hold_lease, seconds=i.lease_s, job_id="checks.lease", first_run_in=0)
        every(self.leadership.sync_keys, seconds=i.sync_s, job_id="checks.sync")
        self.scheduler.start()
        self._started = True
        log.info("daemon.started", listen=self.settings.listen)

    def start_serving(self) -> ServerThread:
        """Serve the API on ``settings.listen`` (ConfigError when the port cannot be bound)."""
        host, port = self.settings.listen_host_port
        server = ServerThread(
            self.app, host, port, graceful_s=self._graceful_s, tls=self.tls
        ).start()
        log.info("daemon.serving", url=server.url)
        return server

    def stop_serving(self, server: ServerThread) -> None:
        """End the watch streams (they never end by themselves), then drain the requests."""
        log.info("daemon.draining", graceful_s=self._graceful_s)
        self.watchers.close()
        server.stop(hurry=lambda: self._signals > 1)  # a second signal: stop waiting

    def stop_jobs(self) -> None:
        """Stop the scheduler (running jobs finish) and hand the lease over."""
        if self._started:
            self.scheduler.shutdown(wait=True)
            self._started = False
            self.leadership.release()  # another replica takes over at once, not after expiry

    def close(self) -> None:
        """Close the clients and forget every cached secret."""
        self._exchange_http.close()
        if self.webhook is not None:
            self.webhook.close()
        self.broker.clear()
        if self._owns_vault:
            self.vault.close()
        log.info("daemon.stopped")

    def stop(self) -> None:
        self.watchers.close()
        self.stop_jobs()
        self.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what the API and operators call --------------------------------------------------

    def report(self, ref: KeyRef, reason: str) -> None:
        """A worker says Backpack rejected the key: check it now, on this replica."""
        log.info("check.report_received", key=str(ref), reason=reason)
        self.scheduler.run_soon(
            self.run_check, job_id=f"report:{ref}", args=(ref, "report"), executor="reports"
        )

    def key_status_changed(self, ref: KeyRef, new_status: Status | str) -> int:
        """A status written elsewhere (the CLI, a test): fan it out; the copies revoked."""
        self._tally.revoked = 0
        self.events.emit(KeyStatusChanged(ref, None, Status(new_status), Cause.OBSERVED))
        return self._tally.revoked

    def _count_revoked(self, event: Event) -> None:
        if isinstance(event, CopiesRevoked):
            self._tally.revoked += event.count

    # -- jobs, and the seams tests drive by hand ------------------------------------------

    def run_check(self, ref: KeyRef, trigger: str = "schedule") -> CheckResult | None:
        return self.leadership.run_check(ref, trigger)

    def hold_lease(self) -> None:
        self.leadership.hold_lease()

    def sync_keys(self) -> None:
        self.leadership.sync_keys()

    def sweep(self) -> None:
        """Job: forget expired copies; revoke unclaimed copies of keys retired elsewhere."""
        try:
            self.broker.sweep()
        except ServiceError as exc:
            log.warning("broker.sweep_failed", error=exc.code)

    def recheck(self) -> None:
        """The feed lost entries this replica never read: re-read every key it holds.

        Cached keys are dropped (the next request reads Vault and sees their status),
        keys with unclaimed copies are read now, and every watch stream is sent its
        key's status again.
        """
        self.broker.clear()
        self.sweep()
        self.watchers.resync()

    def record_verdict(self, ref: KeyRef, verdict: str, reason: str = "") -> None:
        self.metrics.record_check(str(ref), verdict, reason)

    @property
    def leader(self) -> bool:
        return self.leadership.held

    @property
    def lease(self) -> Lease:
        return self.leadership.lease

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether the daemon is ready, and what is missing (Session.readiness)."""
        return self.session.readiness()

    def login(self) -> None:
        self.session.login()

    def renew_token(self) -> None:
        self.session.renew_token()

    def refresh_health(self) -> None:
        self.session.refresh_health()
