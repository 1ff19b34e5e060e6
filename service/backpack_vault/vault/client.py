"""The one module that talks to Vault (and the only ``import hvac``).

It returns frozen records and raises only backpack-vault errors: hvac and
requests exceptions are mapped to the most specific match and raised ``from
None`` so that no response body (which may echo request data) rides along.
Every call passes an explicit token: hvac would otherwise fall back to
``VAULT_TOKEN`` and ``~/.vault-token``.

Layout: the secret of key ``SUB/NAME`` is KV v2 data at
``<kv_mount>/<kv_prefix>/SUB/NAME`` holding exactly ``api_key`` and
``api_secret``; everything else is custom_metadata (see ``keys.KeyRecord``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final, NoReturn

import hvac
import hvac.exceptions
import hvac.utils
import requests
import requests.adapters

from backpack_vault.config import Secret, VaultSettings, read_secret_file
from backpack_vault.core.clock import iso_utc
from backpack_vault.core.keys import KeyRecord, KeyRef, Status, can_transition, next_refusal
from backpack_vault.core.rotation import NEXT_FIELDS, NextKey
from backpack_vault.errors import (
    ConfigError,
    NotAuthenticated,
    NotPermitted,
    ServiceError,
    UnknownKey,
    UpstreamError,
    VaultDenied,
    VaultUnavailable,
    WriteConflict,
)
from backpack_vault.logging import get_logger
from backpack_vault.vault.port import (
    FEED_DOCUMENT,
    FEED_KEEP,
    Change,
    ChangeFeed,
    TokenInfo,
    WrapInfo,
)
from backpack_vault.wire import Pool, WireError, WireTimeout

log = get_logger("backpack_vault.vault")

_FEED_WRITE_ATTEMPTS: Final = 8
_MAX_META_VALUE: Final = 512  # Vault's limit on one custom_metadata value
_POOL_SIZE: Final = 40  # kept connections to Vault (each path): the API thread pool's size

__all__ = ["Capabilities", "Provisioner", "TokenInfo", "Vault", "WrapInfo"]

Capabilities = Mapping[str, frozenset[str]]

_TRANSIENT: Final = (
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.RateLimitExceeded,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.UnexpectedError,
    requests.ConnectionError,
    requests.Timeout,
)


def _fail(
    exc: BaseException, op: str, where: str, *, addr: str = "", caller_token: bool = False
) -> NoReturn:
    """Raise our error for a Vault failure, without its body. ``where`` is a path, not data;
    ``addr`` is the Vault it was sent to, so every message names the address tried."""
    if addr:
        where = f"{where} at {addr}"
    if isinstance(exc, hvac.exceptions.VaultDown):
        raise VaultUnavailable(f"Vault is sealed or down ({op} {where})") from None
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        raise VaultUnavailable(
            f"Vault is unreachable ({op} {where}): {type(exc).__name__}"
        ) from None
    if isinstance(exc, _TRANSIENT):
        raise VaultUnavailable(f"Vault failed ({op} {where}): {type(exc).__name__}") from None
    if isinstance(exc, (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized)):
        if caller_token and _acl_denial(exc):
            raise NotPermitted(
                "",
                where,
                f"Vault accepts your token but its policies do not allow {where}: give it "
                "Vault's `default` policy (update on sys/capabilities-self, read on "
                "auth/token/lookup-self), which the daemon needs to check your grants",
            ) from None
        if caller_token:
            raise NotAuthenticated(
                "Vault does not accept your token (expired, revoked or unknown): log in "
                "to Vault again for a new token"
            ) from None
        raise VaultDenied(
            f"Vault denied {op} on {where}: check the token's policy (or log in again)"
        ) from None
    if isinstance(exc, hvac.exceptions.VaultError):
        raise UpstreamError(f"Vault refused {op} on {where}: {type(exc).__name__}") from None
    # Any other requests error: its text may quote a URL or a header, so keep only its type.
    raise VaultUnavailable(f"Vault call failed ({op} {where}): {type(exc).__name__}") from None


def _acl_denial(exc: BaseException) -> bool:
    """Vault says "1 error occurred: permission denied" for a live token that a policy
    refuses, and a bare "permission denied" for a dead or unknown token (VAULT.md 4)."""
    errors = getattr(exc, "errors", None) or ()
    return any("error occurred" in str(e) for e in errors)


class _Missing(Exception):
    pass


@contextlib.contextmanager
def _calling(
    op: str,
    where: str,
    *,
    addr: str = "",
    caller_token: bool = False,
    missing: Callable[[], Exception] | None = None,
    refused: Callable[[], Exception] | None = None,
) -> Iterator[None]:
    """Translate hvac/requests failures; ``missing`` maps 404, ``refused`` maps 400."""
    try:
        yield
    except ServiceError:
        raise
    except hvac.exceptions.InvalidPath as exc:
        if missing is None:
            _fail(exc, op, where, addr=addr, caller_token=caller_token)
        raise missing() from None
    except hvac.exceptions.InvalidRequest as exc:
        if refused is None:
            _fail(exc, op, where, addr=addr, caller_token=caller_token)
        raise refused() from None
    except (hvac.exceptions.VaultError, requests.RequestException) as exc:
        _fail(exc, op, where, addr=addr, caller_token=caller_token)


class Vault:
    """A Vault client for one daemon or CLI identity, plus calls made with a worker's token."""

    def __init__(
        self,
        settings: VaultSettings,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._session = session or requests.Session()
        self._verify: bool | str = settings.cacert or True
        # hvac hands our session's own `verify` to requests, so the CA bundle goes there.
        self._session.verify = self._verify
        self._client = self._new_client(Secret(""))
        self._token_info: TokenInfo | None = None
        self._mount = settings.kv_mount.strip("/")
        self._prefix = settings.kv_prefix.strip("/")
        self._direct: _Direct | None = None  # the hot calls' lean path (for_service)

    def _new_client(self, token: Secret) -> Any:
        return hvac.Client(
            url=self.settings.addr,
            token=token.reveal(),
            verify=self._verify,
            timeout=self.settings.timeout,
            namespace=self.settings.namespace,
            session=self._session,
        )

    def _at(self, op: str, where: str, **options: Any) -> contextlib.AbstractContextManager[None]:
        """Translate failures of one call, naming this Vault's address in the message."""
        return _calling(op, where, addr=self.settings.addr, **options)

    # -- authentication ---------------------------------------------------------------

    @property
    def token_info(self) -> TokenInfo | None:
        return self._token_info

    def login(self) -> TokenInfo:
        """Authenticate with the configured method; return what Vault says of the token."""
        s = self.settings
        with self._at("login", s.auth):
            if s.auth == "token":
                if not s.token:
                    raise ConfigError(
                        "no Vault token: set VAULT_TOKEN (or choose BACKPACK_VAULT_AUTH)"
                    )
                self._client.token = s.token.reveal()
            elif s.auth == "token-file":
                self._client.token = read_secret_file(
                    s.token_file, "BACKPACK_VAULT_TOKEN_FILE"
                ).reveal()
            elif s.auth == "approle":
                if not s.approle_role_id:
                    raise ConfigError("AppRole login needs BACKPACK_VAULT_APPROLE_ROLE_ID")
                secret_id = (
                    s.approle_secret_id.reveal()
                    if s.approle_secret_id
                    else read_secret_file(
                        s.approle_secret_id_file, "BACKPACK_VAULT_APPROLE_SECRET_ID(_FILE)"
                    ).reveal()
                )
                self._client.auth.approle.login(
                    role_id=s.approle_role_id,
                    secret_id=secret_id,
                    mount_point=s.auth_mount or "approle",
                )
            elif s.auth == "kubernetes":
                if not s.kubernetes_role:
                    raise ConfigError("Kubernetes login needs BACKPACK_VAULT_KUBERNETES_ROLE")
                jwt = read_secret_file(
                    s.kubernetes_jwt_file, "BACKPACK_VAULT_KUBERNETES_JWT_FILE"
                ).reveal()
                self._client.auth.kubernetes.login(
                    role=s.kubernetes_role, jwt=jwt, mount_point=s.auth_mount or "kubernetes"
                )
            else:  # pragma: no cover - config validates the choice
                raise ConfigError(f"unknown auth method {s.auth}")
        return self.lookup_self()

    def lookup_self(self) -> TokenInfo:
        with self._at("lookup-self", "auth/token/lookup-self"):
            data = self._client.auth.token.lookup_self()["data"]
        self._token_info = self._token_from(data)
        return self._token_info

    def renew(self, increment: int | None = None) -> TokenInfo:
        """Renew our token; a token that cannot be renewed is logged in again."""
        info = self._token_info
        if info is not None and info.renewable:
            try:
                with self._at("renew-self", "auth/token/renew-self"):
                    self._client.auth.token.renew_self(increment=increment)
                return self.lookup_self()
            except (VaultDenied, UpstreamError) as exc:
                if isinstance(exc, VaultUnavailable):
                    raise
        return self.login()

    def needs_renewal(self, fraction: float = 1 / 3) -> bool:
        """True when less than ``fraction`` of the token's last known TTL remains."""
        info = self._token_info
        if info is None:
            return True
        if info.expires_at is None:
            return False
        if not info.renewable and self.settings.auth == "token":
            return False  # a fixed token cannot be renewed or replaced: nothing to do until it ends
        return info.expires_at - self._clock() < info.ttl * fraction

    def _token_from(self, data: Mapping[str, Any]) -> TokenInfo:
        ttl = int(data.get("ttl") or 0)
        return TokenInfo(
            accessor=str(data.get("accessor") or ""),
            display_name=str(data.get("display_name") or ""),
            entity_id=str(data.get("entity_id") or ""),
            policies=tuple(data.get("policies") or ()),
            ttl=ttl,
            renewable=bool(data.get("renewable")),
            expires_at=self._clock() + ttl if ttl else None,
        )

    def health(self) -> None:
        """Raise VaultUnavailable unless Vault answers, is unsealed and accepts our token."""
        with self._at("health", "sys/health"):
            response = self._session.get(
                f"{self.settings.addr}/v1/sys/health",
                params={"standbyok": "true", "perfstandbyok": "true"},
                timeout=self.settings.timeout,
                verify=self._verify,
            )
        if response.status_code == 503:  # noqa: PLR2004
            raise VaultUnavailable("Vault is sealed")
        if response.status_code != 200:  # noqa: PLR2004
            raise VaultUnavailable(
                f"Vault is not ready (sys/health answered {response.status_code})"
            )

    # -- keys in KV v2 ------------------------------------------------------------------

    def _path(self, ref: KeyRef) -> str:
        return f"{self._prefix}/{ref.subaccount}/{ref.name}"

    def create_key(self, record: KeyRecord, secret: Secret) -> KeyRecord:
        """Store a new key: data with cas=0 (create only), then its metadata.

        If the metadata cannot be written the new key is deleted again, so an
        intake either stores a whole key or nothing.
        """
        path = self._path(record.ref)
        kv = self._client.secrets.kv.v2
        exists = WriteConflict(str(record.ref), "a key with this name is already stored")
        with self._at("write", f"{self._mount}/data/{path}", refused=lambda: exists):
            written = kv.create_or_update_secret(
                path=path,
                secret={"api_key": record.api_key, "api_secret": secret.reveal()},
                cas=0,
                mount_point=self._mount,
            )
        version = int(written["data"]["version"])
        try:
            with self._at("write metadata", f"{self._mount}/metadata/{path}"):
                kv.update_metadata(
                    path=path,
                    cas_required=True,
                    custom_metadata=record.to_metadata(),
                    mount_point=self._mount,
                )
        except ServiceError:
            with contextlib.suppress(ServiceError), self._at("delete", path):
                kv.delete_metadata_and_all_versions(path=path, mount_point=self._mount)
            raise
        return _replace_version(record, version)

    def read_record(self, ref: KeyRef) -> KeyRecord:
        """The key's metadata (needs only ``read`` on the metadata path)."""
        path = self._path(ref)
        unknown = lambda: UnknownKey(str(ref))  # noqa: E731
        with self._at("read metadata", f"{self._mount}/metadata/{path}", missing=unknown):
            meta = self._client.secrets.kv.v2.read_secret_metadata(
                path=path, mount_point=self._mount
            )["data"]
        return _record(
            ref, meta.get("custom_metadata") or {}, int(meta.get("current_version") or 0)
        )

    def read_key(self, ref: KeyRef) -> tuple[KeyRecord, Secret]:
        """The key's record and its secret, in one read."""
        path = self._path(ref)
        unknown = lambda: UnknownKey(str(ref))  # noqa: E731
        with self._at("read", f"{self._mount}/data/{path}", missing=unknown):
            body = self._client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=self._mount, raise_on_deleted_version=True
            )["data"]
        meta = body.get("metadata") or {}
        record = _record(ref, meta.get("custom_metadata") or {}, int(meta.get("version") or 0))
        stored = str(body["data"].get("api_key", ""))
        nxt = record.next
        if stored != record.api_key and nxt is not None and nxt.api_key == stored:
            # A switch wrote the pair but not yet the metadata (for a few milliseconds, or
            # it stopped in between): the name already points to the next key. The checks
            # finish the metadata of a switch that stopped.
            log.info("vault.switch_in_progress", key=str(ref), version=record.version)
            record = dataclasses.replace(record, api_key=stored, read_only=nxt.read_only)
        return record, Secret(str(body["data"]["api_secret"]))

    def list_refs(self) -> list[KeyRef]:
        """Every stored key's name (needs only ``list`` on the metadata paths)."""
        refs: list[KeyRef] = []
        for sub in self._list(self._prefix):
            if not sub.endswith("/"):
                continue
            refs.extend(
                KeyRef(sub.rstrip("/"), name)
                for name in self._list(f"{self._prefix}/{sub}")
                if not name.endswith("/")
            )
        return sorted(refs)

    def list_records(self) -> list[KeyRecord]:
        records = []
        for ref in self.list_refs():
            with contextlib.suppress(UnknownKey):  # deleted between list and read
                records.append(self.read_record(ref))
        return records

    def _list(self, path: str) -> list[str]:
        try:
            with self._at("list", f"{self._mount}/metadata/{path}", missing=_Missing):
                keys = self._client.secrets.kv.v2.list_secrets(path=path, mount_point=self._mount)
        except _Missing:
            return []
        return [str(k) for k in keys["data"]["keys"]]

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
    ) -> KeyRecord:
        """Move a key along its lifecycle, merging into custom_metadata, then publish the
        change on the feed every replica polls (:meth:`read_changes`).

        Vault has no check-and-set on metadata, so the current status is read
        and the transition validated first; only the status fields are patched.
        ``reason`` and ``actor`` record why and by whom (a verdict and "check", or
        the operator's words and Vault identity).
        """
        current = self.read_record(ref)
        if expect is not None and current.status is not expect:
            raise WriteConflict(str(ref), f"its status is {current.status}, not {expect}")
        if current.status is new:
            return current
        if not can_transition(current.status, new):
            raise WriteConflict(str(ref), f"a {current.status} key cannot become {new}")
        patch: dict[str, str | None] = {
            "status": new.value,
            "status_since": now,
            # null removes a field in a merge patch: Vault refuses empty values.
            "status_reason": reason[:_MAX_META_VALUE] or None,
            "status_by": actor[:_MAX_META_VALUE] or None,
        }
        if verdict:
            patch |= {"last_verdict": verdict, "last_checked_at": now}
        path = self._path(ref)
        with self._at("patch metadata", f"{self._mount}/metadata/{path}"):
            self._client.adapter.request(
                "PATCH",
                f"/v1/{self._mount}/metadata/{path}",
                json={"custom_metadata": patch},
                headers={"Content-Type": "application/merge-patch+json"},
            )
        self.publish_change(ref, new, at=now)
        return self.read_record(ref)

    def delete_key(self, ref: KeyRef) -> None:
        """Delete every version and the metadata of a key (and of its successor or
        standby); publish it as retired."""
        self.read_record(ref)  # UnknownKey rather than a silent no-op
        self._delete_next(ref)
        path = self._path(ref)
        with self._at("delete", f"{self._mount}/metadata/{path}"):
            self._client.secrets.kv.v2.delete_metadata_and_all_versions(
                path=path, mount_point=self._mount
            )
        self.publish_change(ref, Status.RETIRED, at=iso_utc(self._clock()), deleted=True)

    # -- the keys beside the current one: successor or standby, predecessor -------------

    def _next_path(self, ref: KeyRef) -> str:
        return f"{self._path(ref)}/next"

    def patch_record(self, ref: KeyRef, patch: Mapping[str, str | None]) -> KeyRecord:
        """Merge ``patch`` into the key's custom_metadata (None removes a field)."""
        path = self._path(ref)
        with self._at("patch metadata", f"{self._mount}/metadata/{path}"):
            self._client.adapter.request(
                "PATCH",
                f"/v1/{self._mount}/metadata/{path}",
                json={"custom_metadata": {k: _clip(v) for k, v in patch.items()}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
        return self.read_record(ref)

    def store_next(self, ref: KeyRef, nxt: NextKey, secret: Secret) -> KeyRecord:
        """Store a successor or standby of ``ref``: the pair at ``NAME/next`` (create only,
        so of two operators one wins), then its public facts in the name's metadata.

        If the metadata cannot be written, the pair is deleted again: all or nothing.
        """
        current = self.read_record(ref)
        refusal = next_refusal(current, nxt.role, nxt.api_key)
        if refusal:
            raise WriteConflict(str(ref), refusal)
        path = self._next_path(ref)
        kv = self._client.secrets.kv.v2
        racing = WriteConflict(
            str(ref),
            "another successor or standby was stored at the same time (or an earlier one "
            f"was left behind: `backpack-vault keys rotate {ref} --abort` clears it)",
        )
        with self._at("write", f"{self._mount}/data/{path}", refused=lambda: racing):
            kv.create_or_update_secret(
                path=path,
                secret={"api_key": nxt.api_key, "api_secret": secret.reveal()},
                cas=0,
                mount_point=self._mount,
            )
        try:
            return self.patch_record(ref, nxt.to_metadata())
        except ServiceError:
            with contextlib.suppress(ServiceError):
                self._delete_next(ref)
            raise

    def drop_next(self, ref: KeyRef) -> KeyRecord:
        """Forget the successor or standby of ``ref``: its pair and its facts, no trace left."""
        self.read_record(ref)  # UnknownKey rather than a silent no-op
        self._delete_next(ref)
        return self.patch_record(ref, dict.fromkeys(NEXT_FIELDS))

    def _delete_next(self, ref: KeyRef) -> None:
        path = self._next_path(ref)
        with (
            contextlib.suppress(_Missing),
            self._at("delete", f"{self._mount}/metadata/{path}", missing=_Missing),
        ):
            self._client.secrets.kv.v2.delete_metadata_and_all_versions(
                path=path, mount_point=self._mount
            )

    def read_next_secret(self, ref: KeyRef, api_key: str) -> Secret:
        """The secret of the successor or standby ``api_key`` of ``ref``."""
        path = self._next_path(ref)
        gone = lambda: WriteConflict(str(ref), "its successor or standby is gone")  # noqa: E731
        with self._at("read", f"{self._mount}/data/{path}", missing=gone):
            body = self._client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=self._mount, raise_on_deleted_version=True
            )["data"]
        if str(body["data"].get("api_key", "")) != api_key:
            raise WriteConflict(str(ref), "its successor or standby was replaced meanwhile")
        return Secret(str(body["data"]["api_secret"]))

    def write_next_pair(self, current: KeyRecord, secret: Secret) -> int:
        """The switch's one check-and-set write: the next key's pair becomes the name's
        newest version (returned). From here ``read_key`` gives the next key."""
        ref, nxt = current.ref, current.next
        if nxt is None:
            raise WriteConflict(str(ref), "it has no successor or standby")
        now = self.read_record(ref)
        if now.version != current.version or now.next is None or now.next.api_key != nxt.api_key:
            raise WriteConflict(str(ref), "it was changed while its next key was checked")
        path = self._path(ref)
        conflict = lambda: WriteConflict(str(ref))  # noqa: E731
        with self._at("write", f"{self._mount}/data/{path}", refused=conflict):
            written = self._client.secrets.kv.v2.create_or_update_secret(
                path=path,
                secret={"api_key": nxt.api_key, "api_secret": secret.reveal()},
                cas=current.version,
                mount_point=self._mount,
            )
        return int(written["data"]["version"])

    def finish_switch(
        self, ref: KeyRef, patch: Mapping[str, str | None], *, event: str, at: str, version: int
    ) -> KeyRecord:
        """The metadata half of a switch (also to finish one that stopped after the pair)."""
        record = self.patch_record(ref, patch)
        try:
            self._delete_next(ref)
        except ServiceError as exc:  # harmless: the pair is also the name's now
            log.warning("vault.next_not_deleted", key=str(ref), error=exc.code)
        self.publish_change(
            ref, Status.ACTIVE, at=at, event=event, api_key=record.api_key, version=version
        )
        return record

    # -- the change feed: how replicas learn of status changes within a second -----------

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
    ) -> int | None:
        """Append a change to the feed document (check-and-set, retried on a lost race).

        Returns its sequence number, or None when the feed could not be written: the
        status change itself stands, and replicas still see it when their key cache
        expires (a warning says so).
        """
        for _ in range(_FEED_WRITE_ATTEMPTS):
            try:
                current = self.read_document(FEED_DOCUMENT)
                data, cas = current if current is not None else ({}, 0)
                feed = ChangeFeed.from_document(data)
                entry = Change(feed.seq + 1, ref, status, at, deleted, event, api_key, version)
                entries = [*feed.entries[-(FEED_KEEP - 1) :], entry]
                self.write_document(
                    FEED_DOCUMENT, ChangeFeed(entry.seq, tuple(entries)).as_document(), cas=cas
                )
            except WriteConflict:
                continue
            except ServiceError as exc:
                log.warning("vault.feed_write_failed", key=str(ref), error=exc.code)
                return None
            return entry.seq
        log.warning("vault.feed_write_failed", key=str(ref), error="conflict")
        return None

    def read_changes(self) -> ChangeFeed:
        """The feed document: its latest sequence number and the recent changes."""
        current = self.read_document(FEED_DOCUMENT)
        return ChangeFeed.from_document(current[0] if current is not None else {})

    # -- small CAS documents (leader lease) ---------------------------------------------

    def read_document(self, path: str) -> tuple[dict[str, Any], int] | None:
        """A KV v2 document under our prefix and its version, or None when absent."""
        full = f"{self._prefix}-{path}"
        try:
            with self._at("read", f"{self._mount}/data/{full}", missing=_Missing):
                body = self._client.secrets.kv.v2.read_secret_version(
                    path=full, mount_point=self._mount, raise_on_deleted_version=False
                )["data"]
        except _Missing:
            return None
        if body.get("data") is None:  # soft-deleted: the next write must name this version
            return {}, int(body["metadata"]["version"])
        return dict(body["data"]), int(body["metadata"]["version"])

    def write_document(self, path: str, data: Mapping[str, Any], cas: int) -> int:
        """Write with check-and-set; WriteConflict when ``cas`` is not the current version."""
        full = f"{self._prefix}-{path}"
        conflict = lambda: WriteConflict(path)  # noqa: E731
        with self._at("write", f"{self._mount}/data/{full}", refused=conflict):
            written = self._client.secrets.kv.v2.create_or_update_secret(
                path=full, secret=dict(data), cas=cas, mount_point=self._mount
            )
        return int(written["data"]["version"])

    # -- response wrapping --------------------------------------------------------------

    def wrap(self, payload: Mapping[str, Any], ttl: int) -> WrapInfo:
        """Wrap ``payload`` at Vault for ``ttl`` seconds (one call per copy).

        A service client (``for_service``) sends it over kept-alive connections
        (``wire.py``): hvac and requests cost about 1.5 ms of CPU per call here, this a
        tenth of it (docs/performance.md). Errors are mapped exactly as hvac's; an answer
        that redirects (a standby node) is left to hvac, which follows it.
        """
        with self._at("wrap", "sys/wrapping/wrap"):
            answer = None
            if self._direct is not None:
                answer = self._direct.post(
                    "/v1/sys/wrapping/wrap",
                    dict(payload),
                    token=str(self._client.token or ""),
                    headers={"X-Vault-Wrap-TTL": f"{ttl}s"},
                )
            if answer is None:
                answer = self._client.sys.wrap(payload=dict(payload), ttl=f"{ttl}s")
            info = answer.get("wrap_info") if isinstance(answer, dict) else None
            if not isinstance(info, dict):
                raise requests.exceptions.InvalidJSONError("Vault's wrap answer holds no wrap_info")
        return WrapInfo(
            token=Secret(info["token"]),
            accessor=str(info["accessor"]),
            ttl=int(info["ttl"]),
            created_at=self._clock(),
        )

    def revoke_accessor(self, accessor: str) -> None:
        """Revoke a token by accessor; an unknown or used-up accessor is not an error."""
        with self._at("revoke-accessor", "auth/token/revoke-accessor"):
            self._client.auth.token.revoke_accessor(accessor)

    # -- questions asked with a worker's own token ---------------------------------------

    def capabilities(self, token: Secret, paths: Sequence[str]) -> dict[str, frozenset[str]]:
        """What the caller's policies grant on each path (sys/capabilities-self)."""
        if not token:
            raise NotAuthenticated("no Vault token: send X-Vault-Token or Authorization: Bearer")
        client = self._new_client(token)
        with self._at("capabilities-self", "sys/capabilities-self", caller_token=True):
            body = client.sys.get_capabilities(paths=list(paths))
        data = body.get("data", body)
        return {p: frozenset(data.get(p) or ()) for p in paths}

    def own_capabilities(self, paths: Sequence[str]) -> dict[str, frozenset[str]]:
        """What this client's own token may do on each path (sys/capabilities-self)."""
        with self._at("capabilities-self", "sys/capabilities-self"):
            body = self._client.sys.get_capabilities(paths=list(paths))
        data = body.get("data", body)
        return {p: frozenset(data.get(p) or ()) for p in paths}

    def lookup_caller(self, token: Secret) -> TokenInfo:
        client = self._new_client(token)
        with self._at("lookup-self", "auth/token/lookup-self", caller_token=True):
            data = client.auth.token.lookup_self()["data"]
        return self._token_from(data)

    def probe_token(self) -> None:
        """Raise VaultDenied unless Vault still accepts our own token; ``token_info`` is kept."""
        with self._at("lookup-self", "auth/token/lookup-self"):
            self._client.auth.token.lookup_self()

    @classmethod
    def for_service(
        cls, settings: VaultSettings, *, clock: Callable[[], float] = time.time
    ) -> Vault:
        """A client for a long-running service: proxy settings are read once, here.

        requests re-reads the proxy environment on every call (about 0.4 ms each,
        measured); a daemon calling Vault on every handout reads it at startup.
        REQUESTS_CA_BUNDLE is not consulted: Vault's own VAULT_CACERT is.
        """
        session = requests.Session()
        # As many kept connections as the API's thread pool has threads (anyio's 40):
        # fewer, and a burst of calls to Vault closes and reopens the rest each time.
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=_POOL_SIZE)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        proxies = requests.utils.get_environ_proxies(settings.addr)
        session.proxies.update(proxies)
        session.trust_env = False
        vault = cls(settings, session=session, clock=clock)
        if not proxies:  # through a proxy, requests (hvac) carries every call
            vault._direct = _Direct.for_settings(settings)
        return vault

    def close(self) -> None:
        self._session.close()
        if self._direct is not None:
            self._direct.close()


