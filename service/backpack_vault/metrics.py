"""Prometheus metrics on a registry passed in (never the global one).

Labels carry key names, instructions, outcomes and verdicts only: never a
token, a secret, a signature or a caller's identity. Label values that come
from requests are bounded by the caller (``api.py`` labels a key only once the
broker has found it), so a client cannot grow the series without limit.

Status changes arrive as events (:meth:`Metrics.on_event`): the key status
gauge is set once per change, and revoked copies are counted.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from backpack_vault import __version__
from backpack_vault.core.keys import Status
from backpack_vault.events import Cause, CopiesRevoked, Event, KeyRotated, KeyStatusChanged

__all__ = ["NO_KEY", "Metrics"]

NO_KEY: Final = "-"
_CHECK_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0)
_OFFSET_BUCKETS: Final = (
    -5.0, -1.0, -0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)  # fmt: skip
_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    """Every metric the daemon exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, process: bool = True) -> None:
        # The *_created series double every counter's series and no panel or rule uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        # The worker API's series, by metric and label values: bounded as the series are.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self.build_info = Gauge(
            "backpack_vault_build_info",
            "Always 1; the labels say which backpack-vault and Python this process runs.",
            ["version", "python"],
            registry=registry,
        )
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)
        if process:  # process_cpu_seconds_total, process_resident_memory_bytes, ...
            ProcessCollector(registry=registry)
        self._declare_worker_api(registry)
        self._declare_vault_session(registry)
        self._declare_checks(registry)
        self.vault_authenticated.set(0)
        self.vault_reachable.set(0)

    def _declare_worker_api(self, registry: CollectorRegistry) -> None:
        self.handouts = Counter(
            "backpack_vault_handouts",
            "Wrapped copies requested, by key and outcome (ok or an error code).",
            ["key", "outcome"],
            registry=registry,
        )
        self.signatures = Counter(
            "backpack_vault_signatures",
            "Signatures requested, by key, instruction and outcome (ok or an error code).",
            ["key", "instruction", "outcome"],
            registry=registry,
        )
        self.requests = Counter(
            "backpack_vault_api_requests",
            "Worker API requests, by route and HTTP status.",
            ["route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "backpack_vault_api_request_seconds",
            "Time to answer a worker API request, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.reports = Counter(
            "backpack_vault_reports",
            "Rejections reported by workers, by key and outcome.",
            ["key", "outcome"],
            registry=registry,
        )
        self.outstanding = Gauge(
            "backpack_vault_wrapping_tokens_outstanding",
            "Wrapping tokens handed out whose TTL has not yet run out (claimed or not).",
            registry=registry,
        )

    def _declare_vault_session(self, registry: CollectorRegistry) -> None:
        self.vault_reachable = Gauge(
            "backpack_vault_vault_reachable",
            "1 when the last Vault health check succeeded.",
            registry=registry,
        )
        self.vault_authenticated = Gauge(
            "backpack_vault_vault_authenticated",
            "1 when the daemon holds a Vault token that Vault accepts.",
            registry=registry,
        )
        self.token_ttl = Gauge(
            "backpack_vault_vault_token_ttl_seconds",
            "Seconds until the daemon's Vault token expires (-1: never).",
            registry=registry,
        )
        self.renewals = Counter(
            "backpack_vault_vault_token_renewals",
            "Attempts to keep the daemon's Vault token alive, by kind and outcome.",
            ["kind", "outcome"],
            registry=registry,
        )

    def _declare_checks(self, registry: CollectorRegistry) -> None:
        self.checks = Counter(
            "backpack_vault_checks",
            "Liveness check verdicts, by key, verdict and reason.",
            ["key", "verdict", "reason"],
            registry=registry,
        )
        self.key_status = Gauge(
            "backpack_vault_key_status",
            "1 for each key's current status, 0 for its other statuses.",
            ["key", "status"],
            registry=registry,
        )
        self.last_checked = Gauge(
            "backpack_vault_key_last_checked_timestamp_seconds",
            "When each key was last checked (Unix time); kept here, not written to Vault.",
            ["key"],
            registry=registry,
        )
        self.leader = Gauge(
            "backpack_vault_checks_leader",
            "1 on the replica that holds the leader lease and runs the liveness checks.",
            registry=registry,
        )
        self.checked_keys = Gauge(
            "backpack_vault_checked_keys",
            "Keys with a scheduled liveness check on this replica.",
            registry=registry,
        )
        self.check_duration = Histogram(
            "backpack_vault_check_duration_seconds",
            "Time one liveness check took (status, clock, probes, any confirmation).",
            buckets=_CHECK_BUCKETS,
            registry=registry,
        )
        self.clock_offset = Histogram(
            "backpack_vault_clock_offset_seconds",
            "Backpack's clock minus ours, as measured before each probe.",
            buckets=_OFFSET_BUCKETS,
            registry=registry,
        )
        self.revocations = Counter(
            "backpack_vault_copies_revoked",
            "Unclaimed copies revoked because their key was revoked or retired.",
            registry=registry,
        )
        self.rotations = Counter(
            "backpack_vault_key_switches",
            "Names switched to their next key, by the checks of this replica: kind is "
            "rotation (a successor accepted) or failover (a standby took over).",
            ["key", "kind"],
            registry=registry,
        )

    # -- the worker API -------------------------------------------------------------------

    def _child(self, metric: Counter | Histogram, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per series: prometheus_client checks
        and copies the label values on every call, which every copy and signature paid.
        Only for metrics whose series are never removed."""
        found = self._children.get((metric, values))
        if found is None:
            found = self._children[(metric, values)] = metric.labels(*values)
        return found

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._child(self.requests, route, str(status)).inc()
        self._child(self.latency, route).observe(seconds)

    def observe_copy(self, key: str, outcome: str) -> None:
        self._child(self.handouts, key, outcome).inc()

    def observe_signature(self, key: str, instruction: str, outcome: str) -> None:
        self._child(self.signatures, key, instruction, outcome).inc()

    def observe_report(self, key: str, outcome: str) -> None:
        self.reports.labels(key=key, outcome=outcome).inc()

    def track_outstanding(self, count: Callable[[], float]) -> None:
        """Read the outstanding wrapping tokens from ``count`` at every scrape."""
        self.outstanding.set_function(count)

    # -- the daemon's own Vault session ---------------------------------------------------

    def set_vault_state(
        self, *, reachable: bool, authenticated: bool, token_ttl_s: float | None
    ) -> None:
        self.vault_reachable.set(1 if reachable else 0)
        self.vault_authenticated.set(1 if authenticated else 0)
        self.token_ttl.set(-1 if token_ttl_s is None else max(token_ttl_s, 0))

    def observe_renewal(self, kind: str, outcome: str) -> None:
        self.renewals.labels(kind=kind, outcome=outcome).inc()

    # -- status changes, as events ----------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Listener: a changed status sets the gauge; a deleted key drops its series."""
        if isinstance(event, KeyStatusChanged):
            if event.cause is Cause.DELETED:
                self.forget_key(str(event.ref))
            else:
                self.set_key_status(str(event.ref), event.new)
        elif isinstance(event, CopiesRevoked):
            self.observe_revocations(event.count)
        elif isinstance(event, KeyRotated) and event.cause is Cause.CHECK:
            kind = "failover" if event.failover else "rotation"
            self.rotations.labels(key=str(event.ref), kind=kind).inc()

    # -- liveness checks (recorded by the daemon from checks.py's results) ----------------

    def record_check(self, key: str, verdict: str, reason: str = "") -> None:
        self.checks.labels(key=key, verdict=verdict, reason=reason or "none").inc()
        self.last_checked.labels(key=key).set_to_current_time()

    def observe_check(self, seconds: float, offset_ms: int | None = None) -> None:
        """How long a check took and the clock offset it measured (None: not measured)."""
        self.check_duration.observe(seconds)
        if offset_ms is not None:
            self.clock_offset.observe(offset_ms / 1000)

    def set_leader(self, *, leader: bool) -> None:
        self.leader.set(1 if leader else 0)

    def set_checked_keys(self, count: int) -> None:
        self.checked_keys.set(count)

    def set_key_status(self, key: str, status: Status | str) -> None:
        current = Status(status)
        for each in Status:
            self.key_status.labels(key=key, status=each.value).set(1 if each is current else 0)

    def forget_key(self, key: str) -> None:
        """Drop a deleted key's status series."""
        for each in Status:
            try:
                self.key_status.remove(key, each.value)
            except KeyError:
                continue

    def observe_revocations(self, count: int) -> None:
        if count:
            self.revocations.inc(count)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
