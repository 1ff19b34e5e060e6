"""Composition root and lifecycle of ``backpack-vault serve``; the only apscheduler importer.

::

    run()
      capture SIGTERM/SIGINT (the handler only sets a flag)
      vault.login()                 fail fast: a clear error, exit code from errors.py
      scheduler.start()             token renewal, readiness refresh, ledger sweep, leader lease,
                                    key sync and one liveness-check job per key (leader only)
      serve the worker API          until the flag is set; in-flight requests finish
      scheduler.shutdown()          reverse order, via the ExitStack
    return 0

Jobs are plain callables: *what* runs lives in broker.py and checks.py, *when*
lives here. Liveness checks run on one replica at a time, the holder of the
leader lease; every replica serves workers and revokes its own unclaimed copies
of keys that become revoked or retired (``broker.sweep``).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from types import FrameType, TracebackType
from typing import Any, Final, Self

import httpx
from apscheduler.executors.pool import ThreadPoolExecutor  # type: ignore[import-untyped]
from apscheduler.jobstores.base import JobLookupError  # type: ignore[import-untyped]
from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
    BackgroundScheduler,
)
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from backpack_vault.alerts import Webhook
from backpack_vault.api import ReportCallback, create_app
from backpack_vault.backpack.rest import Exchange
from backpack_vault.broker import Broker
from backpack_vault.checks import Checker, Lease, RequestBudget
from backpack_vault.config import Settings
from backpack_vault.core.keys import KeyRecord, KeyRef, Status
from backpack_vault.core.verdicts import CheckResult
from backpack_vault.daemon.serving import make_server
from backpack_vault.errors import ConfigError, ServiceError, UnknownKey, VaultUnavailable
from backpack_vault.logging import get_logger
from backpack_vault.metrics import Metrics
from backpack_vault.vault.client import Vault

__all__ = ["Daemon", "capture_signals"]

log = get_logger("backpack_vault.daemon")

HANDLED_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def capture_signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``handler`` (main thread only); restore the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Daemon:
    """Wires Vault, broker, metrics, the API and the scheduler; ``run()`` is the lifecycle."""

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
    ) -> None:
        self.settings = settings
        self.vault = vault or Vault.for_service(settings.vault, clock=clock)
        self._owns_vault = vault is None
        self._clock = clock
        self.metrics = Metrics(registry or CollectorRegistry(auto_describe=True))
        self.broker = Broker(
            self.vault,
            settings.broker,
            grant_prefix=settings.vault.grant_prefix,
            clock=clock,
            on_status=lambda ref, status: self.metrics.set_key_status(str(ref), status),
            on_revoked=lambda _ref, count: self.metrics.observe_revocations(count),
        )
        self.app = create_app(
            self.broker,
            readiness=self.readiness,
            metrics=self.metrics,
            report=self._on_report,
            report_interval_s=report_interval_s,
        )
        self.scheduler = BackgroundScheduler(
            timezone="UTC",
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
            executors={
                "default": ThreadPoolExecutor(4),
                # Checks have their own bounded pool so they never starve token renewal.
                "checks": ThreadPoolExecutor(settings.checks.concurrency),
                # A reported key is checked at once, not behind a backlog of scheduled checks.
                "reports": ThreadPoolExecutor(2),
            },
        )
        checks = settings.checks
        self._intervals = {
            "vault.renew": renew_interval_s,
            "vault.health": health_interval_s,
            "broker.sweep": sweep_interval_s,
            "checks.lease": max(checks.lease_ttl / 3, 0.5),
            "checks.sync": key_sync_interval_s or min(checks.interval, 30.0),
        }
        self._exchange_http = exchange_http or httpx.Client(
            timeout=httpx.Timeout(checks.timeout), headers={"User-Agent": "backpack-vault"}
        )
        # timeout_s too: Exchange passes its own per-request timeout, which beats the client's.
        self.exchange = Exchange(
            self._exchange_http, checks.backpack_url, clock=clock, timeout_s=checks.timeout
        )
        self.webhook = (
            Webhook(httpx.Client(timeout=httpx.Timeout(5.0)), checks.webhook_url)
            if checks.webhook_url
            else None
        )
        self.checker = Checker(
            self.vault,
            self.exchange,
            clock=clock,
            budget=RequestBudget(checks.subaccount_budget_per_minute),
            on_change=self._on_key_change,
            confirm_delay_s=confirm_delay_s,
        )
        self.lease = Lease(self.vault, ttl_s=checks.lease_ttl, clock=clock)
        self.leader = False
        self._checked: dict[KeyRef, str] = {}  # ref -> scheduler job id, while leader
        self._final: set[KeyRef] = set()  # revoked, retired or incomplete: never checked again
        # Leadership changes and the set of check jobs change together, under this lock.
        self._leader_lock = threading.RLock()
        self._report: ReportCallback = report or self._check_reported
        self._graceful_s = graceful_s
        self.exit_requested = False
        self._signals = 0
        self.reachable = False
        self.authenticated = False
        self._started = False
        self._state_lock = threading.Lock()

    # -- seams for check jobs (checks.py's callables are scheduled here) ------------------

    def add_job(
        self,
        func: Callable[..., Any],
        *,
        seconds: float,
        job_id: str,
        jitter: float | None = None,
        first_run_in: float | None = None,
        args: tuple[Any, ...] = (),
        executor: str = "default",
    ) -> Any:
        """Run ``func(*args)`` every ``seconds`` (plus up to ``jitter`` s); never overlapping."""
        extra: dict[str, Any] = {}
        if first_run_in is not None:
            extra["next_run_time"] = datetime.now(UTC) + timedelta(seconds=first_run_in)
        return self.scheduler.add_job(
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
        func: Callable[..., Any],
        *,
        job_id: str,
        args: tuple[Any, ...] = (),
        executor: str = "default",
    ) -> Any:
        """Run ``func(*args)`` once, as soon as a worker thread is free (e.g. a reported key)."""
        return self.scheduler.add_job(
            func, args=args, id=job_id, name=job_id, replace_existing=True, executor=executor
        )

    def key_status_changed(self, ref: KeyRef, new_status: Status | str) -> int:
        """The revocation cascade: drop caches, revoke unclaimed copies, update the gauge."""
        status = Status(new_status)
        revoked = self.broker.on_status_change(ref, status)  # also updates the metrics
        log.info("key.cascade", key=str(ref), status=status.value, copies_revoked=revoked)
        return revoked

    def record_verdict(self, ref: KeyRef, verdict: str, reason: str = "") -> None:
        self.metrics.record_check(str(ref), verdict, reason)

    def _on_report(self, ref: KeyRef, reason: str) -> None:
        self._report(ref, reason)

    # -- liveness checks ----------------------------------------------------------------------

    def _on_key_change(self, old: KeyRecord, new: KeyRecord, result: CheckResult) -> None:
        """A check changed a key's status in Vault: cascade here, then alert."""
        self.key_status_changed(new.ref, new.status)
        if self.webhook is not None:
            self.webhook.key_status_changed(old, new, result)

    def _check_reported(self, ref: KeyRef, reason: str) -> None:
        """A worker says Backpack rejected the key: check it now, on this replica."""
        log.info("check.report_received", key=str(ref), reason=reason)
        self.run_soon(
            self.run_check, job_id=f"report:{ref}", args=(ref, "report"), executor="reports"
        )

    def run_check(self, ref: KeyRef, trigger: str = "schedule") -> CheckResult | None:
        """Job: one liveness check of one key; never raises into the scheduler."""
        try:
            result = self.checker.check(ref)
        except UnknownKey:
            log.info("check.key_gone", key=str(ref))
            self._unschedule(ref)
            return None
        except ServiceError as exc:
            log.warning("check.failed", key=str(ref), error=exc.code, detail=exc.message)
            return None
        self.record_verdict(ref, result.verdict.value, result.reason)
        if trigger != "schedule":
            log.info("check.triggered", key=str(ref), trigger=trigger, verdict=result.label)
        if result.alert and self.webhook is not None:
            self.webhook.check_alert(result)
        status = result.new_status or result.old_status
        if status is not None:
            self.metrics.set_key_status(str(ref), status)
        if status is not None and Status(status).final:  # revoked here, or retired elsewhere
            self._unschedule(ref)
            self._final.add(ref)
        return result

    def hold_lease(self) -> None:
        """Job: acquire or renew the leader lease; start or stop scheduling checks with it."""
        leader = self.lease.acquire_or_renew()
        with self._leader_lock:
            if leader and not self.leader:
                log.info("checks.leader_acquired", holder=self.lease.holder)
                self.leader = True
                self.run_soon(self.sync_keys, job_id="checks.sync.now")
            elif not leader and self.leader:
                log.warning("checks.leader_lost", holder=self.lease.holder)
                self.leader = False
                for ref in list(self._checked):
                    self._unschedule(ref)
            self.metrics.set_leader(leader=self.leader)

    def sync_keys(self) -> None:
        """Job: one check job per pending or active key; keys added, retired or deleted in
        Vault are picked up here without a restart."""
        if not self.leader:
            return
        try:
            # Names only, then the metadata of keys not seen before: a sync costs a few
            # list calls, not one read per key. Scheduled keys learn their status when checked.
            refs = set(self.vault.list_refs())
            with self._leader_lock:
                known = set(self._checked) | self._final
            new = [r for r in map(self._read_if_present, sorted(refs - known)) if r is not None]
        except ServiceError as exc:
            log.warning("checks.sync_failed", error=exc.code, detail=exc.message)
            return
        for gone in (set(self._checked) | self._final) - refs:
            self.metrics.forget_key(str(gone))  # deleted from Vault: drop its status series
        self._final = {ref for ref in self._final if ref in refs} | {
            r.ref for r in new if r.status.final or r.status is Status.INCOMPLETE
        }
        wanted = (refs & set(self._checked)) | {
            r.ref for r in new if r.status in (Status.PENDING, Status.ACTIVE)
        }
        interval = self.settings.checks.interval
        jitter = interval * self.settings.checks.jitter
        with self._leader_lock:
            # Listing takes a while with many keys: if the lease was lost meanwhile, the jobs
            # are gone and must stay gone, or two replicas would check every key.
            if not self.leader:
                return
            for ref in set(self._checked) - wanted:
                self._unschedule(ref)
            for ref in sorted(wanted - set(self._checked)):
                job_id = f"check:{ref}"
                self.add_job(
                    self.run_check,
                    seconds=interval,
                    job_id=job_id,
                    jitter=jitter,
                    # Spread first runs over the interval: a restart does not probe every key
                    # at once.
                    first_run_in=random.uniform(0, interval),  # noqa: S311 - spreading
                    args=(ref,),
                    executor="checks",
                )
                self._checked[ref] = job_id
            self.metrics.set_checked_keys(len(self._checked))

    def _read_if_present(self, ref: KeyRef) -> KeyRecord | None:
        try:
            return self.vault.read_record(ref)
        except UnknownKey:  # deleted between the listing and the read
            return None

    def _unschedule(self, ref: KeyRef) -> None:
        with self._leader_lock:
            job_id = self._checked.pop(ref, None)
            if job_id is not None:
                with contextlib.suppress(JobLookupError):
                    self.scheduler.remove_job(job_id)

    # -- readiness and the daemon's own Vault session -------------------------------------

    def readiness(self) -> tuple[bool, str]:
        with self._state_lock:
            reachable, authenticated = self.reachable, self.authenticated
        if not reachable:
            return False, "Vault is unreachable or sealed"
        if not authenticated:
            return False, "the daemon is not logged in to Vault"
        return True, ""

    def _set_state(
        self, *, reachable: bool | None = None, authenticated: bool | None = None
    ) -> None:
        with self._state_lock:
            before = (self.reachable, self.authenticated)
            if reachable is not None:
                self.reachable = reachable
            if authenticated is not None:
                self.authenticated = authenticated
            after = (self.reachable, self.authenticated)
        info = self.vault.token_info
        ttl = None if info is None or info.expires_at is None else info.expires_at - self._clock()
        self.metrics.set_vault_state(reachable=after[0], authenticated=after[1], token_ttl_s=ttl)
        if before != after:
            log.info(
                "vault.state_changed", reachable=after[0], authenticated=after[1], ready=all(after)
            )

    def login(self) -> None:
        try:
            info = self.vault.login()
        except ServiceError as exc:
            self._set_state(authenticated=False)
            log.error(  # noqa: TRY400 - the error is ours and complete; no traceback wanted
                "vault.login_failed", error=exc.code, detail=exc.message
            )
            raise
        self._set_state(reachable=True, authenticated=True)
        log.info(
            "vault.logged_in",
            method=self.settings.vault.auth,
            identity=info.identity,
            ttl_s=info.ttl,
            renewable=info.renewable,
        )

    def renew_token(self) -> None:
        """Job: renew the daemon's token before it expires; log in again when renewal fails."""
        if not self.vault.needs_renewal():
            return
        info = self.vault.token_info
        kind = "renew" if info is not None and info.renewable else "login"
        try:
            renewed = self.vault.renew()
        except VaultUnavailable as exc:
            self.metrics.observe_renewal(kind, "unavailable")
            self._set_state(reachable=False, authenticated=not self._token_expired())
            log.warning("vault.renew_failed", error=exc.code, detail=exc.message)
            return
        except ServiceError as exc:
            self.metrics.observe_renewal(kind, "failed")
            log.warning("vault.renew_failed", error=exc.code, detail=exc.message)
            self._relogin()
            return
        self.metrics.observe_renewal(kind, "ok")
        self._set_state(reachable=True, authenticated=True)
        log.info("vault.token_renewed", kind=kind, ttl_s=renewed.ttl)

    def _relogin(self) -> None:
        try:
            info = self.vault.login()
        except ServiceError as exc:
            self.metrics.observe_renewal("login", "failed")
            self._set_state(authenticated=False)
            log.error(  # noqa: TRY400 - the error is ours and complete; no traceback wanted
                "vault.auth_failed", error=exc.code, detail=exc.message
            )
            return
        self.metrics.observe_renewal("login", "ok")
        self._set_state(reachable=True, authenticated=True)
        log.info("vault.logged_in", method=self.settings.vault.auth, identity=info.identity)

    def _token_expired(self) -> bool:
        info = self.vault.token_info
        return info is None or (info.expires_at is not None and info.expires_at <= self._clock())

    def refresh_health(self) -> None:
        """Job: is Vault reachable and unsealed, and does it still accept our token?"""
        try:
            self.vault.health()
            self.vault.probe_token()
        except VaultUnavailable as exc:
            self._set_state(reachable=False, authenticated=not self._token_expired())
            log.debug("vault.unavailable", detail=exc.message)
            return
        except ServiceError as exc:  # Vault answers but refuses our token: log in again
            self._set_state(reachable=True, authenticated=False)
            log.warning("vault.token_refused", error=exc.code)
            self._relogin()
            return
        self._set_state(reachable=True, authenticated=not self._token_expired())

    def sweep(self) -> None:
        """Job: forget expired copies; revoke unclaimed copies of keys retired elsewhere."""
        try:
            self.broker.sweep()
        except ServiceError as exc:
            log.warning("broker.sweep_failed", error=exc.code)

    # -- lifecycle ------------------------------------------------------------------------

    def request_exit(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Signal handler: only sets flags (the serving loop polls them); a second one hurries."""
        self._signals += 1
        self.exit_requested = True
        del signum

    def start(self) -> Self:
        """Log in (fail fast) and start the scheduler; serving is separate (``run`` or a test)."""
        self.login()
        self.refresh_health()
        self.add_job(self.renew_token, seconds=self._intervals["vault.renew"], job_id="vault.renew")
        self.add_job(
            self.refresh_health, seconds=self._intervals["vault.health"], job_id="vault.health"
        )
        self.add_job(self.sweep, seconds=self._intervals["broker.sweep"], job_id="broker.sweep")
        self.add_job(
            self.hold_lease,
            seconds=self._intervals["checks.lease"],
            job_id="checks.lease",
            first_run_in=0,
        )
        self.add_job(self.sync_keys, seconds=self._intervals["checks.sync"], job_id="checks.sync")
        self.scheduler.start()
        self._started = True
        log.info("daemon.started", listen=self.settings.listen)
        return self

    def stop(self) -> None:
        if self._started:
            self.scheduler.shutdown(wait=True)
            self._started = False
            if self.leader:
                self.lease.release()  # another replica takes over at once, not after expiry
                self.leader = False
        self._exchange_http.close()
        if self.webhook is not None:
            self.webhook.close()
        self.broker.clear()
        if self._owns_vault:
            self.vault.close()
        log.info("daemon.stopped")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; in-flight requests finish; return the exit code."""
        with ExitStack() as stack:
            stack.enter_context(capture_signals(self.request_exit))
            self.start()
            stack.callback(self.stop)
            self.serve_until_exit()
        return 0

    def serve_until_exit(self) -> None:
        """Serve the API on ``settings.listen`` until ``exit_requested``; then drain."""
        host, port = self.settings.listen_host_port
        server = make_server(self.app, host, port, graceful_s=self._graceful_s)
        thread = threading.Thread(target=server.run, name="api", daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise ConfigError(f"cannot serve on {host}:{port} (is the port in use?)")
            if self.exit_requested:
                break
            time.sleep(0.02)
        if server.started:
            log.info("daemon.serving", url=f"http://{host}:{port}")
        while not self.exit_requested and thread.is_alive():
            time.sleep(0.1)
        if not thread.is_alive():
            raise ServiceError("the API server stopped unexpectedly; see the logs above")
        log.info("daemon.draining", graceful_s=self._graceful_s)
        server.should_exit = True
        deadline = time.monotonic() + self._graceful_s + 5
        while thread.is_alive() and time.monotonic() < deadline:
            if self._signals > 1:  # a second SIGTERM/SIGINT: stop waiting for requests
                server.force_exit = True
            thread.join(timeout=0.1)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=5)
