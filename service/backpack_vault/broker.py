"""Grant-path checks, wrapped copies, signatures, and the ledger of unclaimed copies."""

# Rules
#
# 1. Vault decides. Every copy and signature needs a grant path that
#    sys/capabilities-self, asked with the WORKER's own token, answers with the
#    right capability (`read` for copy, `update` for sign/<instruction>). We
#    never parse policies and never fall back to our own config.
# 2. Deny before reveal: the grant is checked before the key is looked up, so a
#    caller without a grant learns nothing, not even whether the key exists.
# 3. Status beats caches: only an `active` key is handed out. Cached secrets
#    live at most `secret_cache_s` and are dropped at once by on_status_change;
#    a reload that finds a key revoked or retired revokes its unclaimed copies.
# 4. A read-only key is never signed for a state-changing instruction, whatever
#    the policy says.
# 5. Caches are keyed by a keyed hash of the token (random key per process),
#    never by the token itself, and are bounded in size and age.
# 6. The ledger remembers the accessor of every copy until its wrapping token
#    expires; revoking a key revokes them all. The ledger itself is pure.
# 7. After a handout of a key in demand (two copies within a quarter of the
#    wrap TTL), `refill` wraps up to `prewrap` spare copies ahead of time, so
#    the next copy costs no Vault round trip. A spare is a copy like any other:
#    in the ledger, revoked with its key, handed out once, and only while three
#    quarters of its wrapping TTL are left.
# 8. No I/O here but the Vault passed in; time comes from `clock`. The `*_now`
#    methods answer from memory only, for the API's event loop.

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from backpack_vault.backpack.instructions import (
    ENDPOINTS,
    EXTRA_INSTRUCTIONS,
    is_known,
    is_state_changing,
)
from backpack_vault.backpack.signing import DEFAULT_WINDOW_MS, Params, Signer
from backpack_vault.config import BrokerSettings, Secret
from backpack_vault.core.clock import iso_utc
from backpack_vault.core.keys import KeyRecord, KeyRef, Status
from backpack_vault.errors import (
    InvalidInput,
    KeyNotUsable,
    NotAuthenticated,
    NotPermitted,
    ReadOnlyKey,
    ServiceError,
    UnknownKey,
)
from backpack_vault.logging import get_logger
from backpack_vault.vault.client import Vault, WrapInfo

MAX_TIMESTAMP_SKEW_MS: Final = 60_000

__all__ = [
    "ALL_INSTRUCTIONS",
    "Broker",
    "Handout",
    "KeyInfo",
    "Ledger",
    "Signature",
]

log = get_logger("backpack_vault.broker")

ALL_INSTRUCTIONS: Final[tuple[str, ...]] = tuple(
    sorted({e.instruction for e in ENDPOINTS} | EXTRA_INSTRUCTIONS)
)
_MAX_CACHED: Final = 10_000
_IDENTITY_TTL_S: Final = 300.0
# A pre-wrapped copy is handed out only while most of its wrapping TTL is left.
_SPARE_MAX_AGE: Final = 0.25


# -- the ledger of unclaimed copies (pure) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class _Claim:
    accessor: str
    expires_at: float


