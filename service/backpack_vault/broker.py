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
#    live at most `secret_cache_s`; a KeyStatusChanged given to `on_event` drops
#    what is cached for the key at once, and a final status (revoked, retired)
#    revokes its unclaimed copies. A copy wrapped while its key stopped being
#    active is revoked rather than handed out.
# 4. A read-only key is never signed for a state-changing instruction, whatever
#    the policy says; a signature's timestamp lies within 60 s of our clock.
# 5. Caches are keyed by a keyed hash of the token (random key per process),
#    never by the token itself, and are bounded in size and age (TTLCache).
# 6. The ledger remembers the accessor of every copy until its wrapping token
#    expires; revoking a key revokes them all. The ledger itself is pure.
# 7. Statuses travel as events. A Vault read here (loading a key, `info`,
#    `sweep`) that finds a status other than the one last known emits
#    KeyStatusChanged(cause=OBSERVED) once; a first sight counts only for a
#    final status, and a read that overlapped an event counts for nothing. A
#    key gone from Vault, found by `sweep`, becomes RETIRED with cause DELETED.
#    Revocations are told as CopiesRevoked. The broker applies every event it
#    emits to itself too, so it needs no wiring, and its own event coming back
#    from the bus is harmless.
# 8. After a handout of a key in demand (two copies within a quarter of the
#    wrap TTL), `refill` wraps up to `prewrap` spare copies ahead of time, so
#    the next copy costs no Vault round trip. A spare is a copy like any other:
#    in the ledger, revoked with its key, handed out once, and only while three
#    quarters of its wrapping TTL are left and no status event came since.
# 9. No I/O here but the VaultPort passed in; time comes from `clock`.
#    `answers_from_memory` tells the API's event loop whether copy or sign would
#    answer (with a result or a refusal) without asking Vault.

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from backpack_vault.backpack.instructions import (
    ENDPOINTS,
    EXTRA_INSTRUCTIONS,
    is_known,
    is_state_changing,
)
from backpack_vault.backpack.signing import DEFAULT_WINDOW_MS, Params, Signer
from backpack_vault.config import BrokerSettings, Secret
from backpack_vault.core.caches import Ledger, TTLCache
from backpack_vault.core.clock import Clock, iso_utc
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
from backpack_vault.events import Cause, CopiesRevoked, Event, KeyRotated, KeyStatusChanged
from backpack_vault.logging import get_logger
from backpack_vault.vault.port import VaultPort, WrapInfo

MAX_TIMESTAMP_SKEW_MS: Final = 60_000

__all__ = ["ALL_INSTRUCTIONS", "Broker", "Handout", "KeyInfo", "Signature"]

log = get_logger("backpack_vault.broker")

ALL_INSTRUCTIONS: Final[tuple[str, ...]] = tuple(
    sorted({e.instruction for e in ENDPOINTS} | EXTRA_INSTRUCTIONS)
)
COPY: Final = "copy"  # the copy grant; a sign grant is "sign/<instruction>"
_SIGN: Final = "sign/"
_IDENTITY_TTL_S: Final = 300.0
_FLIGHT_WAIT_S: Final = 10.0  # how long a request waits for another's question to Vault
# A pre-wrapped copy is handed out only while most of its wrapping TTL is left.
_SPARE_MAX_AGE: Final = 0.25


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


# -- what is kept in memory --------------------------------------------------------------


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
    generation: int  # the key's status generation when wrapped (see _Keys)

    def usable(self, version: int, generation: int, now: float) -> bool:
        """Fit to hand out as a spare: same version, no status event since, most TTL left."""
        fresh = 0 <= now - self.made_at <= self.info.ttl * _SPARE_MAX_AGE
        return fresh and self.version == version and self.generation == generation


def _allows(caps: frozenset[str], needed: str) -> bool:
    if "root" in caps:
        return True
    return "deny" not in caps and needed in caps


def _capability(grant: str) -> str:
    return "read" if grant == COPY else "update"


def _require_token(token: Secret | None) -> Secret:
    if token is None or not token:
        raise NotAuthenticated("no Vault token: send X-Vault-Token or Authorization: Bearer")
    return token


