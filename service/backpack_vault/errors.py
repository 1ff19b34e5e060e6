"""Every error backpack-vault raises, grouped by who is at fault.

::

    ServiceError                        500  exit 1   a bug or an unexpected state: ours
    +- ConfigError                           exit 2   the operator fixes settings or flags
    +- CallerError                      400  exit 3   whoever called must change the request
    |  +- InvalidInput                  422  exit 3   malformed key name, key material, body
    |  +- NotAuthenticated              401  exit 4   missing, expired or unknown Vault token
    |  +- NotPermitted(key, grant)      403  exit 4   Vault policy denies the grant path
    |  +- UnknownKey(key)               404  exit 5   no such key in Vault
    |  +- KeyNotUsable(key, status)     409  exit 6   pending, revoked or retired
    |  +- WriteConflict(key)            409  exit 6   check-and-set lost to another writer
    |  +- RateLimited                   429  exit 7   too many requests (e.g. key reports)
    +- UpstreamError                    502  exit 8   someone else is failing
       +- VaultUnavailable              503  exit 9   unreachable, sealed, 5xx: transient, retried
       +- VaultDenied                   502  exit 10  our own token or policy: never retried
       +- ExchangeUnavailable           502  exit 11  Backpack unreachable or failing: retried
       +- KeyRejected                   502  exit 12  Backpack refuses the key

``http_status`` and ``exit_code`` live on the classes so that ``api.py`` and
``cli.py`` translate in one place each. Messages are built in ``__init__`` from
names and statuses only: no error ever carries secret material, response
bodies or tokens.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "CallerError",
    "ConfigError",
    "ExchangeUnavailable",
    "InvalidInput",
    "KeyNotUsable",
    "KeyRejected",
    "NotAuthenticated",
    "NotPermitted",
    "RateLimited",
    "ServiceError",
    "UnknownKey",
    "UpstreamError",
    "VaultDenied",
    "VaultUnavailable",
    "WriteConflict",
]


class ServiceError(Exception):
    """Base of every backpack-vault error."""

    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1
    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ServiceError):
    """Settings, flags or the config file are wrong; the operator fixes them."""

    exit_code: ClassVar[int] = 2
    code: ClassVar[str] = "config"


class CallerError(ServiceError):
    """The request cannot succeed as made; the caller must change it."""

    http_status: ClassVar[int] = 400
    exit_code: ClassVar[int] = 3
    code: ClassVar[str] = "bad_request"


class InvalidInput(CallerError):
    """A key name, key material or request body is malformed."""

    http_status: ClassVar[int] = 422
    code: ClassVar[str] = "invalid_input"


class NotAuthenticated(CallerError):
    """No Vault token was given, or Vault does not know it (expired, revoked)."""

    http_status: ClassVar[int] = 401
    exit_code: ClassVar[int] = 4
    code: ClassVar[str] = "not_authenticated"


class NotPermitted(CallerError):
    """Vault policy grants the caller's token nothing on the grant path."""

    http_status: ClassVar[int] = 403
    exit_code: ClassVar[int] = 4
    code: ClassVar[str] = "forbidden"

    def __init__(self, key: str, grant: str) -> None:
        super().__init__(f"your Vault token has no grant for {grant} on key {key}")
        self.key = key
        self.grant = grant


class UnknownKey(CallerError):
    http_status: ClassVar[int] = 404
    exit_code: ClassVar[int] = 5
    code: ClassVar[str] = "unknown_key"

    def __init__(self, key: str) -> None:
        super().__init__(f"no key named {key} is stored")
        self.key = key


class KeyNotUsable(CallerError):
    """The key exists but its status forbids handing it out."""

    http_status: ClassVar[int] = 409
    exit_code: ClassVar[int] = 6
    code: ClassVar[str] = "key_not_usable"

    _WHY: ClassVar[dict[str, str]] = {
        "pending": "it is pending: Backpack has not yet accepted it (register the public key "
        "in the Backpack web UI, then wait for a check or run `keys check`)",
        "revoked": "it was revoked: Backpack rejects it; create a new key in the web UI",
        "retired": "it was retired by an operator",
        "incomplete": "its metadata is incomplete: an intake was interrupted; delete and re-add it",
    }

    def __init__(self, key: str, status: str) -> None:
        why = self._WHY.get(status, f"its status is {status}")
        super().__init__(f"key {key} cannot be used: {why}")
        self.key = key
        self.status = status


class WriteConflict(CallerError):
    """A check-and-set write lost: someone else changed the key first."""

    http_status: ClassVar[int] = 409
    exit_code: ClassVar[int] = 6
    code: ClassVar[str] = "conflict"

    def __init__(self, key: str, detail: str = "it was changed by another writer") -> None:
        super().__init__(f"key {key} was not written: {detail}; nothing of yours was stored")
        self.key = key


class RateLimited(CallerError):
    http_status: ClassVar[int] = 429
    exit_code: ClassVar[int] = 7
    code: ClassVar[str] = "rate_limited"


class UpstreamError(ServiceError):
    """A service we depend on (Vault, Backpack) is failing or refusing us."""

    http_status: ClassVar[int] = 502
    exit_code: ClassVar[int] = 8
    code: ClassVar[str] = "upstream"


class VaultUnavailable(UpstreamError):
    """Vault is unreachable, sealed or failing: transient, worth retrying."""

    http_status: ClassVar[int] = 503
    exit_code: ClassVar[int] = 9
    code: ClassVar[str] = "vault_unavailable"


class VaultDenied(UpstreamError):
    """Vault refused our own token or policy: retrying will not help."""

    exit_code: ClassVar[int] = 10
    code: ClassVar[str] = "vault_denied"


class ExchangeUnavailable(UpstreamError):
    """Backpack is unreachable, in maintenance, rate limiting or failing."""

    exit_code: ClassVar[int] = 11
    code: ClassVar[str] = "exchange_unavailable"


class KeyRejected(UpstreamError):
    """Backpack refuses the key (revoked, deleted, or never registered)."""

    exit_code: ClassVar[int] = 12
    code: ClassVar[str] = "key_rejected"