class _Direct:
    """Vault's hot call (a wrap) over kept-alive connections (:mod:`backpack_vault.wire`).

    Only for a service client with no proxy (``for_service`` reads the proxy settings
    once). Every failure is raised as requests' or hvac's own exception, so ``_calling``
    maps it exactly as for every other call.
    """

    def __init__(self, pool: Pool, settings: VaultSettings) -> None:
        self._pool = pool
        self._namespace = settings.namespace

    @classmethod
    def for_settings(cls, settings: VaultSettings) -> _Direct | None:
        tls = None
        if settings.addr.startswith("https:"):
            tls = ssl.create_default_context(cafile=settings.cacert or None)
        pool = Pool.for_url(
            settings.addr, timeout=settings.timeout, tls=tls, proxies=False, keep=_POOL_SIZE
        )
        return None if pool is None else cls(pool, settings)

    def close(self) -> None:
        self._pool.close()

    def post(
        self, path: str, payload: Mapping[str, Any], *, token: str, headers: Mapping[str, str]
    ) -> dict[str, Any] | None:
        """Vault's JSON answer; None when it redirects (the caller asks hvac instead)."""
        sent = dict(headers)
        if self._namespace:
            sent["X-Vault-Namespace"] = self._namespace
        try:
            status, _found, text = self._pool.request(
                "POST", path, json.dumps(payload).encode(), token, sent
            )
        except WireTimeout:
            raise requests.Timeout("Vault did not answer in time") from None
        except WireError as exc:
            raise requests.ConnectionError(str(exc)) from None
        if HTTPStatus.MULTIPLE_CHOICES <= status < HTTPStatus.BAD_REQUEST:
            return None  # a redirect (a standby node): hvac follows it
        return _answer(status, text, path)


