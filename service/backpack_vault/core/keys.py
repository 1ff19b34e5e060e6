"""Key names, key material, stored records and the status lifecycle. Pure: no I/O.

Lifecycle::

    keys add ------> active --(REJECTED confirmed, or keys revoke)--> revoked
    keys generate -> pending --(VALID)--> active
                     active/pending --(keys retire)--> retired
                     revoked --(keys reinstate: VALID from its own exchange)--> active

Revoked and retired keys are never handed out; only ``keys reinstate`` brings a
revoked key back. Each key records the exchange it belongs to.

A name may also hold a successor or a standby, and remember the key its last
switch replaced (``core/rotation.py``): ``KeyRecord.next``, ``.previous``, ``.history``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass
from typing import Final

import nacl.exceptions
import nacl.signing

from backpack_vault.config import Secret
from backpack_vault.core.rotation import (
    NEXT_FIELDS,
    PREVIOUS_FIELDS,
    HistoryEntry,
    NextKey,
    Predecessor,
    Role,
    history_from_metadata,
    history_patch,
)
from backpack_vault.errors import InvalidInput, KeyMismatch, KeyNotUsable

__all__ = [
    "PRODUCTION_EXCHANGE",
    "KeyPair",
    "KeyRecord",
    "KeyRef",
    "Origin",
    "Status",
    "generate_pair",
    "next_refusal",
    "normalize_exchange",
    "parse_api_key",
    "parse_key_pair",
    "parse_seed",
    "retire_predecessor_patch",
    "same_exchange",
    "switch_patch",
]

# Backpack's production REST API: the exchange a key belongs to unless it says otherwise.
PRODUCTION_EXCHANGE: Final = "https://api.backpack.exchange"


def normalize_exchange(url: str) -> str:
    """An exchange base URL as compared: lower-case scheme and host, no trailing slash."""
    url = url.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.lower()
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"


def same_exchange(a: str, b: str) -> bool:
    """Whether two base URLs name the same exchange."""
    return normalize_exchange(a) == normalize_exchange(b)


_PART: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
KEY_BYTES: Final = 32
B64_CHARS: Final = 44


@dataclass(frozen=True, slots=True, order=True)
class KeyRef:
    """A key's name: ``SUBACCOUNT/NAME``; ``main`` is the main account."""

    subaccount: str
    name: str

    def __post_init__(self) -> None:
        for what, part in (("sub-account", self.subaccount), ("key name", self.name)):
            if not _PART.fullmatch(part):
                raise InvalidInput(
                    f"{what} {part!r} is not valid: use 1-63 characters of a-z, 0-9, '.', '_' "
                    "or '-', starting with a letter or digit"
                )

    @classmethod
    def parse(cls, text: str) -> KeyRef:
        sub, sep, name = text.strip().partition("/")
        if not sep or "/" in name:
            raise InvalidInput(f"key {text!r} is not of the form SUBACCOUNT/NAME (e.g. main/bot-a)")
        return cls(sub, name)

    def __str__(self) -> str:
        return f"{self.subaccount}/{self.name}"


