"""The Vault the domain sees: ``VaultPort``, and the frozen records its calls return.

The broker, the checks and the leader lease are typed against this Protocol, not
against :class:`backpack_vault.vault.client.Vault`, which satisfies it structurally.
Every method raises only backpack-vault errors (``UnknownKey``, ``WriteConflict``,
``NotAuthenticated``, ``VaultUnavailable``, ``VaultDenied``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from backpack_vault.config import Secret
from backpack_vault.core.keys import KeyRecord, KeyRef, Status
from backpack_vault.errors import ServiceError

__all__ = [
    "FEED_DOCUMENT",
    "FEED_KEEP",
    "Change",
    "ChangeFeed",
    "TokenInfo",
    "VaultPort",
    "WrapInfo",
]

# The change feed: one small KV document (next to the leader lease) that every status
# write appends to and every replica polls, so an operator's retire or revoke reaches all
# replicas within a second on any Vault or OpenBao (neither has event notifications here).
FEED_DOCUMENT: Final = "changes"
FEED_KEEP: Final = 200  # recent changes kept; a replica further behind re-reads its keys


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


@dataclass(frozen=True, slots=True)
class Change:
    """One status change on the feed: ``seq`` grows by one per change."""

    seq: int
    ref: KeyRef
    status: Status
    at: str
    deleted: bool = False
    event: str = ""  # "rotated" when the name switched to another key; else the status is news
    api_key: str = ""  # the public key the name points to after a switch
    version: int = 0  # the KV version that holds it

    @property
    def name(self) -> str:
        """What a watch stream calls it: ``rotated``, or the status."""
        return self.event or self.status.value

    def as_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "seq": self.seq,
            "key": str(self.ref),
            "status": self.status.value,
            "at": self.at,
            "deleted": self.deleted,
        }
        if self.event:
            data |= {"event": self.event, "api_key": self.api_key, "version": self.version}
        return data

    @classmethod
    def from_dict(cls, data: object) -> Change | None:
        """Tolerant of damage: an entry that does not parse is skipped, not fatal."""
        if not isinstance(data, Mapping):
            return None
        try:
            return cls(
                seq=int(data["seq"]),
                ref=KeyRef.parse(str(data["key"])),
                status=Status(str(data["status"])),
                at=str(data.get("at", "")),
                deleted=bool(data.get("deleted", False)),
                event=str(data.get("event", "")),
                api_key=str(data.get("api_key", "")),
                version=int(data.get("version", 0)),
            )
        except (KeyError, TypeError, ValueError, ServiceError):
            return None


@dataclass(frozen=True, slots=True)
class ChangeFeed:
    """The feed document: the latest sequence number and the recent changes, oldest first."""

    seq: int = 0
    entries: tuple[Change, ...] = ()

    @classmethod
    def from_document(cls, data: Mapping[str, Any]) -> ChangeFeed:
        raw = data.get("entries")
        entries = tuple(
            c for c in (Change.from_dict(e) for e in (raw if isinstance(raw, list) else ())) if c
        )
        try:
            seq = int(data.get("seq", 0))
        except (TypeError, ValueError):
            seq = 0
        return cls(max([seq, *(c.seq for c in entries)]), entries)

    def as_document(self) -> dict[str, object]:
        return {"seq": self.seq, "entries": [c.as_dict() for c in self.entries]}

    def since(self, seq: int) -> tuple[Change, ...]:
        """Changes after ``seq``, oldest first."""
        return tuple(c for c in self.entries if c.seq > seq)

    def covers(self, seq: int) -> bool:
        """Whether every change after ``seq`` is still in the document (none was pruned)."""
        if seq >= self.seq:
            return True
        return bool(self.entries) and self.entries[0].seq <= seq + 1


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
        reason: str = "",
        actor: str = "",
    ) -> KeyRecord: ...

    # -- the change feed ----------------------------------------------------------------

    def publish_change(
        self,
        ref: KeyRef,
        status: Status,
        *,
        at: str,
        deleted: bool = False,
        event: str = "",
        api_key: str = "",
        version: int = 0,
    ) -> int | None: ...

    # -- the keys beside the current one (core/rotation.py) ---------------------------

    def read_next_secret(self, ref: KeyRef, api_key: str) -> Secret:
        """The secret of the successor or standby ``api_key`` of ``ref``."""
        ...

    def patch_record(self, ref: KeyRef, patch: Mapping[str, str | None]) -> KeyRecord:
        """Merge ``patch`` into the key's custom_metadata (None removes a field)."""
        ...

    def write_next_pair(self, current: KeyRecord, secret: Secret) -> int:
        """The switch's check-and-set write of the next key's pair; the new version."""
        ...

    def finish_switch(
        self, ref: KeyRef, patch: Mapping[str, str | None], *, event: str, at: str, version: int
    ) -> KeyRecord:
        """The metadata half of a switch, also to finish one that stopped after the pair."""
        ...

    def read_changes(self) -> ChangeFeed: ...

    # -- small CAS documents (leader lease) -------------------------------------------

    def read_document(self, path: str) -> tuple[dict[str, Any], int] | None: ...

    def write_document(self, path: str, data: Mapping[str, Any], cas: int) -> int: ...

    # -- response wrapping ------------------------------------------------------------

    def wrap(self, payload: Mapping[str, Any], ttl: int) -> WrapInfo: ...

    def revoke_accessor(self, accessor: str) -> None: ...

    # -- questions asked with a worker's own token ------------------------------------

    def capabilities(self, token: Secret, paths: Sequence[str]) -> dict[str, frozenset[str]]: ...

    def lookup_caller(self, token: Secret) -> TokenInfo: ...