def _is_news(previous: Status | None, status: Status) -> bool:
    """Whether a read of ``status`` tells something: a change, or a first sight of a final one."""
    return previous is not status and (previous is not None or status.final)


@dataclass(slots=True)
class _Flight:
    """One question to Vault that several requests wait for."""

    done: threading.Event = field(default_factory=threading.Event)
    answer: dict[str, frozenset[str]] | None = None


class _Grants:
    """What Vault grants each worker token on grant paths, cached by keyed token hash."""

    def __init__(self, vault: VaultPort, prefix: str, clock: Clock, decision_s: float) -> None:
        self._vault = vault
        self._prefix = prefix
        self._clock = clock
        self._decision_s = decision_s
        self._hash_key = secrets.token_bytes(32)
        self._digest = self._digest_of  # one bound method: Secret.derived knows it again
        self._lock = threading.Lock()
        self.decisions: TTLCache[tuple[str, str], frozenset[str]] = TTLCache()
        self._flights: dict[tuple[str, tuple[str, ...]], _Flight] = {}
        self.identities: TTLCache[str, str] = TTLCache()

    def path(self, ref: KeyRef, grant: str) -> str:
        return f"{self._prefix}/{ref.subaccount}/{ref.name}/{grant}"

    def _hash(self, token: Secret) -> str:
        return token.derived(self._digest)  # once per request, however often it is asked

    def _digest_of(self, value: str) -> str:
        return hashlib.blake2b(value.encode(), key=self._hash_key, digest_size=16).hexdigest()

    def cached(self, token: Secret, path: str) -> frozenset[str] | None:
        """The decision on ``path``, if both it and the token's identity are in memory."""
        digest, now = self._hash(token), self._clock()
        with self._lock:
            if self.identities.get(digest, now=now) is None:
                return None
            return self.decisions.get((digest, path), now=now)

    def ask(self, token: Secret | None, paths: Sequence[str]) -> dict[str, frozenset[str]]:
        """What Vault grants the token on each path, from memory or else from Vault."""
        token = _require_token(token)
        digest, now = self._hash(token), self._clock()
        found: dict[str, frozenset[str]] = {}
        with self._lock:
            for path in paths:
                caps = self.decisions.get((digest, path), now=now)
                if caps is not None:
                    found[path] = caps
            known = self.identities.get(digest, now=now) is not None
        missing = [p for p in paths if p not in found]
        if missing:
            found.update(self._decide(token, digest, missing))
        if not known:
            name = self._vault.lookup_caller(token).identity
            with self._lock:
                self.identities.put(digest, name, until=now + _IDENTITY_TTL_S, now=now)
        return found

    def _decide(self, token: Secret, digest: str, paths: list[str]) -> dict[str, frozenset[str]]:
        """Vault's decisions on ``paths``, asked once however many requests need them.

        When a decision expires under load, every request in flight misses it at the
        same moment: one asks Vault, the others wait for its answer (at most
        ``_FLIGHT_WAIT_S``) and ask Vault themselves only if it brought none.
        """
        key = (digest, tuple(paths))
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if leader:
            try:
                flight.answer = self._ask_vault(token, digest, paths)
                return flight.answer
            finally:
                with self._lock:
                    del self._flights[key]
                flight.done.set()
        flight.done.wait(_FLIGHT_WAIT_S)
        if flight.answer is not None:
            return flight.answer
        return self._ask_vault(token, digest, paths)  # the one asked failed: its error was its own

    def _ask_vault(self, token: Secret, digest: str, paths: list[str]) -> dict[str, frozenset[str]]:
        fresh = self._vault.capabilities(token, paths)
        now = self._clock()
        with self._lock:
            for path, caps in fresh.items():
                self.decisions.put((digest, path), caps, until=now + self._decision_s, now=now)
        return fresh

    def require(self, token: Secret | None, ref: KeyRef, grant: str) -> str:
        """Refuse unless the token holds ``grant`` on ``ref``; return the caller's identity."""
        path = self.path(ref, grant)
        capability = _capability(grant)
        if not _allows(self.ask(token, [path])[path], capability):
            raise NotPermitted(
                str(ref),
                grant,
                f"your Vault token has no grant for {grant} on key {ref}: its policies need "
                f'capabilities = ["{capability}"] on {path}',
            )
        return self.identity(token)

    def grants(self, token: Secret | None, ref: KeyRef) -> tuple[bool, tuple[str, ...]]:
        copy = self.path(ref, COPY)
        signs = {self.path(ref, f"{_SIGN}{i}"): i for i in ALL_INSTRUCTIONS}
        caps = self.ask(token, [copy, *signs])
        can_sign = tuple(i for p, i in signs.items() if _allows(caps[p], "update"))
        return _allows(caps[copy], "read"), can_sign

    def require_any(self, token: Secret | None, ref: KeyRef) -> tuple[bool, tuple[str, ...]]:
        """``grants``, refusing a token that holds neither a copy nor any sign grant."""
        can_copy, can_sign = self.grants(token, ref)
        if not can_copy and not can_sign:
            raise NotPermitted(
                str(ref),
                "copy or sign/<instruction>",
                f"your Vault token has no grant on key {ref}: its policies need "
                f'capabilities = ["read"] on {self.path(ref, COPY)} or ["update"] on '
                f"{self.path(ref, _SIGN)}<instruction>",
            )
        return can_copy, can_sign

    def identity(self, token: Secret | None) -> str:
        if token is None or not token:
            return ""
        with self._lock:
            return self.identities.get(self._hash(token), now=self._clock()) or ""

    def clear(self) -> None:
        with self._lock:
            self.decisions.clear()
            self.identities.clear()


