"""The worker's own Vault login, as Vault Agent's auto-auth does it: log in, renew, log in again.

::

    auth = VaultAuth.approle(role_id_file="/etc/bot/role-id", secret_id_file="/etc/bot/secret-id")
    broker = BrokerClient(url, vault_addr=addr, auth=auth)   # or BrokerClient.from_env()

Methods: a static token (``token``), a file another process keeps fresh
(``token-file``, read on every use), AppRole and Kubernetes. A token from a
login is renewed (``auth/token/renew-self``) at two thirds of its TTL; when the
renewal fails, when its max TTL is near, or when the daemon says the token is
dead, the next use logs in again, with backoff (0.5 s doubling to 30 s) between
failed attempts. A static token is only reported (NotAuthenticated): there is no
way to get another one.

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
import threading
import time
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


class LoginState:
    """What to do next with the worker's token; pure (``now`` is passed), not locked.

    ``next_step(now)`` is ``"login"``, ``"renew"`` or None (use :attr:`token`).
    """

    def __init__(self, auth: VaultAuth, *, backoff_s: tuple[float, float] = BACKOFF_S) -> None:
        self.auth = auth
        self._backoff_s = backoff_s
        self._lease: Lease | None = None
        self._obtained = 0.0
        self._first_ttl = 0.0
        self._renew_ok = False
        self._retry_at = float("-inf")
        self._delay = backoff_s[0]
        self._error: Exception | None = None
        self.logins = 0
        self.renewals = 0

    @property
    def token(self) -> Secret | None:
        return self._lease.token if self._lease is not None else None

    def next_step(self, now: float) -> Literal["login", "renew"] | None:
        if self._lease is None:
            return "login"
        ttl = self._lease.ttl_s
        if ttl <= 0 or now < self._obtained + ttl * RENEW_FRACTION:
            return None
        return "renew" if self._renew_ok else "login"

    def check_backoff(self, now: float) -> None:
        """Raise the last failure again while the backoff after it lasts."""
        if self._error is not None and now < self._retry_at:
            raise self._error

    def logged_in(self, lease: Lease, now: float) -> None:
        self._lease, self._obtained, self._first_ttl = lease, now, lease.ttl_s
        self._renew_ok = lease.renewable
        self._error, self._delay = None, self._backoff_s[0]
        self.logins += 1

    def renewed(self, lease: Lease, now: float) -> None:
        # A renewal capped by the max TTL is not an error: once less than a third of the
        # first TTL is granted, the next step is a fresh login.
        self._lease = Lease(
            self._lease.token if self._lease else lease.token, lease.ttl_s, renewable=True
        )
        self._obtained = now
        self._renew_ok = lease.renewable and lease.ttl_s >= self._first_ttl / 3
        self.renewals += 1

    def renew_failed(self) -> None:
        self._renew_ok = False
        if self._lease is not None:
            self._lease = Lease(self._lease.token, 0.001, renewable=False)  # due: log in now
            self._obtained = float("-inf")

    def failed(self, exc: Exception, now: float) -> None:
        self._error, self._retry_at = exc, now + self._delay
        self._delay = min(self._delay * 2, self._backoff_s[1])

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
    ) -> None:
        self.auth = auth
        self.vault_addr = vault_addr.rstrip("/")
        self.state = LoginState(auth, backoff_s=backoff_s)
        self._clock = clock

    def _static(self) -> Secret | None:
        if self.auth.method == "token":
            return self.auth.token_value
        if self.auth.method == "token-file":
            # Read each time: Vault Agent rewrites the file when it renews or logs in again.
            return read_secret_file(self.auth.path, "the token file", error=NotAuthenticated)
        return None

    def _flow(self) -> Generator[httpx.Request, httpx.Response | Exception, Secret]:
        """Under the caller's lock: renew or log in as due; returns the token to use."""
        state, now = self.state, self._clock()
        step = state.next_step(now)
        if step == "renew" and state.token is not None:
            answer = yield httpx.Request(
                "POST", _renew_url(self.vault_addr), headers={"X-Vault-Token": state.token.reveal()}
            )
            try:
                if isinstance(answer, Exception):
                    raise answer
                state.renewed(parse_login(answer, "token renewal"), now)
            except (NotAuthenticated, BrokerUnavailable, httpx.HTTPError):
                state.renew_failed()
            step = state.next_step(now)
        if step == "login":
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
        token = state.token
        if token is None:  # pragma: no cover - logged_in always sets one
            raise NotAuthenticated("no Vault token")
        return token

    def _lookup(self, token: Secret) -> httpx.Request:
        return httpx.Request(
            "GET", _lookup_url(self.vault_addr), headers={"X-Vault-Token": token.reveal()}
        )


class VaultLogin(_Login):
    """The worker's token over a blocking ``httpx.Client``; thread-safe."""

    def __init__(
        self,
        auth: VaultAuth,
        vault_addr: str,
        http: httpx.Client,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff_s: tuple[float, float] = BACKOFF_S,
    ) -> None:
        super().__init__(auth, vault_addr, clock=clock, backoff_s=backoff_s)
        self._http = http
        self._lock = threading.Lock()

    def token(self) -> Secret:
        """The token to send now: logged in, renewed or read from its file as needed."""
        static = self._static()
        if static is not None:
            return static
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
                    request = flow.send(answer)
            except StopIteration as done:
                token: Secret = done.value
                return token

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


class AsyncVaultLogin(_Login):
    """The worker's token over an ``httpx.AsyncClient``; safe across tasks of one loop."""

    def __init__(
        self,
        auth: VaultAuth,
        vault_addr: str,
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff_s: tuple[float, float] = BACKOFF_S,
    ) -> None:
        super().__init__(auth, vault_addr, clock=clock, backoff_s=backoff_s)
        self._http = http
        self._lock = asyncio.Lock()

    async def token(self) -> Secret:
        static = self._static()
        if static is not None:
            return static
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
                    request = flow.send(answer)
            except StopIteration as done:
                token: Secret = done.value
                return token

    async def dead(self, token: Secret) -> bool:
        async with self._lock:
            return self.state.dead(token)

    async def is_alive(self, token: Secret) -> bool:
        try:
            return _alive(await self._http.send(self._lookup(token)))
        except httpx.HTTPError:
            return True


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
