"""The worker's own Vault login, as Vault Agent's auto-auth does it: log in, renew, log in again.

::

    auth = VaultAuth.approle(role_id_file="/etc/bot/role-id", secret_id_file="/etc/bot/secret-id")
    broker = BrokerClient(url, vault_addr=addr, auth=auth)   # or BrokerClient.from_env()

Methods: a static token (``token``), a file another process keeps fresh
(``token-file``, read on every use), AppRole and Kubernetes. A token from a
login is renewed (``auth/token/renew-self``) at two thirds of its TTL; when the
renewal fails, when its max TTL is near, or when the daemon says the token is
dead, it logs in again, with backoff (0.5 s doubling to 30 s) between failed
attempts. A static token is looked up once (``lookup-self``): a renewable one is
renewed at two thirds of its TTL like any other; one that cannot be renewed (or
whose renewals reach its max TTL) is used until it expires, with one warning on
the ``backpack_vault.client`` logger when a third of its TTL is left. A dead
static token is only reported (NotAuthenticated): there is no way to get another.

Renewal does not wait for the bot to use the token: a background thread (a task,
for :class:`AsyncVaultLogin`) wakes when something is due, as Vault Agent's
lifetime watcher does, so a bot idle for longer than its token's TTL still finds
it valid. Each use also renews or logs in when due, so a renewal is never missed.

The steps are pure (:class:`LoginState` decides, :func:`login_request` and
:func:`parse_login` build and read Vault's HTTP API); :class:`VaultLogin` drives
them with an ``httpx.Client`` under a lock, :class:`AsyncVaultLogin` with an
``httpx.AsyncClient``.

Environment (:meth:`VaultAuth.from_env`):

==========================================  ===================================================
``BACKPACK_VAULT_WORKER_AUTH``              ``token`` (default when ``VAULT_TOKEN`` is set),
                                            ``token-file``, ``approle``, ``kubernetes``
``VAULT_TOKEN``                             the static token
``BACKPACK_VAULT_WORKER_TOKEN_FILE``        the token file (Vault Agent's sink)
``BACKPACK_VAULT_WORKER_ROLE_ID(_FILE)``    AppRole role-id, or a file holding it
``BACKPACK_VAULT_WORKER_SECRET_ID(_FILE)``  AppRole secret-id, or a file holding it
``BACKPACK_VAULT_WORKER_APPROLE_MOUNT``     default ``approle``
``BACKPACK_VAULT_WORKER_K8S_ROLE``          the Kubernetes auth role
``BACKPACK_VAULT_WORKER_JWT_FILE``          default the service-account token path
``BACKPACK_VAULT_WORKER_K8S_MOUNT``         default ``kubernetes``
==========================================  ===================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, Literal

import httpx

from backpack_vault.config import Secret, read_secret_file
from backpack_vault.errors import BrokerUnavailable, ConfigError, NotAuthenticated

__all__ = [
    "BACKOFF_S",
    "DEFAULT_JWT_FILE",
    "RENEW_FRACTION",
    "AsyncVaultLogin",
    "Lease",
    "LoginState",
    "VaultAuth",
    "VaultLogin",
]

Method = Literal["token", "token-file", "approle", "kubernetes"]
METHODS: Final = ("token", "token-file", "approle", "kubernetes")
RENEW_FRACTION: Final = 2 / 3
BACKOFF_S: Final = (0.5, 30.0)  # the first wait after a failed login, and the cap
DEFAULT_JWT_FILE: Final = "/var/run/secrets/kubernetes.io/serviceaccount/token"
_MIN_WAKE_S: Final = 0.1  # a background renewal never spins faster than this
_JOIN_S: Final = 2.0

# The client's one logger is the standard library's: a bot configures it as it likes.
log = logging.getLogger("backpack_vault.client")


@dataclass(frozen=True, slots=True)
class VaultAuth:
    """How the worker logs in to Vault; build one with the class methods."""

    method: Method
    token_value: Secret | None = None
    path: Path | None = None  # the token file or the JWT file
    role_id: Secret | None = None
    role_id_file: Path | None = None
    secret_id: Secret | None = None
    secret_id_file: Path | None = None
    role: str = ""
    mount: str = ""

    @classmethod
    def token(cls, token: str | Secret) -> VaultAuth:
        """A static token: used as it is, reported when Vault stops accepting it."""
        return cls("token", token_value=Secret(token) if isinstance(token, str) else token)

    @classmethod
    def token_file(cls, path: str | Path) -> VaultAuth:
        """A file someone else keeps fresh (Vault Agent's sink): read on every use."""
        return cls("token-file", path=Path(path))

    @classmethod
    def approle(
        cls,
        *,
        role_id: str | Secret | None = None,
        role_id_file: str | Path | None = None,
        secret_id: str | Secret | None = None,
        secret_id_file: str | Path | None = None,
        mount: str = "approle",
    ) -> VaultAuth:
        """AppRole: role-id and secret-id as values or files (files are read at each login)."""
        if role_id is None and role_id_file is None:
            raise ConfigError("AppRole login needs a role-id or a role-id file")
        if secret_id is None and secret_id_file is None:
            raise ConfigError("AppRole login needs a secret-id or a secret-id file")
        return cls(
            "approle",
            role_id=Secret(role_id) if isinstance(role_id, str) else role_id,
            role_id_file=Path(role_id_file) if role_id_file else None,
            secret_id=Secret(secret_id) if isinstance(secret_id, str) else secret_id,
            secret_id_file=Path(secret_id_file) if secret_id_file else None,
            mount=mount,
        )

    @classmethod
    def kubernetes(
        cls, *, role: str, jwt_file: str | Path = DEFAULT_JWT_FILE, mount: str = "kubernetes"
    ) -> VaultAuth:
        """Kubernetes: the pod's service-account JWT (re-read at each login) and a role."""
        if not role:
            raise ConfigError("Kubernetes login needs a role")
        return cls("kubernetes", path=Path(jwt_file), role=role, mount=mount)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> VaultAuth:
        """The worker's auth from the ``BACKPACK_VAULT_WORKER_*`` variables (module docstring)."""
        method = environ.get("BACKPACK_VAULT_WORKER_AUTH", "").strip() or (
            "token-file" if environ.get("BACKPACK_VAULT_WORKER_TOKEN_FILE") else "token"
        )
        if method == "token":
            token = environ.get("VAULT_TOKEN", "").strip()
            if not token:
                raise ConfigError(
                    "no Vault login for the worker: set VAULT_TOKEN, or BACKPACK_VAULT_WORKER_AUTH "
                    "(token-file, approle, kubernetes) and its variables"
                )
            return cls.token(token)
        if method == "token-file":
            path = environ.get("BACKPACK_VAULT_WORKER_TOKEN_FILE", "").strip()
            if not path:
                raise ConfigError("BACKPACK_VAULT_WORKER_TOKEN_FILE is not set")
            return cls.token_file(path)
        if method == "approle":
            return cls.approle(
                role_id=environ.get("BACKPACK_VAULT_WORKER_ROLE_ID") or None,
                role_id_file=environ.get("BACKPACK_VAULT_WORKER_ROLE_ID_FILE") or None,
                secret_id=environ.get("BACKPACK_VAULT_WORKER_SECRET_ID") or None,
                secret_id_file=environ.get("BACKPACK_VAULT_WORKER_SECRET_ID_FILE") or None,
                mount=environ.get("BACKPACK_VAULT_WORKER_APPROLE_MOUNT") or "approle",
            )
        if method == "kubernetes":
            return cls.kubernetes(
                role=environ.get("BACKPACK_VAULT_WORKER_K8S_ROLE", "").strip(),
                jwt_file=environ.get("BACKPACK_VAULT_WORKER_JWT_FILE") or DEFAULT_JWT_FILE,
                mount=environ.get("BACKPACK_VAULT_WORKER_K8S_MOUNT") or "kubernetes",
            )
        raise ConfigError(
            f"BACKPACK_VAULT_WORKER_AUTH must be one of {', '.join(METHODS)}, not {method!r}"
        )

    @property
    def logs_in(self) -> bool:
        """Whether this method gets its token by logging in (and so can get another)."""
        return self.method in ("approle", "kubernetes")


def _value(value: Secret | None, path: Path | None, what: str) -> Secret:
    if value is not None:
        return value
    return read_secret_file(path, what, error=NotAuthenticated)


# -- the pure steps --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """A token from a login or a renewal: its TTL in seconds (0: never expires)."""

    token: Secret
    ttl_s: float
    renewable: bool


def login_request(auth: VaultAuth, vault_addr: str) -> tuple[str, dict[str, str]]:
    """The URL and JSON body of a login (secret files are read here, each time)."""
    if auth.method == "approle":
        body = {
            "role_id": _value(auth.role_id, auth.role_id_file, "the AppRole role-id").reveal(),
            "secret_id": _value(
                auth.secret_id, auth.secret_id_file, "the AppRole secret-id"
            ).reveal(),
        }
    elif auth.method == "kubernetes":
        jwt = read_secret_file(auth.path, "the Kubernetes service-account token")
        body = {"role": auth.role, "jwt": jwt.reveal()}
    else:  # pragma: no cover - only login methods get here
        raise ConfigError(f"{auth.method} does not log in")
    return f"{vault_addr}/v1/auth/{auth.mount}/login", body


def parse_login(response: httpx.Response, what: str) -> Lease:
    """The lease in a login or renew-self answer; our error for a refusal (never its body)."""
    status = response.status_code
    if status in (HTTPStatus.BAD_REQUEST, HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        raise NotAuthenticated(f"Vault refused the worker's {what} ({status})")
    if status != HTTPStatus.OK:
        raise BrokerUnavailable(f"Vault answered {status} to the worker's {what}")
    try:
        auth: Any = response.json()["auth"]
        return Lease(
            Secret(str(auth["client_token"])),
            float(auth.get("lease_duration") or 0),
            bool(auth.get("renewable")),
        )
    except (ValueError, KeyError, TypeError):
        raise BrokerUnavailable(f"Vault's answer to the worker's {what} holds no token") from None


def unreachable(vault_addr: str, exc: Exception) -> BrokerUnavailable:
    return BrokerUnavailable(f"Vault at {vault_addr} is unreachable: {type(exc).__name__}")


def parse_lookup(response: httpx.Response) -> tuple[float, bool, float] | None:
    """A token's own TTL from ``lookup-self``: (TTL left, renewable, TTL at creation);
    None when Vault will not say (a dead token, or one that may not look itself up)."""
    status = response.status_code
    if status in (HTTPStatus.BAD_REQUEST, HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        return None
    if status != HTTPStatus.OK:
        raise BrokerUnavailable(f"Vault answered {status} to the worker's token lookup")
    try:
        data: Any = response.json()["data"]
        ttl = float(data.get("ttl") or 0)
        return ttl, bool(data.get("renewable")), float(data.get("creation_ttl") or ttl)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BrokerUnavailable(
            "Vault's answer to the worker's token lookup is unreadable"
        ) from None


Step = Literal["login", "renew", "lookup"]


class LoginState:
    """What to do next with the worker's token; pure (``now`` is passed), not locked.

    ``next_step(now)`` is ``"login"``, ``"renew"``, ``"lookup"`` (a static token's TTL,
    asked of Vault once) or None (use :attr:`token`); :meth:`wake_at` says when one
    is next due, which is when a background renewal wakes up.
    """

    def __init__(self, auth: VaultAuth, *, backoff_s: tuple[float, float] = BACKOFF_S) -> None:
        self.auth = auth
        self._backoff_s = backoff_s
        static = auth.token_value if auth.method == "token" else None
        self._lease: Lease | None = Lease(static, 0.0, renewable=False) if static else None
        self._lookup_due = static is not None
        self._obtained = 0.0
        self._first_ttl = 0.0
        self._renew_ok = False
        self._retry_at = float("-inf")
        self._delay = backoff_s[0]
        self._error: Exception | None = None
        self._warned = False
        self.logins = 0
        self.renewals = 0

    @property
    def token(self) -> Secret | None:
        return self._lease.token if self._lease is not None else None

    def _renew_at(self, lease: Lease) -> float:
        return self._obtained + lease.ttl_s * RENEW_FRACTION

    def next_step(self, now: float) -> Step | None:
        lease = self._lease
        if lease is None:
            return "login"
        if self._lookup_due:
            return "lookup" if now >= self._retry_at else None
        if lease.ttl_s <= 0 or now < self._renew_at(lease):
            return None
        if self._renew_ok:
            # A static token that failed to renew (Vault unreachable) waits out its backoff.
            return "renew" if self.auth.logs_in or now >= self._retry_at else None
        return "login" if self.auth.logs_in else None

    def wake_at(self) -> float:
        """When :meth:`next_step` (or the expiry warning) is next due, on the clock's
        scale; ``-inf`` for now, ``inf`` for never."""
        lease = self._lease
        if lease is None or self._lookup_due:
            return self._retry_at
        if lease.ttl_s <= 0:
            return math.inf
        if self.auth.logs_in or self._renew_ok:
            return max(self._renew_at(lease), self._retry_at)
        return math.inf if self._warned else self._renew_at(lease)

    def check_backoff(self, now: float) -> None:
        """Raise the last failure again while the backoff after it lasts."""
        if self._error is not None and now < self._retry_at:
            raise self._error

    def _back_off(self, now: float) -> None:
        self._retry_at = now + self._delay
        self._delay = min(self._delay * 2, self._backoff_s[1])

    def logged_in(self, lease: Lease, now: float) -> None:
        self._lease, self._obtained, self._first_ttl = lease, now, lease.ttl_s
        self._renew_ok = lease.renewable
        self._error, self._delay, self._warned = None, self._backoff_s[0], False
        self.logins += 1

    def looked_up(self, found: tuple[float, bool, float] | None, now: float) -> None:
        """A static token's TTL as Vault said; None: it would not say, so none is watched."""
        self._lookup_due = False
        self._delay = self._backoff_s[0]
        if found is None or self._lease is None:
            return
        ttl, renewable, first_ttl = found
        self._lease = Lease(self._lease.token, ttl, renewable)
        self._obtained, self._first_ttl, self._renew_ok = now, first_ttl or ttl, renewable

    def lookup_failed(self, now: float) -> None:
        """Vault could not be asked: the token is used as it is, and asked about later."""
        self._back_off(now)

    def renewed(self, lease: Lease, now: float) -> None:
        # A renewal capped by the max TTL is not an error: once less than a third of the
        # first TTL is granted, the next step is a fresh login (or, for a static token,
        # the warning that it will expire).
        self._lease = Lease(
            self._lease.token if self._lease else lease.token, lease.ttl_s, renewable=True
        )
        self._obtained = now
        self._renew_ok = lease.renewable and lease.ttl_s >= self._first_ttl / 3
        self._retry_at, self._delay = float("-inf"), self._backoff_s[0]
        self.renewals += 1

    def renew_failed(self, now: float, *, refused: bool = True) -> None:
        """A login's token is replaced by a fresh login at once. A static token is
        renewed again after a backoff when Vault could not be reached, and never again
        when Vault refused (it will say when the token is about to expire)."""
        if self.auth.logs_in:
            self._renew_ok = False
            if self._lease is not None:
                self._lease = Lease(self._lease.token, 0.001, renewable=False)  # due: log in
                self._obtained = float("-inf")
        elif refused:
            self._renew_ok = False
        else:
            self._back_off(now)

    def failed(self, exc: Exception, now: float) -> None:
        self._error = exc
        self._back_off(now)

    def expiry_warning(self, now: float) -> float | None:
        """Once, when a token that can be neither renewed nor replaced has a third of its
        TTL left: the seconds left (someone must give the worker a new token)."""
        lease = self._lease
        if self.auth.logs_in or self._warned or self._lookup_due or lease is None:
            return None
        if lease.ttl_s <= 0 or self._renew_ok or now < self._renew_at(lease):
            return None
        self._warned = True
        return max(self._obtained + lease.ttl_s - now, 0.0)

    def dead(self, token: Secret) -> bool:
        """The daemon says ``token`` is dead: forget it; True when a login may bring another."""
        if not self.auth.logs_in:
            return False
        if self._lease is not None and self._lease.token == token:
            self._lease = None
        return True


def _renew_url(vault_addr: str) -> str:
    return f"{vault_addr}/v1/auth/token/renew-self"


def _lookup_url(vault_addr: str) -> str:
    return f"{vault_addr}/v1/auth/token/lookup-self"


def _alive(response: httpx.Response) -> bool:
    return response.status_code not in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN)


class _Login:
    """The shared flow: a generator that yields Vault requests and receives the answers
    (as ``httpx.Auth.auth_flow`` does), driven by a sync or an async client."""

    def __init__(
        self,
        auth: VaultAuth,
        vault_addr: str,
        *,
        clock: Callable[[], float],
        backoff_s: tuple[float, float],
        background: bool,
    ) -> None:
        self.auth = auth
        self.vault_addr = vault_addr.rstrip("/")
        self.state = LoginState(auth, backoff_s=backoff_s)
        self._clock = clock
        self._background = background

    def _quick(self) -> Secret | None:
        """The token when nothing is due: no lock, no round trip (the common case)."""
        if self.auth.method == "token-file":
            # Read each time: Vault Agent rewrites the file when it renews or logs in again.
            return read_secret_file(self.auth.path, "the token file", error=NotAuthenticated)
        token = self.state.token
        if token is not None and self._clock() < self.state.wake_at():
            return token
        return None

    def _wakes(self) -> bool:
        """Whether a background renewal has something to wait for."""
        return self._background and not math.isinf(self.state.wake_at())

    def _flow(self) -> Generator[httpx.Request, httpx.Response | Exception, Secret]:
        """Under the caller's lock: look up, renew or log in as due; the token to use."""
        state, now = self.state, self._clock()
        step = state.next_step(now)
        if step == "lookup":
            yield from self._look_up(now)
            step = state.next_step(now)
        if step == "renew":
            yield from self._renew(now)
            step = state.next_step(now)
        if step == "login":
            yield from self._log_in(now)
        left = state.expiry_warning(now)
        if left is not None:
            log.warning(
                "backpack_vault: the worker's Vault token expires in %.0f s and cannot be "
                "renewed; give the worker a new token, or let it log in by itself "
                "(token-file, AppRole or Kubernetes auth)",
                left,
            )
        token = state.token
        if token is None:  # pragma: no cover - logged_in always sets one
            raise NotAuthenticated("no Vault token")
        return token

    def _look_up(self, now: float) -> Generator[httpx.Request, httpx.Response | Exception, None]:
        state = self.state
        if state.token is None:  # pragma: no cover - only a static token is looked up
            return
        answer = yield self._lookup(state.token)
        try:
            if isinstance(answer, Exception):
                raise answer
            found = parse_lookup(answer)
        except (BrokerUnavailable, httpx.HTTPError):
            state.lookup_failed(now)
        else:
            state.looked_up(found, now)

    def _renew(self, now: float) -> Generator[httpx.Request, httpx.Response | Exception, None]:
        state = self.state
        if state.token is None:  # pragma: no cover - a renewal is due only with a token
            return
        answer = yield httpx.Request(
            "POST", _renew_url(self.vault_addr), headers={"X-Vault-Token": state.token.reveal()}
        )
        try:
            if isinstance(answer, Exception):
                raise answer
            state.renewed(parse_login(answer, "token renewal"), now)
        except NotAuthenticated:
            state.renew_failed(now, refused=True)
        except (BrokerUnavailable, httpx.HTTPError):
            state.renew_failed(now, refused=False)

    def _log_in(self, now: float) -> Generator[httpx.Request, httpx.Response | Exception, None]:
        state = self.state
        state.check_backoff(now)
        try:
            url, body = login_request(self.auth, self.vault_addr)
            answer = yield httpx.Request("POST", url, json=body)
            if isinstance(answer, Exception):
                raise unreachable(self.vault_addr, answer)
            state.logged_in(parse_login(answer, f"{self.auth.method} login"), now)
        except (NotAuthenticated, BrokerUnavailable, ConfigError) as exc:
            state.failed(exc, now)
            raise

    def _lookup(self, token: Secret) -> httpx.Request:
        return httpx.Request(
            "GET", _lookup_url(self.vault_addr), headers={"X-Vault-Token": token.reveal()}
        )


class VaultLogin(_Login):
    """The worker's token over a blocking ``httpx.Client``; thread-safe.

    With ``background`` (the default) a daemon thread renews the token at two thirds
    of its TTL, or logs in again, whether or not the bot uses it meanwhile, as Vault
    Agent's lifetime watcher does; :meth:`close` ends it.
    """

    def __init__(
        self,
        auth: VaultAuth,
        vault_addr: str,
        http: httpx.Client,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff_s: tuple[float, float] = BACKOFF_S,
        background: bool = True,
    ) -> None:
        super().__init__(auth, vault_addr, clock=clock, backoff_s=backoff_s, background=background)
        self._http = http
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        weakref.finalize(self, self._stop.set)  # a login nobody holds stops renewing

    def token(self) -> Secret:
        """The token to send now: looked up, renewed, logged in or read as needed."""
        quick = self._quick()
        if quick is not None:
            return quick
        with self._lock:
            flow = self._flow()
            try:
                request = next(flow)
                while True:
                    answer: httpx.Response | Exception
                    try:
                        answer = self._http.send(request)
                    except httpx.HTTPError as exc:
                        answer = exc
                    except RuntimeError as exc:  # the httpx client was closed
                        answer = httpx.TransportError(str(exc))
                    request = flow.send(answer)
            except StopIteration as done:
                token: Secret = done.value
            self._keep_renewing()
        return token

    def _keep_renewing(self) -> None:
        """Under the lock: once there is a TTL to watch, a thread renews ahead of use."""
        if not self._wakes() or self._stop.is_set():
            return
        if self._renewer is not None and self._renewer.is_alive():
            return
        self._renewer = threading.Thread(
            target=_renew_ahead,
            args=(weakref.ref(self), self._stop),
            name="backpack-vault-login",
            daemon=True,
        )
        self._renewer.start()

    def close(self) -> None:
        """Stop renewing in the background (the token itself stays valid)."""
        self._stop.set()
        renewer = self._renewer
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(_JOIN_S)

    def dead(self, token: Secret) -> bool:
        """The daemon refused ``token``; True when the next :meth:`token` may be another."""
        with self._lock:
            return self.state.dead(token)

    def is_alive(self, token: Secret) -> bool:
        """Ask Vault (``lookup-self``) whether ``token`` still works; True if unsure."""
        try:
            return _alive(self._http.send(self._lookup(token)))
        except httpx.HTTPError:
            return True


def _renew_ahead(login_ref: weakref.ref[VaultLogin], stop: threading.Event) -> None:
    """The renewal thread: sleep until something is due, then do it (failures back off)."""
    while not stop.is_set():
        login = login_ref()
        if login is None or not login._wakes():  # noqa: SLF001 - its own thread
            return
        delay = login.state.wake_at() - login._clock()  # noqa: SLF001
        del login
        if stop.wait(max(delay, _MIN_WAKE_S)):
            return
        login = login_ref()
        if login is None:
            return
        with contextlib.suppress(Exception):  # raised again by the bot's next use
            login.token()
        del login


class AsyncVaultLogin(_Login):
    """The worker's token over an ``httpx.AsyncClient``; safe across tasks of one loop.

    With ``background`` a task renews ahead of use (:meth:`aclose` cancels it).
    """

    def __init__(
        self,
        auth: VaultAuth,
        vault_addr: str,
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff_s: tuple[float, float] = BACKOFF_S,
        background: bool = True,
    ) -> None:
        super().__init__(auth, vault_addr, clock=clock, backoff_s=backoff_s, background=background)
        self._http = http
        self._lock = asyncio.Lock()
        self._closed = False
        self._renewer: asyncio.Task[None] | None = None

    async def token(self) -> Secret:
        quick = self._quick()
        if quick is not None:
            return quick
        async with self._lock:
            flow = self._flow()
            try:
                request = next(flow)
                while True:
                    answer: httpx.Response | Exception
                    try:
                        answer = await self._http.send(request)
                    except httpx.HTTPError as exc:
                        answer = exc
                    except RuntimeError as exc:  # the httpx client was closed
                        answer = httpx.TransportError(str(exc))
                    request = flow.send(answer)
            except StopIteration as done:
                token: Secret = done.value
            self._keep_renewing()
        return token

    def _keep_renewing(self) -> None:
        if not self._wakes() or self._closed:
            return
        if self._renewer is not None and not self._renewer.done():
            return
        self._renewer = asyncio.get_running_loop().create_task(
            _renew_ahead_async(weakref.ref(self)), name="backpack-vault-login"
        )

    async def aclose(self) -> None:
        """Stop renewing in the background (the token itself stays valid)."""
        self._closed = True
        renewer, self._renewer = self._renewer, None
        if renewer is not None and not renewer.done() and renewer is not asyncio.current_task():
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def dead(self, token: Secret) -> bool:
        async with self._lock:
            return self.state.dead(token)

    async def is_alive(self, token: Secret) -> bool:
        try:
            return _alive(await self._http.send(self._lookup(token)))
        except httpx.HTTPError:
            return True


async def _renew_ahead_async(login_ref: weakref.ref[AsyncVaultLogin]) -> None:
    while True:
        login = login_ref()
        if login is None or login._closed or not login._wakes():  # noqa: SLF001 - its own task
            return
        delay = login.state.wake_at() - login._clock()  # noqa: SLF001
        del login
        await asyncio.sleep(max(delay, _MIN_WAKE_S))
        login = login_ref()
        if login is None:
            return
        with contextlib.suppress(Exception):  # raised again by the bot's next use
            await login.token()
        del login


@dataclass(frozen=True, slots=True)
class ClientEnv:
    """What a client needs from the environment: the daemon, Vault, the login, the CA."""

    url: str
    vault_addr: str
    auth: VaultAuth
    verify: str | bool


def client_env(environ: Mapping[str, str], url: str | None = None) -> ClientEnv:
    """``BACKPACK_VAULT_DAEMON_URL`` (``url`` overrides), ``VAULT_ADDR``, the CA bundles
    (``BACKPACK_VAULT_DAEMON_CACERT``, else ``VAULT_CACERT``) and :meth:`VaultAuth.from_env`."""
    daemon = (url or environ.get("BACKPACK_VAULT_DAEMON_URL", "")).strip()
    if not daemon:
        raise ConfigError("BACKPACK_VAULT_DAEMON_URL is not set (the daemon's URL)")
    vault_addr = environ.get("VAULT_ADDR", "").strip()
    if not vault_addr:
        raise ConfigError("VAULT_ADDR is not set (the worker unwraps copies at Vault)")
    cacert = (
        environ.get("BACKPACK_VAULT_DAEMON_CACERT", "").strip()
        or environ.get("VAULT_CACERT", "").strip()
    )
    return ClientEnv(daemon, vault_addr, VaultAuth.from_env(environ), cacert or True)