class _Keys:
    """Keys read from Vault, cached briefly, and the status last known of each.

    Every status event bumps the key's generation: a read that started before
    the event is older than the event, so it neither caches nor counts as news.
    """

    def __init__(self, vault: VaultPort, clock: Clock, secret_cache_s: float) -> None:
        self._vault = vault
        self._clock = clock
        self._secret_cache_s = secret_cache_s
        self._lock = threading.Lock()
        self.loaded: TTLCache[KeyRef, _Loaded] = TTLCache()
        # Only keys read from Vault or named by an event: bounded by the keys that exist.
        self._known: dict[KeyRef, Status] = {}
        self._generations: dict[KeyRef, int] = {}

    def cached(self, ref: KeyRef) -> tuple[_Loaded | None, int]:
        with self._lock:
            return self.loaded.get(ref, now=self._clock()), self._generations.get(ref, 0)

    def read(self, ref: KeyRef) -> _Loaded:
        """The key as Vault has it now, with a signer when it is active; not cached yet."""
        record, secret = self._vault.read_key(ref)
        active = record.status is Status.ACTIVE
        try:
            signer = Signer(record.api_key, secret) if active else None
        except InvalidInput:  # the stored secret does not derive the stored API key
            log.error(  # noqa: TRY400 - no traceback: it could only show key material
                "broker.key_misconfigured", key=str(ref), version=record.version
            )
            raise KeyNotUsable(str(ref), "misconfigured") from None
        until = self._clock() + self._secret_cache_s
        return _Loaded(record, secret if active else Secret(""), signer, until)

    def generation(self, ref: KeyRef) -> int:
        with self._lock:
            return self._generations.get(ref, 0)

    def known(self, ref: KeyRef) -> Status | None:
        with self._lock:
            return self._known.get(ref)

    def set_since(self, ref: KeyRef, generation: int) -> Status | None:
        """The status an event set after ``generation``, or None when no event came."""
        with self._lock:
            if self._generations.get(ref, 0) == generation:
                return None
            return self._known.get(ref)

    def note(
        self, ref: KeyRef, generation: int, status: Status, loaded: _Loaded | None
    ) -> tuple[bool, Status | None]:
        """Remember what a read found (caching ``loaded`` unless it is news).

        Returns whether the read is current (no event since ``generation``) and
        the status known before it.
        """
        with self._lock:
            if self._generations.get(ref, 0) != generation:
                return False, None
            previous = self._known.get(ref)
            self._known[ref] = status
            if loaded is not None and not _is_news(previous, status):
                self.loaded.put(ref, loaded, until=loaded.until, now=self._clock())
            return True, previous

    def apply(self, ref: KeyRef, status: Status) -> Status | None:
        """A status event: forget the cached key, remember ``status``; return the one before."""
        with self._lock:
            self.loaded.pop(ref)
            previous = self._known.get(ref)
            self._known[ref] = status
            self._generations[ref] = self._generations.get(ref, 0) + 1
            return previous

    def expire(self) -> None:
        with self._lock:
            self.loaded.expire(now=self._clock())

    def clear(self) -> None:
        with self._lock:
            self.loaded.clear()


