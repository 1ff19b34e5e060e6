"""The keys behind one name besides the current one, and the record of its rotations. Pure.

A name (``SUB/NAME``) hands out one key, the *current* one. Two more may stand
beside it::

    next       a successor (``keys rotate``: pending until Backpack accepts it, then the
               name switches to it at once) or a standby (``keys add|generate --standby``:
               accepted, then ready to take over when the current key is revoked)
    previous   the key the last switch replaced: retiring (no handouts; its last copy
               expires at ``safe_at``, after which deleting it in the Backpack UI breaks
               no worker), then retired; or revoked, when a standby took over from it

Vault layout: the secret of ``next`` is KV data at ``<prefix>/SUB/NAME/next`` (exactly
``api_key`` and ``api_secret``); the switch writes it into ``<prefix>/SUB/NAME`` as a
new version with check-and-set, so the name points to it in one write. Everything
that is not secret is custom_metadata of the name: ``next_*``, ``previous_*`` and
``history.NN`` (the last :data:`HISTORY_KEEP` rotations, switches, failovers and
retirements, oldest first).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HISTORY_KEEP",
    "NEXT_FIELDS",
    "PREVIOUS_FIELDS",
    "HistoryEntry",
    "NextKey",
    "NextState",
    "Predecessor",
    "Role",
    "history_from_metadata",
    "history_patch",
]

HISTORY_KEEP: Final = 16
_HISTORY_KEY: Final = "history."
_MAX_VALUE: Final = 512  # Vault's limit on one custom_metadata value


class Role(enum.StrEnum):
    SUCCESSOR = "successor"  # takes over as soon as Backpack accepts it (a rotation)
    STANDBY = "standby"  # takes over when the current key is revoked (a failover)


class NextState(enum.StrEnum):
    PENDING = "pending"  # Backpack has not accepted it yet
    READY = "ready"  # Backpack accepted it: a standby waits, a successor switches


@dataclass(frozen=True, slots=True)
class NextKey:
    """The successor or standby of a name: its public facts (the secret stays in KV)."""

    api_key: str
    role: Role
    state: NextState
    read_only: bool
    origin: str
    created_at: str
    created_by: str = ""
    last_verdict: str = ""
    last_checked_at: str = ""

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "next_api_key": self.api_key,
            "next_role": self.role.value,
            "next_status": self.state.value,
            "next_read_only": "true" if self.read_only else "false",
            "next_origin": self.origin,
            "next_created_at": self.created_at,
            "next_by": self.created_by[:_MAX_VALUE],
            "next_last_verdict": self.last_verdict,
            "next_last_checked_at": self.last_checked_at,
        }
        return {k: v for k, v in meta.items() if v}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> NextKey | None:
        try:
            return cls(
                api_key=meta["next_api_key"],
                role=Role(meta.get("next_role", Role.SUCCESSOR.value)),
                state=NextState(meta.get("next_status", NextState.PENDING.value)),
                read_only=meta.get("next_read_only", "false") == "true",
                origin=meta.get("next_origin", ""),
                created_at=meta.get("next_created_at", ""),
                created_by=meta.get("next_by", ""),
                last_verdict=meta.get("next_last_verdict", ""),
                last_checked_at=meta.get("next_last_checked_at", ""),
            )
        except (KeyError, ValueError):
            return None

    @property
    def ready(self) -> bool:
        return self.state is NextState.READY

    def as_public_dict(self) -> dict[str, object]:
        return {
            "api_key": self.api_key,
            "role": self.role.value,
            "status": self.state.value,
            "read_only": self.read_only,
            "origin": self.origin,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "last_verdict": self.last_verdict,
            "last_checked_at": self.last_checked_at,
        }


@dataclass(frozen=True, slots=True)
class Predecessor:
    """The key the last switch replaced. ``status`` is retiring, retired or revoked;
    ``version`` is the KV version that still holds its secret."""

    api_key: str
    status: str
    since: str
    version: int
    safe_at: str = ""  # when its last copy has expired: deleting it in the UI is safe then
    reason: str = ""

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "previous_api_key": self.api_key,
            "previous_status": self.status,
            "previous_since": self.since,
            "previous_version": str(self.version),
            "previous_safe_at": self.safe_at,
            "previous_reason": self.reason[:_MAX_VALUE],
        }
        return {k: v for k, v in meta.items() if v}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> Predecessor | None:
        try:
            return cls(
                api_key=meta["previous_api_key"],
                status=meta["previous_status"],
                since=meta.get("previous_since", ""),
                version=int(meta.get("previous_version", "0")),
                safe_at=meta.get("previous_safe_at", ""),
                reason=meta.get("previous_reason", ""),
            )
        except (KeyError, ValueError):
            return None

    def as_public_dict(self) -> dict[str, object]:
        return {
            "api_key": self.api_key,
            "status": self.status,
            "since": self.since,
            "version": self.version,
            "safe_to_delete_at": self.safe_at,
            "reason": self.reason,
        }


NEXT_FIELDS: Final = (
    "next_api_key",
    "next_role",
    "next_status",
    "next_read_only",
    "next_origin",
    "next_created_at",
    "next_by",
    "next_last_verdict",
    "next_last_checked_at",
)
PREVIOUS_FIELDS: Final = (
    "previous_api_key",
    "previous_status",
    "previous_since",
    "previous_version",
    "previous_safe_at",
    "previous_reason",
)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One rotation, switch, failover or retirement of a predecessor."""

    at: str
    event: str  # "rotated", "failover", "retired"
    api_key: str  # the key the name points to after the event (for "retired": the one retired)
    previous: str = ""  # the key it replaced
    by: str = ""
    note: str = ""

    def encode(self) -> str:
        data = {"at": self.at, "event": self.event, "api_key": self.api_key}
        for name in ("previous", "by", "note"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        text = json.dumps(data, separators=(",", ":"))
        if len(text) > _MAX_VALUE:  # a long note is cut, never the keys
            data["note"] = self.note[: max(0, len(self.note) - (len(text) - _MAX_VALUE))]
            text = json.dumps(data, separators=(",", ":"))
        return text

    @classmethod
    def decode(cls, text: str) -> HistoryEntry | None:
        try:
            data = json.loads(text)
            return cls(
                at=str(data["at"]),
                event=str(data["event"]),
                api_key=str(data["api_key"]),
                previous=str(data.get("previous", "")),
                by=str(data.get("by", "")),
                note=str(data.get("note", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def as_public_dict(self) -> dict[str, object]:
        return {
            "at": self.at,
            "event": self.event,
            "api_key": self.api_key,
            "previous": self.previous,
            "by": self.by,
            "note": self.note,
        }


def history_from_metadata(meta: Mapping[str, str]) -> tuple[HistoryEntry, ...]:
    """The recorded history, oldest first; entries that do not parse are skipped."""
    keys = sorted(k for k in meta if k.startswith(_HISTORY_KEY))
    entries = (HistoryEntry.decode(meta[k]) for k in keys)
    return tuple(e for e in entries if e is not None)


def history_patch(existing: tuple[HistoryEntry, ...], entry: HistoryEntry) -> dict[str, str | None]:
    """A merge patch that appends ``entry``, keeping the newest :data:`HISTORY_KEEP`."""
    entries = [*existing, entry][-HISTORY_KEEP:]
    patch: dict[str, str | None] = {f"{_HISTORY_KEY}{i:02d}": None for i in range(HISTORY_KEEP)}
    for i, kept in enumerate(entries):
        patch[f"{_HISTORY_KEY}{i:02d}"] = kept.encode()
    return patch