class Status(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    REVOKED = "revoked"
    RETIRED = "retired"
    # Not a lifecycle state: data without readable metadata (written by hand, or an
    # intake whose rollback also failed). Never handed out; it can only be retired.
    INCOMPLETE = "incomplete"

    @property
    def final(self) -> bool:
        return self in (Status.REVOKED, Status.RETIRED)


_ALLOWED: Final[dict[Status, frozenset[Status]]] = {
    Status.PENDING: frozenset({Status.ACTIVE, Status.RETIRED, Status.REVOKED}),
    Status.ACTIVE: frozenset({Status.REVOKED, Status.RETIRED}),
    Status.REVOKED: frozenset({Status.ACTIVE}),  # keys reinstate, after a VALID probe
    Status.RETIRED: frozenset(),
    Status.INCOMPLETE: frozenset({Status.RETIRED}),
}


def can_transition(old: Status, new: Status) -> bool:
    return new in _ALLOWED[old]


class Origin(enum.StrEnum):
    BACKPACK_UI = "backpack-ui"
    GENERATED = "generated"


def _strict_b64(field_name: str, text: str, hint: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or base64.b64encode(raw).decode("ascii") != text:
        raise InvalidInput(
            f"{field_name} is not standard padded base64 ({len(text)} characters found); {hint}"
        )
    return raw


_KEY_HINT: Final = "paste the 44-character API key shown in the Backpack web UI"
_SECRET_HINT: Final = "paste the 44-character API secret shown when the key was created"  # noqa: S105 - a hint


def parse_api_key(text: str) -> str:
    """Validate an API key (base64 of a 32-byte Ed25519 public key); return it stripped."""
    text = text.strip()
    raw = _strict_b64("API key", text, _KEY_HINT)
    if len(raw) != KEY_BYTES:
        raise InvalidInput(
            f"API key decodes to {len(raw)} bytes; Backpack API keys are 32 bytes "
            f"({B64_CHARS} base64 characters): {_KEY_HINT}"
        )
    try:
        nacl.signing.VerifyKey(raw)
    except (nacl.exceptions.CryptoError, ValueError) as exc:
        raise InvalidInput("API key is not a valid Ed25519 public key") from exc
    return text


def parse_seed(secret: Secret | str) -> bytes:
    """The 32-byte Ed25519 seed of an API secret, strictly validated; the one seed parser."""
    text = (secret.reveal() if isinstance(secret, Secret) else secret).strip()
    raw = _strict_b64("API secret", text, _SECRET_HINT)
    if len(raw) == 2 * KEY_BYTES:
        raise InvalidInput(
            "API secret is 64 bytes (seed + public key); Backpack secrets are the 32-byte "
            f"seed: {_SECRET_HINT}"
        )
    if len(raw) != KEY_BYTES:
        raise InvalidInput(
            f"API secret decodes to {len(raw)} bytes; Backpack API secrets are 32 bytes "
            f"({B64_CHARS} base64 characters): {_SECRET_HINT}"
        )
    return raw


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A validated API key and its secret; ``secret`` derives ``api_key``."""

    api_key: str
    secret: Secret

    @property
    def seed(self) -> bytes:
        return base64.b64decode(self.secret.reveal())


def parse_key_pair(api_key: str, secret: Secret) -> KeyPair:
    """Validate both halves strictly and check that the secret derives the key."""
    api_key = parse_api_key(api_key)
    seed = parse_seed(secret)
    derived = base64.b64encode(bytes(nacl.signing.SigningKey(seed).verify_key)).decode("ascii")
    if derived != api_key:
        raise KeyMismatch
    return KeyPair(api_key, Secret(base64.b64encode(seed).decode("ascii")))


def generate_pair() -> KeyPair:
    """Make a fresh Ed25519 pair locally (for the web UI's optional "Public Key" field)."""
    signing_key = nacl.signing.SigningKey.generate()
    api_key = base64.b64encode(bytes(signing_key.verify_key)).decode("ascii")
    return KeyPair(api_key, Secret(base64.b64encode(bytes(signing_key)).decode("ascii")))


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What Vault holds about a key besides its secret (the KV custom_metadata)."""

    ref: KeyRef
    api_key: str
    read_only: bool
    status: Status
    origin: Origin
    created_at: str
    status_since: str
    label: str = ""
    last_verdict: str = ""
    last_checked_at: str = ""
    version: int = 0
    exchange: str = PRODUCTION_EXCHANGE
    status_reason: str = ""  # why the status last changed: a verdict, or the operator's words
    status_by: str = ""  # who changed it: a Vault identity, or "check"
    next: NextKey | None = None  # a successor (pending) or a standby (core/rotation.py)
    previous: Predecessor | None = None  # the key the last switch replaced
    history: tuple[HistoryEntry, ...] = ()  # rotations, failovers, retirements; oldest first

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "api_key": self.api_key,
            "subaccount": self.ref.subaccount,
            "read_only": "true" if self.read_only else "false",
            "origin": self.origin.value,
            "created_at": self.created_at,
            "status": self.status.value,
            "status_since": self.status_since,
            "label": self.label,
            "last_verdict": self.last_verdict,
            "last_checked_at": self.last_checked_at,
            "exchange": self.exchange,
            "status_reason": self.status_reason,
            "status_by": self.status_by,
        }
        if self.next is not None:
            meta |= self.next.to_metadata()
        if self.previous is not None:
            meta |= self.previous.to_metadata()
        for i, entry in enumerate(self.history):
            meta[f"history.{i:02d}"] = entry.encode()
        # Vault refuses empty custom_metadata values; absent means empty.
        return {k: v for k, v in meta.items() if v}

    @classmethod
    def from_metadata(cls, ref: KeyRef, meta: dict[str, str], version: int) -> KeyRecord | None:
        """Rebuild a record; ``None`` when the metadata is incomplete (interrupted intake)."""
        try:
            return cls(
                ref=ref,
                api_key=meta["api_key"],
                read_only=meta.get("read_only", "false") == "true",
                status=Status(meta["status"]),
                origin=Origin(meta.get("origin", Origin.BACKPACK_UI.value)),
                created_at=meta.get("created_at", ""),
                status_since=meta.get("status_since", ""),
                label=meta.get("label", ""),
                last_verdict=meta.get("last_verdict", ""),
                last_checked_at=meta.get("last_checked_at", ""),
                version=version,
                exchange=meta.get("exchange") or PRODUCTION_EXCHANGE,
                status_reason=meta.get("status_reason", ""),
                status_by=meta.get("status_by", ""),
                next=NextKey.from_metadata(meta),
                previous=Predecessor.from_metadata(meta),
                history=history_from_metadata(meta),
            )
        except (KeyError, ValueError):
            return None

    @classmethod
    def new(
        cls,
        ref: KeyRef,
        api_key: str,
        *,
        origin: Origin,
        now: str,
        read_only: bool,
        label: str = "",
        exchange: str = PRODUCTION_EXCHANGE,
    ) -> KeyRecord:
        """The record of a key being stored: copied from the web UI it is active at once;
        generated here it is pending until Backpack accepts it."""
        return cls(
            ref=ref,
            api_key=api_key,
            read_only=read_only,
            status=Status.ACTIVE if origin is Origin.BACKPACK_UI else Status.PENDING,
            origin=origin,
            created_at=now,
            status_since=now,
            label=label,
            exchange=normalize_exchange(exchange),
        )

    @classmethod
    def incomplete(cls, ref: KeyRef, version: int) -> KeyRecord:
        return cls(
            ref=ref,
            api_key="",
            read_only=True,
            status=Status.INCOMPLETE,
            origin=Origin.BACKPACK_UI,
            created_at="",
            status_since="",
            version=version,
        )

    def require_usable(self) -> None:
        if self.status is not Status.ACTIVE:
            raise KeyNotUsable(str(self.ref), self.status.value)

    def as_public_dict(self) -> dict[str, object]:
        """The stable ``--json`` / API shape: never the secret."""
        return {
            "key": str(self.ref),
            "subaccount": self.ref.subaccount,
            "name": self.ref.name,
            "api_key": self.api_key,
            "read_only": self.read_only,
            "status": self.status.value,
            "status_since": self.status_since,
            "origin": self.origin.value,
            "label": self.label,
            "created_at": self.created_at,
            "last_verdict": self.last_verdict,
            "last_checked_at": self.last_checked_at,
            "version": self.version,
            "exchange": self.exchange,
            "status_reason": self.status_reason,
            "status_by": self.status_by,
            "next": self.next.as_public_dict() if self.next else None,
            "previous": self.previous.as_public_dict() if self.previous else None,
            "history": [entry.as_public_dict() for entry in self.history],
        }


# -- switching a name to its next key (core/rotation.py) -------------------------------------

RETIRING: Final = "retiring"  # a predecessor's status: no handouts, copies still out
RETIRED: Final = "retired"


def next_refusal(record: KeyRecord, role: Role, api_key: str = "") -> str:
    """Why ``record`` cannot take ``api_key`` as its successor or standby now ("" when it can)."""
    if api_key and api_key in (record.api_key, record.previous.api_key if record.previous else ""):
        which = "current" if api_key == record.api_key else "previous"
        return f"{api_key} is already this name's {which} key: a {role} must be a new key"
    if record.status is Status.INCOMPLETE:
        return "its metadata is incomplete: retire it and store the key again"
    if record.status is Status.RETIRED:
        return "it is retired"
    if role is Role.SUCCESSOR and record.status is not Status.ACTIVE:
        return f"it is {record.status}: only an active key is rotated"
    if record.next is not None:
        what = "a successor" if record.next.role is Role.SUCCESSOR else "a standby"
        return (
            f"it already has {what} ({record.next.api_key}, {record.next.state}); drop it "
            f"with `backpack-vault keys rotate {record.ref} --abort` first"
        )
    return ""


def switch_patch(
    record: KeyRecord,
    *,
    now: str,
    failover: bool,
    safe_at: str,
    verdict: str,
    actor: str,
) -> dict[str, str | None]:
    """The metadata merge patch that makes ``record``'s next key the current one.

    A rotation leaves the old key ``retiring`` until ``safe_at`` (its last copy has
    expired); a failover leaves it ``revoked``. The next key's fields go, and the
    switch is appended to the history.
    """
    nxt = record.next
    if nxt is None:
        raise ValueError(f"{record.ref} has no next key")
    event = "failover" if failover else "rotated"
    reason = (
        f"{verdict}: the standby took over from a revoked key"
        if failover
        else f"{verdict}: the successor took over"
    )
    previous = Predecessor(
        api_key=record.api_key,
        status=Status.REVOKED.value if failover else RETIRING,
        since=now,
        version=record.version,
        safe_at="" if failover else safe_at,
        reason=reason,
    )
    patch: dict[str, str | None] = dict.fromkeys(NEXT_FIELDS)
    patch |= dict.fromkeys(PREVIOUS_FIELDS)
    patch |= {
        "api_key": nxt.api_key,
        "read_only": "true" if nxt.read_only else "false",
        "origin": nxt.origin or Origin.GENERATED.value,
        "created_at": nxt.created_at or now,
        "status": Status.ACTIVE.value,
        "status_since": now,
        "status_reason": reason,
        "status_by": actor or None,
        "last_verdict": verdict or None,
        "last_checked_at": now,
    }
    patch |= previous.to_metadata()
    note = f"safe to delete the old key in the Backpack UI from {safe_at}" if safe_at else ""
    if failover:
        note = "the old key was revoked; store a new standby (keys add --standby)"
    entry = HistoryEntry(
        at=now, event=event, api_key=nxt.api_key, previous=record.api_key, by=actor, note=note
    )
    return patch | history_patch(record.history, entry)


def retire_predecessor_patch(record: KeyRecord, *, now: str, actor: str) -> dict[str, str | None]:
    """The patch that moves a retiring predecessor to retired, with its history entry."""
    previous = record.previous
    if previous is None:
        raise ValueError(f"{record.ref} has no predecessor")
    entry = HistoryEntry(
        at=now,
        event="retired",
        api_key=previous.api_key,
        by=actor,
        note="its last copy has expired: delete it in the Backpack UI",
    )
    return {
        "previous_status": RETIRED,
        "previous_since": now,
    } | history_patch(record.history, entry)