class _Copies:
    """Copies handed out: the ledger of unclaimed ones, spares wrapped ahead, and demand."""

    def __init__(self, clock: Clock, *, demand_s: float, keep_s: float) -> None:
        self._clock = clock
        self._demand_s = demand_s  # two handouts this close make a key in demand
        self._keep_s = keep_s  # how long a handout is remembered for that
        self._lock = threading.Lock()
        self._ledger: Ledger[KeyRef] = Ledger()
        self._spares: TTLCache[KeyRef, tuple[_Wrapped, ...]] = TTLCache()  # oldest first
        self._handouts: TTLCache[KeyRef, tuple[float, float]] = TTLCache()  # the last two
        self._refilling: dict[KeyRef, int] = {}

    def record(self, ref: KeyRef, wrapped: _Wrapped) -> None:
        info = wrapped.info
        with self._lock:
            self._ledger.record(ref, info.accessor, info.created_at + info.ttl, now=self._clock())

    def handed_out(self, ref: KeyRef) -> None:
        now = self._clock()
        with self._lock:
            last = self._handouts.get(ref, now=now)
            previous = float("-inf") if last is None else last[1]
            self._handouts.put(ref, (previous, now), until=now + self._keep_s, now=now)

    def has_spare(self, ref: KeyRef, version: int, generation: int) -> bool:
        now = self._clock()
        with self._lock:
            spares = self._spares.get(ref, now=now) or ()
            return any(s.usable(version, generation, now) for s in spares)

    def take_spare(self, ref: KeyRef, version: int, generation: int) -> _Wrapped | None:
        """The oldest usable spare (it would age out soonest); the unusable ones before it go."""
        now = self._clock()
        with self._lock:
            spares = list(self._spares.pop(ref) or ())
            while spares:
                spare = spares.pop(0)
                if spare.usable(version, generation, now):
                    if spares:
                        self._put_spares(ref, tuple(spares))
                    return spare
        return None

    def add_spare(self, ref: KeyRef, spare: _Wrapped) -> None:
        with self._lock:
            self._put_spares(ref, (*(self._spares.get(ref, now=self._clock()) or ()), spare))

    def _put_spares(self, ref: KeyRef, spares: tuple[_Wrapped, ...]) -> None:
        newest = spares[-1]
        until = newest.made_at + newest.info.ttl * _SPARE_MAX_AGE
        self._spares.put(ref, spares, until=until, now=self._clock())

    def reserve(self, ref: KeyRef, prewrap: int) -> int:
        """How many spares to wrap now: none unless the key is in demand. Counted as in flight."""
        now = self._clock()
        with self._lock:
            last = self._handouts.get(ref, now=now)
            if last is None or last[1] - last[0] > self._demand_s:
                return 0
            have = len(self._spares.get(ref, now=now) or ())
            wanted = prewrap - have - self._refilling.get(ref, 0)
            if wanted > 0:
                self._refilling[ref] = self._refilling.get(ref, 0) + wanted
            return wanted

    def release(self, ref: KeyRef, count: int) -> None:
        with self._lock:
            left = self._refilling.pop(ref, 0) - count
            if left > 0:
                self._refilling[ref] = left

    def drop_spares(self, ref: KeyRef) -> None:
        with self._lock:
            self._spares.pop(ref)  # they stay in the ledger

    def pop_unclaimed(self, ref: KeyRef) -> list[str]:
        with self._lock:
            return self._ledger.pop_key(ref)

    def keep_unclaimed(self, ref: KeyRef, accessors: Sequence[str], until: float) -> None:
        with self._lock:
            for accessor in accessors:
                self._ledger.record(ref, accessor, until, now=self._clock())

    def expire(self) -> list[KeyRef]:
        """Forget what expired (copies, spares, handouts); return the keys with unclaimed copies."""
        now = self._clock()
        with self._lock:
            self._ledger.expired(now=now)
            self._spares.expire(now=now)
            self._handouts.expire(now=now)
            return sorted(self._ledger.keys())

    def unclaimed(self, ref: KeyRef | None = None) -> int:
        with self._lock:
            return self._ledger.count(ref)

    def unclaimed_by_key(self) -> dict[KeyRef, int]:
        with self._lock:
            return {ref: self._ledger.count(ref) for ref in self._ledger.keys()}  # noqa: SIM118

    def clear_spares(self) -> None:
        with self._lock:
            self._spares.clear()