@dataclass(slots=True)
class Ledger:
    """Accessors of wrapping tokens handed out and not yet expired. Pure; not thread-safe.

    Vault does not tell us when a copy is unwrapped, so an entry lives until its
    wrapping token's TTL ends; revoking an already unwrapped token is harmless.
    """

    _by_key: dict[KeyRef, list[_Claim]] = field(default_factory=dict)

    def record(self, key: KeyRef, accessor: str, expires_at: float, *, now: float) -> None:
        claims = [c for c in self._by_key.get(key, ()) if c.expires_at > now]
        claims.append(_Claim(accessor, expires_at))
        self._by_key[key] = claims

    def expired(self, *, now: float) -> list[tuple[KeyRef, str]]:
        """Forget and return every entry whose wrapping token has expired."""
        gone: list[tuple[KeyRef, str]] = []
        for key in list(self._by_key):
            keep = []
            for claim in self._by_key[key]:
                if claim.expires_at > now:
                    keep.append(claim)
                else:
                    gone.append((key, claim.accessor))
            if keep:
                self._by_key[key] = keep
            else:
                del self._by_key[key]
        return gone

    def pop_key(self, key: KeyRef) -> list[str]:
        """Forget and return the accessors of every unclaimed copy of ``key``."""
        return [c.accessor for c in self._by_key.pop(key, ())]

    def keys(self) -> list[KeyRef]:
        return sorted(self._by_key)

    def count(self, key: KeyRef | None = None) -> int:
        if key is not None:
            return len(self._by_key.get(key, ()))
        return sum(len(claims) for claims in self._by_key.values())

    def __len__(self) -> int:
        return self.count()


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handout:
    """A wrapped copy, as the worker receives it. ``wrap_token`` stays a Secret until sent."""

    key: KeyRef
    wrap_token: Secret
    wrap_ttl: int
    expires_at: str
    api_key: str
    version: int
    identity: str

    def as_response(self) -> dict[str, object]:
        return {
            "wrap_token": self.wrap_token.reveal(),
            "wrap_ttl": self.wrap_ttl,
            "expires_at": self.expires_at,
            "api_key": self.api_key,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class Signature:
    key: KeyRef
    instruction: str
    headers: Mapping[str, str] = field(repr=False)
    identity: str


@dataclass(frozen=True, slots=True)
class KeyInfo:
    record: KeyRecord
    can_copy: bool
    can_sign: tuple[str, ...]
    identity: str

    def as_response(self) -> dict[str, object]:
        return self.record.as_public_dict() | {
            "grants": {"copy": self.can_copy, "sign": list(self.can_sign)}
        }


# -- the broker --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Loaded:
    record: KeyRecord
    secret: Secret
    signer: Signer | None  # None unless the key is active
    until: float


@dataclass(frozen=True, slots=True)
class _Wrapped:
    info: WrapInfo
    expires_at: str
    version: int
    made_at: float


class _NeedsVault(Exception):
    """A call that must not do I/O would have to ask Vault."""


def _allows(caps: frozenset[str], needed: str) -> bool:
    if "root" in caps:
        return True
    return "deny" not in caps and needed in caps


class Broker:
    """Decides with Vault, hands out wrapped copies and signatures. Thread-safe."""

    def __init__(
        self,
        vault: Vault,
        settings: BrokerSettings,
        *,
        grant_prefix: str,
        clock: Callable[[], float] = time.time,
        prewrap: int = 2,
        on_status: Callable[[KeyRef, Status], None] | None = None,
        on_revoked: Callable[[KeyRef, int], None] | None = None,
    ) -> None:
        """``on_status`` and ``on_revoked`` let the daemon count what the broker notices."""
        self._vault = vault
        self._settings = settings
        self._prefix = grant_prefix.strip("/")
        self._clock = clock
        self._hash_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}
        self._identities: dict[str, tuple[float, str]] = {}
        self._loaded: dict[KeyRef, _Loaded] = {}
        self._last_status: dict[KeyRef, Status] = {}
        self._generations: dict[KeyRef, int] = {}
        self._ledger = Ledger()
        self._prewrap = prewrap
        self._on_status = on_status
        self._on_revoked = on_revoked
        self._spares: dict[KeyRef, list[_Wrapped]] = {}
        self._refilling: dict[KeyRef, int] = {}
        self._copied_at: dict[KeyRef, tuple[float, float]] = {}  # the last two handouts

    # -- grant paths and decisions --------------------------------------------------------

    def copy_path(self, ref: KeyRef) -> str:
        return f"{self._prefix}/{ref.subaccount}/{ref.name}/copy"

    def sign_path(self, ref: KeyRef, instruction: str) -> str:
        return f"{self._prefix}/{ref.subaccount}/{ref.name}/sign/{instruction}"

    def _hash(self, token: Secret) -> str:
        return hashlib.blake2b(
            token.reveal().encode(), key=self._hash_key, digest_size=16
        ).hexdigest()

    def _capabilities(
        self, token: Secret | None, paths: Sequence[str], *, cached_only: bool = False
    ) -> dict[str, frozenset[str]]:
        """What Vault grants the worker's token on each path; cached per (token hash, path)."""
        if token is None or not token:
            raise NotAuthenticated("no Vault token: send X-Vault-Token or Authorization: Bearer")
        digest = self._hash(token)
        now = self._clock()
        found: dict[str, frozenset[str]] = {}
        with self._lock:
            for path in paths:
                cached = self._decisions.get((digest, path))
                if cached is not None and cached[0] > now:
                    found[path] = cached[1]
            identity = self._identities.get(digest)
        missing = [p for p in paths if p not in found]
        known = identity is not None and identity[0] > now
        if cached_only and (missing or not known):
            raise _NeedsVault
        if missing:
            fresh = self._vault.capabilities(token, missing)
            until = self._clock() + self._settings.decision_cache_s
            with self._lock:
                _make_room(self._decisions, now)
                for path, caps in fresh.items():
                    self._decisions[(digest, path)] = (until, caps)
            found.update(fresh)
        if not known:
            name = self._vault.lookup_caller(token).identity
            with self._lock:
                _make_room(self._identities, now)
                self._identities[digest] = (now + _IDENTITY_TTL_S, name)
        return found

    def identity(self, token: Secret | None) -> str:
        """The worker's Vault identity if this token was seen recently, else ``""``; no I/O."""
        if token is None or not token:
            return ""
        with self._lock:
            cached = self._identities.get(self._hash(token))
        return cached[1] if cached else ""

    def _require(
        self,
        token: Secret | None,
        ref: KeyRef,
        path: str,
        needed: str,
        grant: str,
        *,
        cached_only: bool = False,
    ) -> str:
        caps = self._capabilities(token, [path], cached_only=cached_only)[path]
        if not _allows(caps, needed):
            raise NotPermitted(str(ref), grant)
        return self.identity(token)

    def grants(self, token: Secret | None, ref: KeyRef) -> tuple[bool, tuple[str, ...]]:
        """Whether the token may copy ``ref``, and which instructions it may have signed."""
        copy = self.copy_path(ref)
        signs = {self.sign_path(ref, i): i for i in ALL_INSTRUCTIONS}
        caps = self._capabilities(token, [copy, *signs])
        can_sign = tuple(i for p, i in signs.items() if _allows(caps[p], "update"))
        return _allows(caps[copy], "read"), can_sign

    def authorize_any(self, token: Secret | None, ref: KeyRef) -> str:
        """Require a copy grant or any sign grant on ``ref``; return the identity."""
        can_copy, can_sign = self.grants(token, ref)
        if not can_copy and not can_sign:
            raise NotPermitted(str(ref), "copy or sign/<instruction>")
        return self.identity(token)

    # -- keys, cached briefly -------------------------------------------------------------

    def _load(self, ref: KeyRef, *, cached_only: bool = False) -> _Loaded:
        now = self._clock()
        with self._lock:
            cached = self._loaded.get(ref)
            generation = self._generations.get(ref, 0)
        if cached is not None and cached.until > now:
            return cached
        if cached_only:
            raise _NeedsVault
        record, secret = self._vault.read_key(ref)
        active = record.status is Status.ACTIVE
        try:
            signer = Signer(record.api_key, secret) if active else None
        except InvalidInput:  # the stored secret does not derive the stored API key
            log.error(  # noqa: TRY400 - no traceback: it could only show key material
                "broker.key_misconfigured", key=str(ref), version=record.version
            )
            raise KeyNotUsable(str(ref), "misconfigured") from None
        loaded = _Loaded(
            record, secret if active else Secret(""), signer, now + self._settings.secret_cache_s
        )
        with self._lock:
            # A status change reported while we were reading wins over what we read.
            if self._generations.get(ref, 0) == generation:
                self._loaded[ref] = loaded
        self._observe(ref, record.status)
        return loaded

    def _usable(self, ref: KeyRef, *, cached_only: bool = False) -> tuple[_Loaded, int]:
        """The key, if active, and the status generation it was checked against."""
        with self._lock:
            generation = self._generations.get(ref, 0)
        loaded = self._load(ref, cached_only=cached_only)
        loaded.record.require_usable()
        self._check_unchanged(ref, generation)
        return loaded, generation

    def _check_unchanged(self, ref: KeyRef, generation: int) -> None:
        """Refuse when the key became revoked or retired since ``generation`` was read."""
        with self._lock:
            changed = self._generations.get(ref, 0) != generation
            status = self._last_status.get(ref)
        if changed and status is not None and status is not Status.ACTIVE:
            raise KeyNotUsable(str(ref), status.value)

    def _observe(self, ref: KeyRef, status: Status) -> None:
        """Notice a status change made elsewhere (CLI, another replica) when reading the key."""
        with self._lock:
            previous = self._last_status.get(ref)
            self._last_status[ref] = status
            unclaimed = self._ledger.count(ref)
        if status.final and (previous is not status or unclaimed):
            self.on_status_change(ref, status)

    # -- copies ---------------------------------------------------------------------------

    def _wrap(self, ref: KeyRef, loaded: _Loaded) -> _Wrapped:
        """Wrap a copy at Vault and record its accessor in the ledger."""
        record = loaded.record
        now = self._clock()
        expires_at = iso_utc(now + self._settings.copy_ttl)
        wrapped = self._vault.wrap(
            {
                "api_key": record.api_key,
                "api_secret": loaded.secret.reveal(),
                "key": str(ref),
                "version": record.version,
                "read_only": record.read_only,
                "expires_at": expires_at,
            },
            ttl=min(self._settings.wrap_ttl, self._settings.max_wrap_ttl),
        )
        with self._lock:
            self._ledger.record(ref, wrapped.accessor, wrapped.created_at + wrapped.ttl, now=now)
        return _Wrapped(wrapped, expires_at, record.version, now)

    def _take_spare(self, ref: KeyRef, version: int) -> _Wrapped | None:
        """A pre-wrapped copy of this version that still has most of its TTL, if any."""
        now = self._clock()
        with self._lock:
            spares = self._spares.get(ref, [])
            while spares:  # oldest first: it would age out soonest
                spare = spares.pop(0)
                age = now - spare.made_at
                if spare.version == version and 0 <= age <= spare.info.ttl * _SPARE_MAX_AGE:
                    return spare
        return None

    def copy(self, token: Secret | None, ref: KeyRef) -> Handout:
        """A single-use wrapped copy of an active key, for a token granted ``read`` on copy."""
        return self._copy(token, ref, cached_only=False)

    def copy_now(self, token: Secret | None, ref: KeyRef) -> Handout | None:
        """``copy`` answered from memory (cached grant and key, a pre-wrapped copy), or None.

        Never does I/O, so the API may call it on its event loop; None means "ask
        ``copy`` in a thread". Refusals are raised exactly as ``copy`` raises them.
        """
        try:
            return self._copy(token, ref, cached_only=True)
        except _NeedsVault:
            return None

    def _copy(self, token: Secret | None, ref: KeyRef, *, cached_only: bool) -> Handout:
        identity = self._require(
            token, ref, self.copy_path(ref), "read", "copy", cached_only=cached_only
        )
        loaded, generation = self._usable(ref, cached_only=cached_only)
        wrapped = self._take_spare(ref, loaded.record.version)
        now = self._clock()
        with self._lock:
            previous = self._copied_at.get(ref, (float("-inf"), float("-inf")))[1]
            self._copied_at[ref] = (previous, now)
        if wrapped is None:
            if cached_only:
                raise _NeedsVault
            wrapped = self._wrap(ref, loaded)
        try:
            self._check_unchanged(ref, generation)
        except KeyNotUsable:  # revoked or retired while we were wrapping: no copy survives it
            self.revoke_outstanding(ref)
            raise
        age = max(0, int(self._clock() - wrapped.made_at))
        return Handout(
            key=ref,
            wrap_token=wrapped.info.token,
            wrap_ttl=max(1, wrapped.info.ttl - age),
            expires_at=wrapped.expires_at,
            api_key=loaded.record.api_key,
            version=wrapped.version,
            identity=identity,
        )

    def refill(self, ref: KeyRef) -> None:
        """Wrap up to ``prewrap`` spare copies of a key in demand, off the request path.

        The next copy of the key then costs no Vault round trip. A key is in demand
        when its last two copies came within a spare's useful life, so a bot that
        fetches a copy every ten minutes causes no spare wraps. Spares are in the
        ledger like any copy, so a revocation revokes them too; nothing is wrapped
        for a key that is not cached and active.
        """
        useful_s = min(self._settings.wrap_ttl, self._settings.max_wrap_ttl) * _SPARE_MAX_AGE
        with self._lock:
            loaded = self._loaded.get(ref)
            generation = self._generations.get(ref, 0)
            previous, latest = self._copied_at.get(ref, (float("-inf"), float("-inf")))
            wanted = self._prewrap - len(self._spares.get(ref, ())) - self._refilling.get(ref, 0)
            if latest - previous > useful_s:
                wanted = 0
            if wanted > 0:
                self._refilling[ref] = self._refilling.get(ref, 0) + wanted
        if wanted <= 0:
            return
        try:
            for _ in range(wanted):
                if loaded is None or loaded.signer is None or loaded.until <= self._clock():
                    return
                spare = self._wrap(ref, loaded)
                with self._lock:
                    if self._generations.get(ref, 0) == generation:
                        self._spares.setdefault(ref, []).append(spare)
                        continue
                self.revoke_outstanding(ref)  # the status changed meanwhile
                return
        finally:
            with self._lock:
                self._refilling[ref] = max(0, self._refilling.get(ref, 0) - wanted)

    # -- signatures -----------------------------------------------------------------------

    def sign(
        self,
        token: Secret | None,
        ref: KeyRef,
        instruction: str,
        params: Params | None,
        *,
        timestamp: int | None = None,
        window: int | None = None,
    ) -> Signature:
        """The four Backpack headers for one request, for a token granted ``update`` on sign/<i>."""
        return self._sign(token, ref, instruction, params, timestamp, window, cached_only=False)

    def sign_now(
        self,
        token: Secret | None,
        ref: KeyRef,
        instruction: str,
        params: Params | None,
        *,
        timestamp: int | None = None,
        window: int | None = None,
    ) -> Signature | None:
        """``sign`` answered from memory (cached grant and key), or None; never does I/O."""
        try:
            return self._sign(token, ref, instruction, params, timestamp, window, cached_only=True)
        except _NeedsVault:
            return None

    def _sign(
        self,
        token: Secret | None,
        ref: KeyRef,
        instruction: str,
        params: Params | None,
        timestamp: int | None,
        window: int | None,
        *,
        cached_only: bool,
    ) -> Signature:
        if token is None or not token:
            raise NotAuthenticated("no Vault token: send X-Vault-Token or Authorization: Bearer")
        if not isinstance(instruction, str) or not is_known(instruction):
            raise InvalidInput(
                f"instruction {str(instruction)[:64]!r} is not a Backpack instruction this "
                "version knows"
            )
        identity = self._require(
            token,
            ref,
            self.sign_path(ref, instruction),
            "update",
            f"sign/{instruction}",
            cached_only=cached_only,
        )
        loaded, _ = self._usable(ref, cached_only=cached_only)
        if loaded.record.read_only and is_state_changing(instruction):
            raise ReadOnlyKey(str(ref), instruction)
        if loaded.signer is None:  # pragma: no cover - _usable only returns active keys
            raise ServiceError(f"key {ref} has no signer")
        now_ms = int(self._clock() * 1000)
        stamp = now_ms if timestamp is None else timestamp
        if isinstance(stamp, int) and abs(stamp - now_ms) > MAX_TIMESTAMP_SKEW_MS:
            # A signature dated far ahead would outlive a revoked grant or a retired key.
            raise InvalidInput(
                f"timestamp is {(stamp - now_ms) / 1000:+.0f} s from the daemon's clock; "
                f"it must be within {MAX_TIMESTAMP_SKEW_MS // 1000} s (omit it to use now)"
            )
        headers = loaded.signer.headers(
            instruction, params, stamp, DEFAULT_WINDOW_MS if window is None else window
        )
        return Signature(key=ref, instruction=instruction, headers=headers, identity=identity)

    # -- info -----------------------------------------------------------------------------

    def info(self, token: Secret | None, ref: KeyRef) -> KeyInfo:
        """Status and metadata (never the secret), for a token with a copy or any sign grant."""
        can_copy, can_sign = self.grants(token, ref)
        if not can_copy and not can_sign:
            raise NotPermitted(str(ref), "copy or sign/<instruction>")
        record = self._vault.read_record(ref)
        self._observe(ref, record.status)
        return KeyInfo(record, can_copy, can_sign, self.identity(token))

    # -- status changes and the ledger ----------------------------------------------------

    def on_status_change(self, ref: KeyRef, new_status: Status | str) -> int:
        """Drop what is cached for ``ref``; when it is now revoked or retired, revoke its copies.

        Returns how many unclaimed copies were revoked.
        """
        status = Status(new_status)
        with self._lock:
            self._loaded.pop(ref, None)
            self._spares.pop(ref, None)  # still in the ledger: revoked below when final
            self._last_status[ref] = status
            self._generations[ref] = self._generations.get(ref, 0) + 1
        if self._on_status is not None:
            self._on_status(ref, status)
        if status.final:
            log.info("broker.key_unusable", key=str(ref), status=status.value)
            return self.revoke_outstanding(ref)
        return 0

    def revoke_outstanding(self, ref: KeyRef) -> int:
        """Revoke every unclaimed copy of ``ref``; failures stay in the ledger for a retry."""
        with self._lock:
            accessors = self._ledger.pop_key(ref)
        revoked = 0
        failed: list[str] = []
        for accessor in accessors:
            try:
                self._vault.revoke_accessor(accessor)
            except ServiceError as exc:
                failed.append(accessor)
                log.warning("broker.revoke_failed", key=str(ref), error=exc.code)
            else:
                revoked += 1
        if failed:
            retry_until = self._clock() + self._settings.max_wrap_ttl
            with self._lock:
                for accessor in failed:
                    self._ledger.record(ref, accessor, retry_until, now=self._clock())
        if accessors:
            log.info("broker.copies_revoked", key=str(ref), revoked=revoked, failed=len(failed))
        if revoked and self._on_revoked is not None:
            self._on_revoked(ref, revoked)
        return revoked

    def sweep(self) -> None:
        """Forget expired copies; re-read keys with unclaimed copies and act on final statuses.

        Called periodically by the daemon, so that a key retired with the CLI (or
        revoked by another replica) loses its unclaimed copies without waiting for
        a request.
        """
        with self._lock:
            self._ledger.expired(now=self._clock())
            pending = self._ledger.keys()
            stale = [ref for ref, loaded in self._loaded.items() if loaded.until <= self._clock()]
            for ref in stale:
                del self._loaded[ref]
        for ref in pending:
            with self._lock:
                status = self._last_status.get(ref)
            if status is not None and status.final:  # an earlier revocation partly failed
                self.revoke_outstanding(ref)
                continue
            try:
                record = self._vault.read_record(ref)
            except UnknownKey:
                self.on_status_change(ref, Status.RETIRED)  # deleted: nothing may survive it
                continue
            self._observe(ref, record.status)

    @property
    def outstanding(self) -> int:
        """Copies handed out whose wrapping tokens have not expired (claimed or not)."""
        with self._lock:
            return len(self._ledger)

    def clear(self) -> None:
        """Drop every cached secret and decision."""
        with self._lock:
            self._loaded.clear()
            self._spares.clear()
            self._decisions.clear()
            self._identities.clear()


def _make_room(cache: dict[Any, Any], now: float) -> None:
    """Keep a cache bounded: drop expired entries, then the oldest half if still full."""
    if len(cache) < _MAX_CACHED:
        return
    for key in [k for k, v in cache.items() if v[0] <= now]:
        del cache[key]
    if len(cache) >= _MAX_CACHED:
        for key in list(cache)[: len(cache) // 2]:
            del cache[key]
