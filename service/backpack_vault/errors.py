"""Every error backpack-vault raises (daemon, client, dev tooling), grouped by who is at fault.

::

    ServiceError                        500  exit 1   a bug or an unexpected state: ours
    +- ConfigError                           exit 2   the operator fixes settings or flags
    +- DevError                              exit 1   the embedded default could not start
    +- Interrupted                           exit 130 SIGINT/SIGTERM before the work was done
    +- CallerError                      400  exit 3   whoever called must change the request
    |  +- InvalidInput                  422  exit 3   malformed key name, key material, body
    |  |  +- KeyMismatch              422  exit 3   the secret does not derive the API key
    |  |  +- BodyTooLarge             413  exit 3   a request body over the size limit
    |  +- NotAuthenticated              401  exit 4   missing, expired or unknown Vault token
    |  +- NotPermitted(key, grant)      403  exit 4   Vault policy denies the grant path
    |  |  +- ReadOnlyKey                403  exit 4   a read-only key, a state-changing instruction
    |  |  +- AccessDenied               403  exit 4   (client) the daemon said 403
    |  +- UnknownKey(key)               404  exit 5   no such key in Vault
    |  +- NotFound                      404  exit 5   no such route
    |  +- MethodNotAllowed              405  exit 3   the route exists, the method does not
    |  +- KeyNotUsable(key, status)     409  exit 6   pending, revoked or retired
    |  |  +- KeyPending, KeyRevoked, KeyRetired      (client) the same, by status
    |  +- WriteConflict(key)            409  exit 6   check-and-set lost to another writer
    |  +- RateLimited                   429  exit 7   too many requests
    |     +- ReportsLimited             429  exit 7   one report per key per interval
    +- UpstreamError                    502  exit 8   someone else is failing
       +- VaultUnavailable              503  exit 9   unreachable, sealed, 5xx: transient, retried
       +- VaultDenied                   503  exit 10  our own token or policy: never retried
       +- ExchangeUnavailable           502  exit 11  Backpack unreachable or failing: retried
       +- KeyRejected                   502  exit 12  Backpack refuses the key
       +- BrokerUnavailable             503  exit 8   (client) the daemon cannot answer now
       +- CopyUnavailable               502  exit 8   (client) the wrapping token is spent

``http_status``, ``exit_code`` and ``code`` are ``ClassVar``s, so ``api.py`` and
``cli.py`` translate in one place each. Messages are built in ``__init__`` from
names and statuses only: no error ever carries secret material, response
bodies or tokens.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import ClassVar

__all__ = [
    "AccessDenied",
    "BodyTooLarge",
    "BrokerUnavailable",
    "CallerError",
    "ConfigError",
    "CopyUnavailable",
    "DevError",
    "ExchangeUnavailable",
    "Interrupted",
    "InvalidInput",
    "KeyMismatch",
    "KeyNotUsable",
    "KeyPending",
    "KeyRejected",
    "KeyRetired",
    "KeyRevoked",
    "MethodNotAllowed",
    "NotAuthenticated",
    "NotFound",
    "NotPermitted",
    "RateLimited",
    "ReadOnlyKey",
    "ReportsLimited",
    "ServiceError",
    "UnknownKey",
    "UpstreamError",
    "VaultDenied",
    "VaultUnavailable",
    "WriteConflict",
    "not_usable",
]


class ServiceError(Exception):
    """Base of every backpack-vault error."""

    http_status: ClassVar[int] = HTTPStatus.INTERNAL_SERVER_ERROR
    exit_code: ClassVar[int] = 1
    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ServiceError):
    """Settings, flags or the config file are wrong; the operator fixes them."""

    exit_code: ClassVar[int] = 2
    code: ClassVar[str] = "config"


class DevError(ServiceError):
    """Something the embedded default needs did not happen; the message says what and where."""

    code: ClassVar[str] = "dev"


class Interrupted(ServiceError):
    """SIGINT or SIGTERM arrived before the work was done."""

    exit_code: ClassVar[int] = 130
    code: ClassVar[str] = "interrupted"

    def __init__(self, message: str = "interrupted") -> None:
        super().__init__(message)


class CallerError(ServiceError):
    """The request cannot succeed as made; the caller must change it."""

    http_status: ClassVar[int] = HTTPStatus.BAD_REQUEST
    exit_code: ClassVar[int] = 3
    code: ClassVar[str] = "bad_request"


class InvalidInput(CallerError):
    """A key name, key material or request body is malformed."""

    http_status: ClassVar[int] = HTTPStatus.UNPROCESSABLE_ENTITY
    code: ClassVar[str] = "invalid_input"


class KeyMismatch(InvalidInput):
    """The API secret is well formed but does not derive the API key it was given with."""

    code: ClassVar[str] = "key_mismatch"

    def __init__(self) -> None:
        super().__init__(
            "API secret does not belong to this API key: check that both were copied from the "
            "same key in the Backpack web UI"
        )


class BodyTooLarge(InvalidInput):
    """A request body over the size or nesting limit; nothing was read past the limit."""

    http_status: ClassVar[int] = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code: ClassVar[str] = "body_too_large"


class NotAuthenticated(CallerError):
    """No Vault token was given, or Vault does not know it (expired, revoked)."""

    http_status: ClassVar[int] = HTTPStatus.UNAUTHORIZED
    exit_code: ClassVar[int] = 4
    code: ClassVar[str] = "not_authenticated"


class NotPermitted(CallerError):
    """Vault policy grants the caller's token nothing on the grant path."""

    http_status: ClassVar[int] = HTTPStatus.FORBIDDEN
    exit_code: ClassVar[int] = 4
    code: ClassVar[str] = "forbidden"

    def __init__(self, key: str, grant: str, message: str | None = None) -> None:
        super().__init__(message or f"your Vault token has no grant for {grant} on key {key}")
        self.key = key
        self.grant = grant