class _Statuses:
    """Status changes as the broker meets them: events in and out, and the revocations due."""

    def __init__(
        self,
        vault: VaultPort,
        keys: _Keys,
        copies: _Copies,
        *,
        clock: Clock,
        emit: Callable[[Event], None] | None,
        retry_s: float,
    ) -> None:
        self._vault = vault
        self._keys = keys
        self._copies = copies
        self._clock = clock
        self._emit = emit
        self._retry_s = retry_s  # how long a failed revocation stays in the ledger for a retry

    def on_event(self, event: Event) -> None:
        if isinstance(event, KeyRotated):
            # The name points to another key: nothing cached of the old one is handed out
            # again. After a failover the old key is revoked, so are its unclaimed copies.
            self._keys.apply(event.ref, Status.ACTIVE)
            self._copies.drop_spares(event.ref)
            log.info("broker.key_rotated", key=str(event.ref), failover=event.failover)
            if event.failover:
                self.revoke(event.ref)
            return
        if not isinstance(event, KeyStatusChanged):
            return
        ref, status = event.ref, event.new
        previous = self._keys.apply(ref, status)
        self._copies.drop_spares(ref)  # still in the ledger: revoked below when final
        if status.final:
            if previous is not status:
                log.info("broker.key_unusable", key=str(ref), status=status.value)
            self.revoke(ref)

    def publish(self, event: Event) -> None:
        """Emit ``event``, then apply it here too, so that nothing depends on the wiring."""
        if self._emit is not None:
            self._emit(event)
        self.on_event(event)

    def observe(
        self, ref: KeyRef, record: KeyRecord, generation: int, loaded: _Loaded | None = None
    ) -> None:
        """Act on the status a Vault read found; cache ``loaded`` unless that status is news."""
        current, previous = self._keys.note(ref, generation, record.status, loaded)
        if not current:
            return  # an event came during the read: it is newer than what we read
        if _is_news(previous, record.status):
            log.info(
                "broker.status_observed",
                key=str(ref),
                old=previous.value if previous else None,
                new=record.status.value,
            )
            self.publish(
                KeyStatusChanged(ref, previous, record.status, Cause.OBSERVED, record=record)
            )
        elif record.status.final and self._copies.unclaimed(ref):
            self.revoke(ref)  # an earlier revocation partly failed

    def revoke(self, ref: KeyRef) -> int:
        accessors = self._copies.pop_unclaimed(ref)
        if not accessors:
            return 0
        failed: list[str] = []
        for accessor in accessors:
            try:
                self._vault.revoke_accessor(accessor)
            except ServiceError as exc:
                failed.append(accessor)
                log.warning("broker.revoke_failed", key=str(ref), error=exc.code)
        if failed:
            self._copies.keep_unclaimed(ref, failed, until=self._clock() + self._retry_s)
        revoked = len(accessors) - len(failed)
        log.info("broker.copies_revoked", key=str(ref), revoked=revoked, failed=len(failed))
        if revoked:
            self.publish(CopiesRevoked(ref, revoked))
        return revoked

    def sweep(self) -> None:
        self._keys.expire()
        for ref in self._copies.expire():
            known = self._keys.known(ref)
            if known is not None and known.final:  # an earlier revocation partly failed
                self.revoke(ref)
                continue
            generation = self._keys.generation(ref)
            try:
                record = self._vault.read_record(ref)
            except UnknownKey:  # deleted: nothing may survive it
                self.publish(KeyStatusChanged(ref, known, Status.RETIRED, Cause.DELETED))
                continue
            self.observe(ref, record, generation)


