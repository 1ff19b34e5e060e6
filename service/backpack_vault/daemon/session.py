"""The daemon's own Vault session: login, token renewal, re-login, and the readiness it implies.

::

    login()           one attempt; raises our error (Daemon.start, tests: fail fast)
    login_until(stop) at ``serve``: attempts with backoff (0.5 s doubling to 10 s), each logged
                      with Vault's address, until one succeeds (True) or stop() (False);
                      only a ConfigError (nothing to retry) is raised
    renew_token()     job: renew before expiry; log in again when renewal is refused
    refresh_health()  job: is Vault reachable and unsealed, does it accept our token, is the
                      KV mount there, do our policies grant what the daemon needs?
    readiness()       /readyz: (ready, details), the details naming what is missing

Readiness details::

    {"vault": "ok" | "unreachable" | "sealed",
     "auth": "ok" | "pending" | "failed",
     "kv_mount": "ok" | "missing" | "unknown",
     "policy": "ok" | "missing" | "unknown",
     "missing": ["vault", "auth", ...],      the entries above that are not "ok"
     "policy_missing": ["read on secret/data/backpack/*", ...],   when policy is "missing"
     "warnings": [...],                     granted too little for the feed, lease or checks
     "error": "..."}                        the last Vault or login error, while not ready

How each is known: ``vault`` from sys/health (503: sealed); ``auth`` from the
login and a lookup-self of our token; ``kv_mount`` from a write Vault must
refuse (check-and-set on a version that cannot exist, so nothing is written):
a missing mount answers 404 "no handler for route", which a read of an absent
document cannot tell apart from "not written yet"; ``policy`` from
sys/capabilities-self with our own token on the paths the daemon uses.

Every state change sets the Vault gauges and logs ``vault.state_changed`` once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final

from backpack_vault.core.clock import wait_for
from backpack_vault.errors import (
    ConfigError,
    NotPermitted,
    ServiceError,
    UpstreamError,
    VaultUnavailable,
    WriteConflict,
)
from backpack_vault.logging import get_logger
from backpack_vault.metrics import Metrics
from backpack_vault.vault.client import Vault

__all__ = ["LOGIN_BACKOFF_S", "Session"]

log = get_logger("backpack_vault.daemon")

LOGIN_BACKOFF_S: Final = (0.5, 10.0)  # the first wait between login attempts, and the cap
_LEASE_DOCUMENT: Final = "leader"
_NO_SUCH_VERSION: Final = 2**62  # a check-and-set version no document reaches: always refused

OK: Final = "ok"


def _allows(caps: frozenset[str], needed: str) -> bool:
    return "root" in caps or ("deny" not in caps and needed in caps)


class Session:
    """Keeps the daemon's Vault token alive and knows whether the daemon is ready."""

    def __init__(
        self,
        vault: Vault,
        metrics: Metrics,
        *,
        auth: str,
        clock: Callable[[], float] = time.time,
        backoff_s: tuple[float, float] = LOGIN_BACKOFF_S,
    ) -> None:
        self._vault = vault
        self._metrics = metrics
        self._auth = auth  # the login method, for the log
        self._clock = clock
        self._backoff_s = backoff_s
        self._lock = threading.Lock()
        self._vault_state = "unreachable"
        self._auth_state = "pending"
        self._kv_mount = "unknown"
        self._policy = "unknown"
        self._policy_missing: tuple[str, ...] = ()
        self._warnings: tuple[str, ...] = ()
        self._error = ""
        self._probed = False  # kv_mount and policy were asked about once
        self._logged_storage: tuple[object, ...] = ()
        mount, prefix = vault.settings.kv_mount.strip("/"), vault.settings.kv_prefix.strip("/")
        self._paths = _Paths(mount, prefix)

    @property
    def addr(self) -> str:
        return self._vault.settings.addr

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether the daemon can serve, and what is missing if not."""
        with self._lock:
            details: dict[str, object] = {
                "vault": self._vault_state,
                "auth": self._auth_state,
                "kv_mount": self._kv_mount,
                "policy": self._policy,
            }
            missing = [name for name in ("vault", "auth") if details[name] != OK]
            # "unknown" once probed: Vault would not say (a denied probe); not a reason to refuse.
            missing += [
                name
                for name in ("kv_mount", "policy")
                if details[name] == "missing" or (details[name] != OK and not self._probed)
            ]
            details["missing"] = missing
            if self._policy_missing:
                details["policy_missing"] = list(self._policy_missing)
            if self._warnings:
                details["warnings"] = list(self._warnings)
            if missing and self._error:
                details["error"] = self._error
        return not missing, details

    # -- login ----------------------------------------------------------------------------

    def login(self) -> None:
        """Log in once; raise our error (and mark the daemon not logged in) when Vault refuses."""
        try:
            info = self._vault.login()
        except ServiceError as exc:
            self._login_failed(exc)
            log.error(  # noqa: TRY400 - the error is ours and complete; no traceback wanted
                "vault.login_failed", addr=self.addr, error=exc.code, detail=exc.message
            )
            raise
        self._logged_in()
        log.info(
            "vault.logged_in",
            addr=self.addr,
            method=self._auth,
            identity=info.identity,
            ttl_s=info.ttl,
            renewable=info.renewable,
        )

    def login_until(
        self, stop: Callable[[], bool], *, sleep: Callable[[float], object] = time.sleep
    ) -> bool:
        """Log in, retrying with backoff until it works (True) or ``stop()`` (False).

        Vault unreachable or sealed, and Vault refusing our credentials (a bad
        AppRole secret-id, a revoked token) are all retried: the daemon serves
        /healthz meanwhile and /readyz says which it is. A ConfigError is raised:
        no retry can fix settings.
        """
        first, cap = self._backoff_s
        delay = first
        attempt = 0
        while not stop():
            attempt += 1
            try:
                info = self._vault.login()
            except ConfigError:
                raise
            except ServiceError as exc:
                self._login_failed(exc)
                self._log_attempt(attempt, exc, delay)
            else:
                self._logged_in()
                log.info(
                    "vault.logged_in",
                    addr=self.addr,
                    method=self._auth,
                    identity=info.identity,
                    ttl_s=info.ttl,
                    renewable=info.renewable,
                    attempts=attempt,
                )
                return True
            if wait_for(stop, delay, every=min(0.1, delay), sleep=sleep):
                break
            delay = min(delay * 2, cap)
        return False

    def _log_attempt(self, attempt: int, exc: ServiceError, delay: float) -> None:
        context = {
            "addr": self.addr,
            "method": self._auth,
            "attempt": attempt,
            "error": exc.code,
            "detail": exc.message,
            "retry_in_s": delay,
        }
        if isinstance(exc, VaultUnavailable):
            log.warning("vault.login_waiting", **context)
        else:  # Vault answers and refuses us: say so loudly, a human must act
            log.error("vault.login_refused", **context)

    def _login_failed(self, exc: ServiceError) -> None:
        if isinstance(exc, VaultUnavailable):
            auth = "pending" if self._vault.token_info is None else self._auth_if_valid()
            self._set_state(vault=_unavailable(exc), auth=auth, error=exc.message)
        else:
            self._set_state(vault=OK, auth="failed", error=exc.message)

    def _logged_in(self) -> None:
        self._set_state(vault=OK, auth=OK, error="")

    # -- jobs -----------------------------------------------------------------------------

    def renew_token(self) -> None:
        """Job: renew the daemon's token before it expires; log in again when renewal fails."""
        if not self._vault.needs_renewal():
            return
        info = self._vault.token_info
        kind = "renew" if info is not None and info.renewable else "login"
        try:
            renewed = self._vault.renew()
        except VaultUnavailable as exc:
            self._metrics.observe_renewal(kind, "unavailable")
            self._set_state(vault=_unavailable(exc), auth=self._auth_if_valid(), error=exc.message)
            log.warning("vault.renew_failed", error=exc.code, detail=exc.message)
            return
        except ServiceError as exc:
            self._metrics.observe_renewal(kind, "failed")
            log.warning("vault.renew_failed", error=exc.code, detail=exc.message)
            self._relogin()
            return
        self._metrics.observe_renewal(kind, "ok")
        self._set_state(vault=OK, auth=OK)
        log.info("vault.token_renewed", kind=kind, ttl_s=renewed.ttl)

    def refresh_health(self) -> None:
        """Job: Vault reachable and unsealed? Our token accepted? KV mount and policy there?"""
        try:
            self._vault.health()
            self._vault.probe_token()
        except VaultUnavailable as exc:
            self._set_state(vault=_unavailable(exc), auth=self._auth_if_valid(), error=exc.message)
            log.debug("vault.unavailable", detail=exc.message)
            return
        except ServiceError as exc:  # Vault answers but refuses our token: log in again
            self._set_state(vault=OK, auth="failed", error=exc.message)
            log.warning("vault.token_refused", error=exc.code)
            self._relogin()
            return
        self._set_state(vault=OK, auth=self._auth_if_valid(), error="")
        self.probe_storage()

    def probe_storage(self) -> None:
        """Is the KV mount there, and do our policies grant what the daemon does?"""
        kv_mount = self._probe_kv_mount()
        policy = self._probe_policy()
        with self._lock:
            if kv_mount is not None:
                self._kv_mount = kv_mount
            if policy is not None:
                state, self._policy_missing, self._warnings = policy
                self._policy = state
                self._probed = True
        self._log_storage()

    def _probe_kv_mount(self) -> str | None:
        try:
            self._vault.write_document(_LEASE_DOCUMENT, {}, cas=_NO_SUCH_VERSION)
        except WriteConflict:
            return OK  # the mount answered: a version mismatch, nothing written
        except VaultUnavailable:
            return None  # ask again next time
        except UpstreamError as exc:
            # 404 "no handler for route": nothing is mounted there. A denial (VaultDenied)
            # says nothing about the mount; the policy probe reports it.
            if type(exc) is UpstreamError and exc.message.endswith("InvalidPath"):
                return "missing"
            return None
        return None  # pragma: no cover - Vault never accepts that version

    def _probe_policy(self) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
        paths = self._paths
        try:
            caps = self._vault.own_capabilities(paths.all)
        except VaultUnavailable:
            return None
        except NotPermitted:
            return "missing", ("update on sys/capabilities-self",), ()
        except ServiceError as exc:
            log.debug("vault.policy_probe_failed", error=exc.code)
            return None
        missing = tuple(
            f"{capability} on {shown}"
            for path, capability, shown in paths.required
            if not _allows(caps[path], capability)
        )
        warnings = tuple(
            f"{capability} on {shown}: {why}"
            for path, capability, shown, why in paths.wanted
            if not _allows(caps[path], capability)
        )
        return ("missing" if missing else OK), missing, warnings

    def _log_storage(self) -> None:
        with self._lock:
            kv_mount, policy, missing = self._kv_mount, self._policy, self._policy_missing
            warnings = self._warnings
            logged = (kv_mount, policy, missing, warnings)
            if logged == self._logged_storage:
                return
            self._logged_storage = logged
        if kv_mount == "missing":
            log.error(
                "vault.kv_mount_missing",
                mount=self._paths.mount,
                hint="enable KV v2 there (`backpack-vault vault setup`) or set "
                "BACKPACK_VAULT_KV_MOUNT",
            )
        if policy == "missing":
            log.error("vault.policy_missing", missing=list(missing))
        if warnings:
            log.warning("vault.policy_incomplete", missing=list(warnings))

    def _relogin(self) -> None:
        try:
            info = self._vault.login()
        except ServiceError as exc:
            self._metrics.observe_renewal("login", "failed")
            self._login_failed(exc)
            log.error(  # noqa: TRY400 - the error is ours and complete; no traceback wanted
                "vault.auth_failed", addr=self.addr, error=exc.code, detail=exc.message
            )
            return
        self._metrics.observe_renewal("login", "ok")
        self._logged_in()
        log.info("vault.logged_in", addr=self.addr, method=self._auth, identity=info.identity)

    def _token_expired(self) -> bool:
        info = self._vault.token_info
        return info is None or (info.expires_at is not None and info.expires_at <= self._clock())

    def _auth_if_valid(self) -> str:
        """What a still-unexpired token means for ``auth`` while Vault cannot be asked."""
        return "failed" if self._token_expired() else OK

    def _set_state(
        self, *, vault: str | None = None, auth: str | None = None, error: str | None = None
    ) -> None:
        with self._lock:
            before = (self._vault_state, self._auth_state)
            if vault is not None:
                self._vault_state = vault
            if auth is not None:
                self._auth_state = auth
            if error is not None:
                self._error = error
            after = (self._vault_state, self._auth_state)
        reachable, authenticated = after[0] == OK, after[1] == OK
        info = self._vault.token_info
        ttl = None if info is None or info.expires_at is None else info.expires_at - self._clock()
        self._metrics.set_vault_state(
            reachable=reachable, authenticated=authenticated, token_ttl_s=ttl
        )
        if before != after:
            log.info(
                "vault.state_changed",
                vault=after[0],
                auth=after[1],
                ready=reachable and authenticated,
            )