class ReadOnlyKey(NotPermitted):
    """A read-only key was asked to sign an instruction that changes account state."""

    code: ClassVar[str] = "read_only_key"

    def __init__(self, key: str, instruction: str) -> None:
        super().__init__(
            key,
            f"sign/{instruction}",
            f"key {key} is read-only: it is never signed for {instruction}, which changes "
            "account state (whatever the Vault policy grants); use a trading key",
        )


class AccessDenied(NotPermitted):
    """(client) The daemon refused: Vault policy gives this worker no such grant, or read-only."""

    def __init__(self, key: str, message: str, *, grant: str = "") -> None:
        super().__init__(key, grant, message)


class UnknownKey(CallerError):
    http_status: ClassVar[int] = HTTPStatus.NOT_FOUND
    exit_code: ClassVar[int] = 5
    code: ClassVar[str] = "unknown_key"

    def __init__(self, key: str) -> None:
        super().__init__(f"no key named {key} is stored")
        self.key = key


class NotFound(CallerError):
    """No route answers this path."""

    http_status: ClassVar[int] = HTTPStatus.NOT_FOUND
    exit_code: ClassVar[int] = 5
    code: ClassVar[str] = "not_found"


class MethodNotAllowed(CallerError):
    """The route exists but not with this method."""

    http_status: ClassVar[int] = HTTPStatus.METHOD_NOT_ALLOWED
    code: ClassVar[str] = "method_not_allowed"


class KeyNotUsable(CallerError):
    """The key exists but its status forbids handing it out."""

    http_status: ClassVar[int] = HTTPStatus.CONFLICT
    exit_code: ClassVar[int] = 6
    code: ClassVar[str] = "key_not_usable"

    _WHY: ClassVar[dict[str, str]] = {
        "pending": "it is pending: Backpack has not yet accepted it (register the public key "
        "in the Backpack web UI, then wait for a check or run `keys check`)",
        "revoked": "it was revoked: Backpack rejects it; create a new key in the web UI (if "
        "the revocation was wrong: `backpack-vault keys reinstate`)",
        "retired": "it was retired by an operator",
        "incomplete": "its metadata is incomplete: an intake was interrupted; delete and re-add it",
    }

    def __init__(self, key: str, status: str) -> None:
        why = self._WHY.get(status, f"its status is {status}")
        super().__init__(f"key {key} cannot be used: {why}")
        self.key = key
        self.status = status


class KeyPending(KeyNotUsable):
    """The key waits for Backpack to accept it (register its public key in the web UI)."""


class KeyRevoked(KeyNotUsable):
    """Backpack no longer accepts the key; an operator must create a new one."""


class KeyRetired(KeyNotUsable):
    """An operator retired the key; it is never handed out again."""


_NOT_USABLE: dict[str, type[KeyNotUsable]] = {
    "pending": KeyPending,
    "revoked": KeyRevoked,
    "retired": KeyRetired,
}


def not_usable(key: str, status: str) -> KeyNotUsable:
    """The most specific ``KeyNotUsable`` for ``status`` (``KeyRevoked`` for ``revoked``, ...)."""
    return _NOT_USABLE.get(status, KeyNotUsable)(key, status)


class WriteConflict(CallerError):
    """A check-and-set write lost: someone else changed the key first."""

    http_status: ClassVar[int] = HTTPStatus.CONFLICT
    exit_code: ClassVar[int] = 6
    code: ClassVar[str] = "conflict"

    def __init__(self, key: str, detail: str = "it was changed by another writer") -> None:
        super().__init__(f"key {key} was not written: {detail}; nothing of yours was stored")
        self.key = key


class RateLimited(CallerError):
    http_status: ClassVar[int] = HTTPStatus.TOO_MANY_REQUESTS
    exit_code: ClassVar[int] = 7
    code: ClassVar[str] = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ReportsLimited(RateLimited):
    """A report for this key was accepted moments ago; a check is already on its way."""

    def __init__(self, key: str, interval_s: float, retry_after_s: float) -> None:
        super().__init__(
            f"a report for {key} was accepted moments ago and a check is on its way; reports "
            f"are limited to one per {interval_s:g}s per key",
            retry_after_s=retry_after_s,
        )


class UpstreamError(ServiceError):
    """A service we depend on (Vault, Backpack) is failing or refusing us."""

    http_status: ClassVar[int] = HTTPStatus.BAD_GATEWAY
    exit_code: ClassVar[int] = 8
    code: ClassVar[str] = "upstream"


class VaultUnavailable(UpstreamError):
    """Vault is unreachable, sealed or failing: transient, worth retrying."""

    http_status: ClassVar[int] = HTTPStatus.SERVICE_UNAVAILABLE
    exit_code: ClassVar[int] = 9
    code: ClassVar[str] = "vault_unavailable"


class VaultDenied(UpstreamError):
    """Vault refused our own token or policy: retrying will not help."""

    http_status: ClassVar[int] = HTTPStatus.SERVICE_UNAVAILABLE
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


class BrokerUnavailable(UpstreamError):
    """(client) The daemon, or Vault behind it, cannot answer now; retrying later may help."""

    http_status: ClassVar[int] = HTTPStatus.SERVICE_UNAVAILABLE
    code: ClassVar[str] = "broker_unavailable"


class CopyUnavailable(UpstreamError):
    """(client) The wrapping token could not be unwrapped: used, expired or revoked."""

    code: ClassVar[str] = "copy_unavailable"
