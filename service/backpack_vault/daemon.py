"""Composition root and lifecycle of ``backpack-vault serve``; the only apscheduler importer.

::

    run()
      capture SIGTERM/SIGINT (the handler only sets a flag)
      vault.login()                 fail fast: a clear error, exit code from errors.py
      scheduler.start()             token renewal, readiness refresh, ledger sweep (+ check jobs)
      serve the worker API          until the flag is set; in-flight requests finish
      scheduler.shutdown()          reverse order, via the ExitStack
    return 0

Jobs are plain callables: *what* runs lives in broker.py and checks.py, *when*
lives here. ``add_job`` and ``run_soon`` are the seams for check jobs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from types import FrameType, TracebackType
from typing import Any, Final, Self

from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
    BackgroundScheduler,
)
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from backpack_vault.api import ReportCallback, create_app
from backpack_vault.broker import Broker
from backpack_vault.config import Settings
from backpack_vault.errors import ConfigError, ServiceError, VaultUnavailable
from backpack_vault.keys import KeyRef, Status
from backpack_vault.logging import get_logger
from backpack_vault.metrics import Metrics
from backpack_vault.serving import make_server
from backpack_vault.vault import Vault

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
        self._report: ReportCallback = report or self._report_received
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
                "default": {"type": "threadpool", "max_workers": settings.checks.concurrency + 3}
            },
        )
        self._intervals = {
            "vault.renew": renew_interval_s,
            "vault.health": health_interval_s,
            "broker.sweep": sweep_interval_s,
        }
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
            **extra,
        )

    def run_soon(self, func: Callable[..., Any], *, job_id: str, args: tuple[Any, ...] = ()) -> Any:
        """Run ``func(*args)`` once, as soon as a worker thread is free (e.g. a reported key)."""
        return self.scheduler.add_job(
            func, args=args, id=job_id, name=job_id, replace_existing=True
        )

    def set_report(self, report: ReportCallback) -> None:
        """Replace what a worker's rejection report triggers (the checks wiring sets this)."""
        self._report = report

    def key_status_changed(self, ref: KeyRef, new_status: Status | str) -> int:
        """The revocation cascade: drop caches, revoke unclaimed copies, update the gauge."""
        status = Status(new_status)
        revoked = self.broker.on_status_change(ref, status)  # also updates the metrics
        log.info("key.status_changed", key=str(ref), new=status.value, copies_revoked=revoked)
        return revoked

    def record_verdict(self, ref: KeyRef, verdict: str, reason: str = "") -> None:
        self.metrics.record_check(str(ref), verdict, reason)

    def _on_report(self, ref: KeyRef, reason: str) -> None:
        self._report(ref, reason)

    @staticmethod
    def _report_received(ref: KeyRef, reason: str) -> None:
        log.info("check.report_received", key=str(ref), reason=reason)

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
        self.scheduler.start()
        self._started = True
        log.info("daemon.started", listen=self.settings.listen)
        return self

    def stop(self) -> None:
        if self._started:
            self.scheduler.shutdown(wait=True)
            self._started = False
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