def _unavailable(exc: VaultUnavailable) -> str:
    return "sealed" if "sealed" in exc.message else "unreachable"


class _Paths:
    """The paths the daemon uses, as sys/capabilities-self is asked about them."""

    def __init__(self, mount: str, prefix: str) -> None:
        self.mount = mount
        data = f"{mount}/data/{prefix}/main/readiness-probe"
        metadata = f"{mount}/metadata/{prefix}/main/readiness-probe"
        listing = f"{mount}/metadata/{prefix}/"
        feed = f"{mount}/data/{prefix}-changes"
        lease = f"{mount}/data/{prefix}-leader"
        keys, metas = f"{mount}/data/{prefix}/*", f"{mount}/metadata/{prefix}/*"
        # What the daemon cannot hand out a key without: ready only with all of them.
        self.required: tuple[tuple[str, str, str], ...] = (
            (data, "read", keys),
            (metadata, "read", metas),
            (listing, "list", metas),
            ("sys/wrapping/wrap", "update", "sys/wrapping/wrap"),
            ("auth/token/revoke-accessor", "update", "auth/token/revoke-accessor"),
        )
        # What a part of it needs: reported as warnings, never a reason to refuse workers.
        self.wanted: tuple[tuple[str, str, str, str], ...] = (
            (feed, "read", feed, "other replicas' status changes arrive only with the key cache"),
            (feed, "update", feed, "this replica's status changes reach others only slowly"),
            (lease, "update", lease, "this replica can never lead the checks"),
            (metadata, "patch", metas, "checks cannot write a verdict's status"),
        )
        self.all: tuple[str, ...] = tuple(
            dict.fromkeys([p for p, _, _ in self.required] + [p for p, *_ in self.wanted])
        )
