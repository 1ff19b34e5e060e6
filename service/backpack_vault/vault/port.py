"""The Vault the domain sees: ``VaultPort``, and the frozen records its calls return.

The broker, the checks and the leader lease are typed against this Protocol, not
against :class:`backpack_vault.vault.client.Vault`, which satisfies it structurally.
Every method raises only backpack-vault errors (``UnknownKey``, ``WriteConflict``,
``NotAuthenticated``, ``VaultUnavailable``, ``VaultDenied``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from backpack_vault.config import Secret
from backpack_vault.core.keys import KeyRecord, KeyRef, Status

__all__ = ["TokenInfo", "VaultPort", "WrapInfo"]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What Vault says about a token; never the token itself."""

    accessor: str
    display_name: str
    entity_id: str
    policies: tuple[str, ...]
    ttl: int
    renewable: bool
    expires_at: float | None  # epoch seconds; None for a token that never expires

    @property
    def identity(self) -> str:
        """A name fit for logs: the entity id when there is one, else the display name."""
        return self.entity_id or self.display_name or self.accessor[:8]


@dataclass(frozen=True, slots=True)
class WrapInfo:
    token: Secret
    accessor: str
    ttl: int
    created_at: float


class VaultPort(Protocol):
    """The calls the domain makes; the daemon's own login and renewal are not among them."""

    # -- keys -------------------------------------------------------------------------

    def read_key(self, ref: KeyRef) -> tuple[KeyRecord, Secret]:
        """The key's record and its secret, in one read."""
        ...

    def read_record(self, ref: KeyRef) -> KeyRecord:
        """The key's record (metadata only, never the secret)."""
        ...

    def list_refs(self) -> list[KeyRef]: ...

    def set_status(
        self,
        ref: KeyRef,
        new: Status,
        *,
        now: str,
        verdict: str = "",
        expect: Status | None = None,
    ) -> KeyRecord: ...

    # -- small CAS documents (leader lease) -------------------------------------------

    def read_document(self, path: str) -> tuple[dict[str, Any], int] | None: ...

    def write_document(self, path: str, data: Mapping[str, Any], cas: int) -> int: ...

    # -- response wrapping ------------------------------------------------------------

    def wrap(self, payload: Mapping[str, Any], ttl: int) -> WrapInfo: ...

    def revoke_accessor(self, accessor: str) -> None: ...

    # -- questions asked with a worker's own token ------------------------------------

    def capabilities(self, token: Secret, paths: Sequence[str]) -> dict[str, frozenset[str]]: ...

    def lookup_caller(self, token: Secret) -> TokenInfo: ...
