"""Settings: environment, an optional TOML file and flags -> one frozen ``Settings``.

Precedence: flags > config file > environment > defaults. This module is the
only reader of ``os.environ`` (and only through :func:`load_from_os`); every
other constructor receives its slice, e.g. ``Vault(settings.vault)``.

Each setting has one row in :data:`FIELDS`: its name (also its key in the
config file), its environment variable, its type and its default.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from backpack_vault.errors import ConfigError

__all__ = [
    "FIELDS",
    "BrokerSettings",
    "CheckSettings",
    "Secret",
    "Settings",
    "VaultSettings",
    "load",
    "load_from_os",
]


class Secret:
    """A string that never shows itself in a repr, a log line or an f-string."""

    __slots__ = ("_derived", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._derived: tuple[Callable[[str], str], str] | None = None

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def reveal(self) -> str:
        return self._value

    def derived(self, derive: Callable[[str], str]) -> str:
        """``derive(value)``, worked out once per Secret for the function last asked: the
        daemon's keyed hash of a worker's token, asked several times for one request."""
        memo = self._derived
        if memo is not None and memo[0] is derive:
            return memo[1]
        result = derive(self._value)
        self._derived = (derive, result)
        return result


AUTH_METHODS: Final = ("token", "token-file", "approle", "kubernetes")
LOG_FORMATS: Final = ("json", "console")


@dataclass(frozen=True, slots=True)
class VaultSettings:
    addr: str = "http://127.0.0.1:8200"
    token: Secret | None = None
    cacert: str | None = None
    namespace: str | None = None
    auth: str = "token"
    token_file: str | None = None
    auth_mount: str | None = None
    approle_role_id: str | None = None
    approle_secret_id: Secret | None = None
    approle_secret_id_file: str | None = None
    kubernetes_role: str | None = None
    kubernetes_jwt_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    kv_mount: str = "secret"
    kv_prefix: str = "backpack"
    grant_prefix: str = "backpack-broker"
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    copy_ttl: int = 900
    wrap_ttl: int = 60
    max_wrap_ttl: int = 300
    decision_cache_s: float = 2.0
    secret_cache_s: float = 5.0


@dataclass(frozen=True, slots=True)
class CheckSettings:
    backpack_url: str = "https://api.backpack.exchange"
    interval: float = 300.0
    jitter: float = 0.1
    concurrency: int = 8
    subaccount_budget_per_minute: int = 120
    webhook_url: Secret | None = None  # chat webhooks carry a token in the URL
    alert_format: str = "json"  # json, slack or alertmanager
    timeout: float = 10.0
    lease_ttl: float = 30.0


@dataclass(frozen=True, slots=True)
class Settings:
    vault: VaultSettings
    broker: BrokerSettings
    checks: CheckSettings
    listen: str = "127.0.0.1:8280"
    log_format: str = "json"
    log_level: str = "info"
    tls_cert: str | None = None  # PEM files; the worker API serves HTTPS when both are set
    tls_key: str | None = None

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


def _listen(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:  # noqa: PLR2004
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8280")
    return text


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return text.rstrip("/")


def _text(text: str) -> str:
    return text


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    env: str | None
    parse: Callable[[str], Any]
    section: str  # "vault", "broker", "checks" or "" for the top level
    attr: str
    secret: bool = False


FIELDS: Final[tuple[Field, ...]] = (
    Field("listen", "BACKPACK_VAULT_LISTEN", _listen, "", "listen"),
    Field("log_format", "BACKPACK_VAULT_LOG_FORMAT", _choice(*LOG_FORMATS), "", "log_format"),
    Field(
        "log_level",
        "BACKPACK_VAULT_LOG_LEVEL",
        _choice("debug", "info", "warning", "error"),
        "",
        "log_level",
    ),
    Field("tls_cert", "BACKPACK_VAULT_TLS_CERT", _text, "", "tls_cert"),
    Field("tls_key", "BACKPACK_VAULT_TLS_KEY", _text, "", "tls_key"),
    Field("vault_addr", "VAULT_ADDR", _url, "vault", "addr"),
    Field("vault_token", "VAULT_TOKEN", _text, "vault", "token", secret=True),
    Field("vault_cacert", "VAULT_CACERT", _text, "vault", "cacert"),
    Field("vault_namespace", "VAULT_NAMESPACE", _text, "vault", "namespace"),
    Field("auth", "BACKPACK_VAULT_AUTH", _choice(*AUTH_METHODS), "vault", "auth"),
    Field("token_file", "BACKPACK_VAULT_TOKEN_FILE", _text, "vault", "token_file"),
    Field("auth_mount", "BACKPACK_VAULT_AUTH_MOUNT", _text, "vault", "auth_mount"),
    Field("approle_role_id", "BACKPACK_VAULT_APPROLE_ROLE_ID", _text, "vault", "approle_role_id"),
    Field(
        "approle_secret_id",
        "BACKPACK_VAULT_APPROLE_SECRET_ID",
        _text,
        "vault",
        "approle_secret_id",
        secret=True,
    ),
    Field(
        "approle_secret_id_file",
        "BACKPACK_VAULT_APPROLE_SECRET_ID_FILE",
        _text,
        "vault",
        "approle_secret_id_file",
    ),
    Field("kubernetes_role", "BACKPACK_VAULT_KUBERNETES_ROLE", _text, "vault", "kubernetes_role"),
    Field(
        "kubernetes_jwt_file",
        "BACKPACK_VAULT_KUBERNETES_JWT_FILE",
        _text,
        "vault",
        "kubernetes_jwt_file",
    ),
    Field("kv_mount", "BACKPACK_VAULT_KV_MOUNT", _text, "vault", "kv_mount"),
    Field("kv_prefix", "BACKPACK_VAULT_KV_PREFIX", _text, "vault", "kv_prefix"),
    Field("grant_prefix", "BACKPACK_VAULT_GRANT_PREFIX", _text, "vault", "grant_prefix"),
    Field("vault_timeout", "BACKPACK_VAULT_VAULT_TIMEOUT", _positive_float, "vault", "timeout"),
    Field("copy_ttl", "BACKPACK_VAULT_COPY_TTL", _positive_int, "broker", "copy_ttl"),
    Field("wrap_ttl", "BACKPACK_VAULT_WRAP_TTL", _positive_int, "broker", "wrap_ttl"),
    Field("max_wrap_ttl", "BACKPACK_VAULT_MAX_WRAP_TTL", _positive_int, "broker", "max_wrap_ttl"),
    Field("backpack_url", "BACKPACK_VAULT_BACKPACK_URL", _url, "checks", "backpack_url"),
    Field("check_interval", "BACKPACK_VAULT_CHECK_INTERVAL", _positive_float, "checks", "interval"),
    Field("check_timeout", "BACKPACK_VAULT_CHECK_TIMEOUT", _positive_float, "checks", "timeout"),
    Field(
        "check_concurrency",
        "BACKPACK_VAULT_CHECK_CONCURRENCY",
        _positive_int,
        "checks",
        "concurrency",
    ),
    Field(
        "subaccount_budget",
        "BACKPACK_VAULT_SUBACCOUNT_BUDGET",
        _positive_int,
        "checks",
        "subaccount_budget_per_minute",
    ),
    Field("lease_ttl", "BACKPACK_VAULT_LEASE_TTL", _positive_float, "checks", "lease_ttl"),
    Field("webhook_url", "BACKPACK_VAULT_WEBHOOK_URL", _url, "checks", "webhook_url", secret=True),
    Field(
        "alert_format",
        "BACKPACK_VAULT_ALERT_FORMAT",
        _choice("json", "slack", "alertmanager"),
        "checks",
        "alert_format",
    ),
)
_BY_NAME: Final = {f.name: f for f in FIELDS}


def _read_file(path: Path) -> dict[str, object]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    unknown = sorted(set(data) - set(_BY_NAME))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_BY_NAME))}"
        )
    return data


def _merge(
    environ: Mapping[str, str], file: Path | None, flags: Mapping[str, object | None]
) -> dict[str, object]:
    raw: dict[str, object] = {
        f.name: environ[f.env] for f in FIELDS if f.env and environ.get(f.env)
    }
    config_path = file or (
        Path(environ["BACKPACK_VAULT_CONFIG"]) if environ.get("BACKPACK_VAULT_CONFIG") else None
    )
    if config_path is not None:
        raw.update(_read_file(config_path))
    unknown = sorted(set(flags) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
    raw.update({name: value for name, value in flags.items() if value is not None})
    return raw


def load(
    environ: Mapping[str, str],
    file: Path | None = None,
    flags: Mapping[str, object | None] | None = None,
    *,
    tty: bool = False,
) -> Settings:
    """Build Settings from the three sources; flags win over the file, the file over env."""
    raw = _merge(environ, file, flags or {})
    raw.setdefault("log_format", "console" if tty else "json")
    sections: dict[str, dict[str, object]] = {"": {}, "vault": {}, "broker": {}, "checks": {}}
    for name, value in raw.items():
        f = _BY_NAME[name]
        try:
            parsed = f.parse(str(value))
        except ValueError as exc:
            shown = "(hidden)" if f.secret else repr(value)
            where = f.env or name
            raise ConfigError(f"setting {name} ({where}) = {shown} is not valid: {exc}") from None
        sections[f.section][f.attr] = Secret(parsed) if f.secret else parsed

    broker = BrokerSettings(**sections["broker"])  # type: ignore[arg-type]
    if broker.wrap_ttl > broker.max_wrap_ttl:
        raise ConfigError(
            f"wrap_ttl {broker.wrap_ttl}s exceeds max_wrap_ttl {broker.max_wrap_ttl}s"
        )
    if ("tls_cert" in sections[""]) != ("tls_key" in sections[""]):
        raise ConfigError(
            "TLS needs both BACKPACK_VAULT_TLS_CERT and BACKPACK_VAULT_TLS_KEY "
            "(serve --tls-cert and --tls-key), or neither"
        )
    return Settings(
        vault=VaultSettings(**sections["vault"]),  # type: ignore[arg-type]
        broker=broker,
        checks=CheckSettings(**sections["checks"]),  # type: ignore[arg-type]
        **sections[""],  # type: ignore[arg-type]
    )


def load_from_os(
    file: Path | None = None, flags: Mapping[str, object | None] | None = None
) -> Settings:
    """The process-level entry: read os.environ once, at the edge."""
    return load(os.environ, file, flags, tty=sys.stderr.isatty())


def environ_snapshot() -> dict[str, str]:
    """A copy of the process environment, for the few places that pass it on (child processes)."""
    return dict(os.environ)


def read_secret_file(
    path: str | Path | None, what: str, *, error: type[Exception] = ConfigError
) -> Secret:
    """The stripped contents of a file holding one secret (a token, a secret-id, a JWT, a key).

    ``what`` names the setting or flag in the message; ``error`` is raised (default
    ``ConfigError``) when the path is unset, unreadable or the file is empty. Read on
    every call: Vault Agent and Kubernetes rewrite such files in place.
    """
    if not path:
        raise error(f"{what} is not set")
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise error(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not value:
        raise error(f"{what}: {path} is empty")
    return Secret(value)