def _answer(status: int, text: bytes, path: str) -> dict[str, Any]:
    """Vault's JSON answer, or hvac's exception for its status (requests' for nonsense)."""
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        data = None
    if status >= HTTPStatus.BAD_REQUEST:
        errors = data.get("errors") if isinstance(data, dict) else None
        hvac.utils.raise_for_error("post", path, status, errors=errors)
    if not isinstance(data, dict):
        raise requests.exceptions.InvalidJSONError(f"Vault answered {status} without JSON")
    return data


class Provisioner:
    """Idempotent setup calls (``vault setup``): each returns True when it changed something."""

    def __init__(self, vault: Vault) -> None:
        self._client = vault._client  # noqa: SLF001 - same module, same identity
        self._at = vault._at  # noqa: SLF001

    def ensure_kv_v2(self, mount: str) -> bool:
        mount = mount.strip("/")
        with self._at("read mounts", "sys/mounts"):
            mounts = self._client.sys.list_mounted_secrets_engines()
        existing = (mounts.get("data") or mounts).get(f"{mount}/")
        if existing is not None:
            version = str((existing.get("options") or {}).get("version", "1"))
            if existing.get("type") != "kv" or version != "2":
                raise ConfigError(
                    f"{mount}/ is mounted but is not KV version 2: choose another "
                    "BACKPACK_VAULT_KV_MOUNT or upgrade it with `vault kv enable-versioning`"
                )
            return False
        with self._at("enable", f"sys/mounts/{mount}"):
            self._client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
        return True

    def ensure_policy(self, name: str, hcl: str) -> bool:
        with self._at("read policy", f"sys/policy/{name}", missing=_Missing):
            try:
                current = self._client.sys.read_policy(name=name)
            except hvac.exceptions.InvalidPath:
                current = None
        body = current and ((current.get("data") or current).get("rules") or "")
        if body and body.strip() == hcl.strip():
            return False
        with self._at("write policy", f"sys/policy/{name}"):
            self._client.sys.create_or_update_policy(name=name, policy=hcl)
        return True

    def ensure_auth(self, method: str, mount: str | None = None) -> bool:
        mount = (mount or method).strip("/")
        with self._at("read auth", "sys/auth"):
            methods = self._client.sys.list_auth_methods()
        if f"{mount}/" in (methods.get("data") or methods):
            return False
        with self._at("enable auth", f"sys/auth/{mount}"):
            self._client.sys.enable_auth_method(method_type=method, path=mount)
        return True

    def ensure_approle_role(
        self,
        role: str,
        policies: Sequence[str],
        *,
        mount: str = "approle",
        token_ttl: str = "1h",  # noqa: S107 - a duration
    ) -> bool:
        wanted = {"token_policies": sorted(policies), "token_ttl": token_ttl}
        try:
            with self._at("read role", f"auth/{mount}/role/{role}", missing=_Missing):
                current = self._client.auth.approle.read_role(role_name=role, mount_point=mount)
            data = current.get("data") or {}
            if sorted(data.get("token_policies") or []) == wanted["token_policies"]:
                return False
        except _Missing:
            pass
        with self._at("write role", f"auth/{mount}/role/{role}"):
            self._client.auth.approle.create_or_update_approle(
                role_name=role,
                token_policies=list(policies),
                token_ttl=token_ttl,
                token_max_ttl="24h",  # noqa: S106 - a duration
                mount_point=mount,
            )
        return True

    def ensure_kubernetes_role(
        self,
        role: str,
        policies: Sequence[str],
        *,
        service_accounts: Sequence[str],
        namespaces: Sequence[str],
        mount: str = "kubernetes",
    ) -> bool:
        try:
            with self._at("read role", f"auth/{mount}/role/{role}", missing=_Missing):
                current = self._client.auth.kubernetes.read_role(name=role, mount_point=mount)
            if sorted(current.get("token_policies") or current.get("policies") or []) == sorted(
                policies
            ):
                return False
        except _Missing:
            pass
        with self._at("write role", f"auth/{mount}/role/{role}"):
            self._client.auth.kubernetes.create_role(
                name=role,
                bound_service_account_names=list(service_accounts),
                bound_service_account_namespaces=list(namespaces),
                policies=list(policies),
                mount_point=mount,
            )
        return True

    def approle_credentials(self, role: str, *, mount: str = "approle") -> tuple[str, Secret]:
        """A role id and a fresh secret id (for demos and tests)."""
        with self._at("read role-id", f"auth/{mount}/role/{role}/role-id"):
            role_id = self._client.auth.approle.read_role_id(role_name=role, mount_point=mount)
            secret_id = self._client.auth.approle.generate_secret_id(
                role_name=role, mount_point=mount
            )
        return str(role_id["data"]["role_id"]), Secret(str(secret_id["data"]["secret_id"]))

    def create_token(
        self, policies: Sequence[str], *, ttl: str = "1h", meta: Mapping[str, str] | None = None
    ) -> Secret:
        """A child token with the given policies (for demos and tests)."""
        with self._at("create token", "auth/token/create"):
            body = self._client.auth.token.create(
                policies=list(policies), ttl=ttl, meta=dict(meta or {})
            )
        return Secret(str(body["auth"]["client_token"]))

    # -- what exists already, for `vault setup` (provision.py): created vs changed -------

    def auth_accessor(self, mount: str) -> str | None:
        """The accessor of the auth method at ``mount``, or None when none is enabled there."""
        with self._at("read auth", "sys/auth"):
            methods = self._client.sys.list_auth_methods()
        entry = (methods.get("data") or methods).get(f"{mount.strip('/')}/")
        return str(entry["accessor"]) if entry else None

    def policy_names(self) -> frozenset[str]:
        with self._at("list policies", "sys/policy"):
            body = self._client.sys.list_policies()
        return frozenset((body.get("data") or body).get("policies") or ())

    def role_names(self, mount: str) -> frozenset[str]:
        """The roles of an AppRole or Kubernetes auth mount (both list ``auth/<mount>/role``)."""
        mount = mount.strip("/")
        with self._at("list roles", f"auth/{mount}/role"):
            try:
                body = self._client.list(f"auth/{mount}/role")
            except hvac.exceptions.InvalidPath:
                body = None
        return frozenset(((body or {}).get("data") or {}).get("keys") or ())


def _record(ref: KeyRef, meta: Mapping[str, str], version: int) -> KeyRecord:
    record = KeyRecord.from_metadata(ref, dict(meta), version)
    if record is None:
        return KeyRecord.incomplete(ref, version)
    return record


def _clip(value: str | None) -> str | None:
    """Vault refuses empty values (None removes the field) and values over its limit."""
    return value[:_MAX_META_VALUE] if value else None


def _replace_version(record: KeyRecord, version: int) -> KeyRecord:
    return dataclasses.replace(record, version=version)