# -- the broker --------------------------------------------------------------------------


class Broker:
    """Decides with Vault, hands out wrapped copies and signatures. Thread-safe."""

    def __init__(
        self,
        vault: VaultPort,
        settings: BrokerSettings,
        *,
        grant_prefix: str,
        clock: Clock = time.time,
        prewrap: int = 2,
        emit: Callable[[Event], None] | None = None,
    ) -> None:
        """``emit`` hands the events the broker notices to the daemon's bus (see Rules 7)."""
        self._vault = vault
        self._settings = settings
        self._clock = clock
        self._prewrap = prewrap
        self._wrap_ttl = min(settings.wrap_ttl, settings.max_wrap_ttl)
        spare_life_s = self._wrap_ttl * _SPARE_MAX_AGE
        self._grants = _Grants(vault, grant_prefix.strip("/"), clock, settings.decision_cache_s)
        self._keys = _Keys(vault, clock, settings.secret_cache_s)
        # A handout older than the cached key cannot lead to a spare: refill needs the key.
        self._copies = _Copies(
            clock, demand_s=spare_life_s, keep_s=max(spare_life_s, settings.secret_cache_s)
        )
        self._statuses = _Statuses(
            vault,
            self._keys,
            self._copies,
            clock=clock,
            emit=emit,
            retry_s=settings.max_wrap_ttl,
        )

    # -- grants ---------------------------------------------------------------------------

    def copy_path(self, ref: KeyRef) -> str:
        return self._grants.path(ref, COPY)

    def sign_path(self, ref: KeyRef, instruction: str) -> str:
        return self._grants.path(ref, f"{_SIGN}{instruction}")

    def grants(self, token: Secret | None, ref: KeyRef) -> tuple[bool, tuple[str, ...]]:
        """Whether the token may copy ``ref``, and which instructions it may have signed."""
        return self._grants.grants(token, ref)

    def authorize_any(self, token: Secret | None, ref: KeyRef) -> str:
        """Require a copy grant or any sign grant on ``ref``; return the identity."""
        self._grants.require_any(token, ref)
        return self.identity(token)

    def identity(self, token: Secret | None) -> str:
        """The worker's Vault identity if this token was seen recently, else ``""``; no I/O."""
        return self._grants.identity(token)

    def answers_from_memory(self, token: Secret | None, ref: KeyRef, grant: str) -> bool:
        """Whether ``copy`` (grant ``"copy"``) or ``sign`` (``"sign/<instruction>"``) would
        answer, with a result or a refusal, without asking Vault. Never does I/O.

        The API asks on its event loop and calls copy or sign there when True, in a
        thread otherwise. Should a concurrent copy take the last spare in between,
        that copy wraps at Vault after all: still correct, just not from memory.
        """
        return self._from_memory(token, ref, grant) is not None

    def serves_from_memory(self, token: Secret | None, ref: KeyRef, grant: str) -> bool:
        """Whether ``copy`` or ``sign`` would hand over from memory: granted, the key cached
        and active, and for a copy a spare. A refusal is False, as is a question for
        Vault. Never does I/O. (A signature can still be refused by its own request: a
        timestamp off the clock, a read-only key asked for a state-changing instruction.)
        """
        return self._from_memory(token, ref, grant) is True

    def _from_memory(self, token: Secret | None, ref: KeyRef, grant: str) -> bool | None:
        """True: answered from memory; False: refused from memory; None: Vault is needed."""
        if grant != COPY and not grant.startswith(_SIGN):
            raise ValueError(f"grant must be {COPY!r} or '{_SIGN}<instruction>', not {grant!r}")
        if token is None or not token or (grant != COPY and not is_known(grant[len(_SIGN) :])):
            return False  # refused before any question to Vault
        caps = self._grants.cached(token, self._grants.path(ref, grant))
        if caps is None:
            return None
        if not _allows(caps, _capability(grant)):
            return False
        loaded, generation = self._keys.cached(ref)
        if loaded is None:
            return None
        if loaded.signer is None:
            return False  # a key that is not active is refused
        # Signing needs nothing more; a copy needs a spare, or else Vault to wrap one.
        spare = grant == COPY and self._copies.has_spare(ref, loaded.record.version, generation)
        return True if grant != COPY or spare else None

    # -- keys, cached briefly -------------------------------------------------------------

    def _load(self, ref: KeyRef) -> _Loaded:
        cached, generation = self._keys.cached(ref)
        if cached is not None:
            return cached
        loaded = self._keys.read(ref)
        self._statuses.observe(ref, loaded.record, generation, loaded)
        return loaded

    def _usable(self, ref: KeyRef) -> tuple[_Loaded, int]:
        """The key, if active, and the status generation it was checked against."""
        generation = self._keys.generation(ref)
        loaded = self._load(ref)
        loaded.record.require_usable()
        self._check_unchanged(ref, generation)
        return loaded, generation

    def _check_unchanged(self, ref: KeyRef, generation: int) -> None:
        """Refuse when an event since ``generation`` made the key anything but active."""
        status = self._keys.set_since(ref, generation)
        if status is not None and status is not Status.ACTIVE:
            raise KeyNotUsable(str(ref), status.value)

    # -- copies ---------------------------------------------------------------------------

    def copy(self, token: Secret | None, ref: KeyRef) -> Handout:
        """A single-use wrapped copy of an active key, for a token granted ``read`` on copy."""
        identity = self._grants.require(token, ref, COPY)
        self._copies.handed_out(ref)
        for attempt in range(2):
            loaded, generation = self._usable(ref)
            spare = self._copies.take_spare(ref, loaded.record.version, generation)
            wrapped = spare if spare is not None else self._wrap(ref, loaded, generation)
            try:
                self._check_unchanged(ref, generation)
            except KeyNotUsable:  # revoked or retired while we were wrapping: no copy survives it
                self.revoke_outstanding(ref)
                raise
            if attempt or self._keys.set_since(ref, generation) is None:
                break
            # The name switched to another key while we wrapped (a rotation or a failover):
            # this copy may hold the old key. It is revoked, and the copy made again.
            self._discard(ref, wrapped)
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

    def _discard(self, ref: KeyRef, wrapped: _Wrapped) -> None:
        try:
            self._vault.revoke_accessor(wrapped.info.accessor)
        except ServiceError as exc:  # it stays in the ledger: revoked with the key if need be
            log.warning("broker.revoke_failed", key=str(ref), error=exc.code)

    def _wrap(self, ref: KeyRef, loaded: _Loaded, generation: int) -> _Wrapped:
        """Wrap a copy at Vault and record its accessor in the ledger."""
        record = loaded.record
        now = self._clock()
        expires_at = iso_utc(now + self._settings.copy_ttl)
        info = self._vault.wrap(
            {
                "api_key": record.api_key,
                "api_secret": loaded.secret.reveal(),
                "key": str(ref),
                "version": record.version,
                "read_only": record.read_only,
                "expires_at": expires_at,
            },
            ttl=self._wrap_ttl,
        )
        wrapped = _Wrapped(info, expires_at, record.version, now, generation)
        self._copies.record(ref, wrapped)
        return wrapped

    def refill(self, ref: KeyRef) -> None:
        """Wrap up to ``prewrap`` spare copies of a key in demand, off the request path.

        The next copy of the key then costs no Vault round trip. A key is in demand
        when its last two copies came within a spare's useful life, so a bot that
        fetches a copy every ten minutes causes no spare wraps. Spares are in the
        ledger like any copy, so a revocation revokes them too; nothing is wrapped
        for a key that is not cached and active.
        """
        loaded, generation = self._keys.cached(ref)
        wanted = self._copies.reserve(ref, self._prewrap)
        if wanted <= 0:
            return
        try:
            for _ in range(wanted):
                if loaded is None or loaded.signer is None or loaded.until <= self._clock():
                    return
                spare = self._wrap(ref, loaded, generation)
                try:
                    self._check_unchanged(ref, generation)
                except KeyNotUsable:  # revoked or retired meanwhile: the spare must not survive
                    self.revoke_outstanding(ref)
                    return
                self._copies.add_spare(ref, spare)
        finally:
            self._copies.release(ref, wanted)

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
        _require_token(token)
        if not isinstance(instruction, str) or not is_known(instruction):
            raise InvalidInput(
                f"instruction {str(instruction)[:64]!r} is not a Backpack instruction this "
                "version knows"
            )
        identity = self._grants.require(token, ref, f"{_SIGN}{instruction}")
        loaded, _ = self._usable(ref)
        if loaded.record.read_only and is_state_changing(instruction):
            raise ReadOnlyKey(str(ref), instruction)
        if loaded.signer is None:  # pragma: no cover - _usable only returns active keys
            raise ServiceError(f"key {ref} has no signer")
        stamp = _timestamp(timestamp, now_ms=int(self._clock() * 1000))
        headers = loaded.signer.headers(
            instruction, params, stamp, DEFAULT_WINDOW_MS if window is None else window
        )
        return Signature(key=ref, instruction=instruction, headers=headers, identity=identity)

    # -- info -----------------------------------------------------------------------------

    def info(self, token: Secret | None, ref: KeyRef) -> KeyInfo:
        """Status and metadata (never the secret), for a token with a copy or any sign grant."""
        can_copy, can_sign = self._grants.require_any(token, ref)
        generation = self._keys.generation(ref)
        record = self._vault.read_record(ref)
        self._statuses.observe(ref, record, generation)
        return KeyInfo(record, can_copy, can_sign, self.identity(token))

    # -- status events and the ledger -----------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Listen to status changes: drop what is cached for the key; revoke on a final status.

        Applying the same event twice does no more than applying it once.
        """
        self._statuses.on_event(event)

    def revoke_outstanding(self, ref: KeyRef) -> int:
        """Revoke every unclaimed copy of ``ref``; failures stay in the ledger for a retry.

        Returns how many were revoked, and emits CopiesRevoked when any were.
        """
        return self._statuses.revoke(ref)

    def sweep(self) -> None:
        """Forget expired copies; re-read keys with unclaimed copies and act on their status.

        Called periodically by the daemon, so that a key retired with the CLI (or
        revoked by another replica, or deleted) loses its unclaimed copies without
        waiting for a request.
        """
        self._statuses.sweep()

    @property
    def outstanding(self) -> int:
        """Copies handed out whose wrapping tokens have not expired (claimed or not)."""
        return self._copies.unclaimed()

    def outstanding_by_key(self) -> dict[KeyRef, int]:
        """Unexpired copies per key (for the operator page)."""
        return self._copies.unclaimed_by_key()

    def clear(self) -> None:
        """Drop every cached secret, spare and decision."""
        self._keys.clear()
        self._copies.clear_spares()
        self._grants.clear()


def _timestamp(requested: int | None, *, now_ms: int) -> int:
    """The signature's timestamp: now, or the one asked for if it lies within the skew."""
    stamp = now_ms if requested is None else requested
    if isinstance(stamp, int) and abs(stamp - now_ms) > MAX_TIMESTAMP_SKEW_MS:
        # A signature dated far ahead would outlive a revoked grant or a retired key.
        raise InvalidInput(
            f"timestamp is {(stamp - now_ms) / 1000:+.0f} s from the daemon's clock; "
            f"it must be within {MAX_TIMESTAMP_SKEW_MS // 1000} s (omit it to use now)"
        )
    return stamp
