"""The daemon's own Vault session: login, token renewal, re-login, and the readiness it implies.

::

    login()           at start; raises (fail fast): a clear error and its exit code
    renew_token()     job: renew before expiry; log in again when renewal is refused
    refresh_health()  job: is Vault reachable and unsealed, does it still accept our token?
    readiness()       /readyz: ready while Vault is reachable and we are logged in

Every state change sets the Vault gauges and logs ``vault.state_changed`` once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from backpack_vault.errors import ServiceError, VaultUnavailable
from backpack_vault.logging import get_logger
from backpack_vault.metrics import Metrics
from backpack_vault.vault.client import Vault

__all__ = ["Session"]

log = get_logger("backpack_vault.daemon")


class Session:
    """Keeps the daemon's Vault token alive and knows whether the daemon is ready."""

    def __init__(
        self,
        vault: Vault,
        metrics: Metrics,
        *,
        auth: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._vault = vault
        self._metrics = metrics
        self._auth = auth  # the login method, for the log
        self._clock = clock
        self._lock = threading.Lock()
        self._reachable = False
        self._authenticated = False

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            reachable, authenticated = self._reachable, self._authenticated
        if not reachable:
            return False, "Vault is unreachable or sealed"
        if not authenticated:
            return False, "the daemon is not logged in to Vault"
        return True, ""

    def login(self) -> None:
        """Log in; raise our error (and mark the daemon not logged in) when Vault refuses."""
        try:
            info = self._vault.login()
        except ServiceError as exc:
            self._set_state(authenticated=False)
            log.error(  # noqa: TRY400 - the error is ours and complete; no traceback wanted
                "vault.login_failed", error=exc.code, detail=exc.message
            )
            raise
        self._set_state(reachable=True, authenticated=True)
        log.info(
            "vault.logged_in",
            method=self._auth,
            identity=info.identity,
            ttl_s=info.ttl,
            renewable=info.renewable,
        )

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
            self._set_state(reachable=False, authenticated=not self._token_expired())
            log.warning("vault.renew_failed", error=exc.code, detail=exc.message)
            return
        except ServiceError as exc:
            self._metrics.observe_renewal(kind, "failed")
            log.warning("vault.renew_failed", error=exc.code, detail=exc.message)
            self._relogin()
            return
        self._metrics.observe_renewal(kind, "ok")
        self._set_state(reachable=True, authenticated=True)
        log.info("vault.token_renewed", kind=kind, ttl_s=renewed.ttl)

    def refresh_health(self) -> None:
        """Job: is Vault reachable and unsealed, and does it still accept our token?"""
        try:
            self._vault.health()
            self._vault.probe_token()
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

    def _relogin(self) -> None:
        try:
            info = self._vault.login()
        except ServiceError as exc:
            self._metrics.observe_renewal("login", "failed")
            self._set_state(authenticated=False)
            log.error(  # noqa: TRY400 - the error is ours and complete; no traceback wanted
                "vault.auth_failed", error=exc.code, detail=exc.message
            )
            return
        self._metrics.observe_renewal("login", "ok")
        self._set_state(reachable=True, authenticated=True)
        log.info("vault.logged_in", method=self._auth, identity=info.identity)

    def _token_expired(self) -> bool:
        info = self._vault.token_info
        return info is None or (info.expires_at is not None and info.expires_at <= self._clock())

    def _set_state(
        self, *, reachable: bool | None = None, authenticated: bool | None = None
    ) -> None:
        with self._lock:
            before = (self._reachable, self._authenticated)
            if reachable is not None:
                self._reachable = reachable
            if authenticated is not None:
                self._authenticated = authenticated
            after = (self._reachable, self._authenticated)
        info = self._vault.token_info
        ttl = None if info is None or info.expires_at is None else info.expires_at - self._clock()
        self._metrics.set_vault_state(reachable=after[0], authenticated=after[1], token_ttl_s=ttl)
        if before != after:
            log.info(
                "vault.state_changed", reachable=after[0], authenticated=after[1], ready=all(after)
            )
