"""Vault setup for backpack-vault: policies as text, and ``vault setup`` as idempotent steps.

Two halves:

- **Rendering** (pure): :func:`render_worker_policy` prints what ``backpack-vault policy
  worker`` shows, and :func:`load_policy_files` reads the HCL shipped in ``policies/`` (the
  one copy: ``deploy/vault/policies`` is exported from it by ``backpack-vault policy
  export``, :func:`export_policy_files`) with the configured KV mount, KV prefix, grant
  prefix and wrap TTL bound in place of the defaults the files are written with.
- **Setup**: :func:`setup` makes a Vault ready, one step per item, through
  ``vault.Provisioner`` only (no hvac here), and reports each item as created, changed or
  unchanged, so a second run reports no change.

Policies::

    backpack-vault-daemon           the daemon: reads keys, patches their status, wraps copies
    backpack-vault-operator         people: store, list, show, retire, delete; never read secrets
    backpack-vault-metadata-reader  list and show keys only
    backpack-vault-worker-templated workers of AppRole roles named after their sub-account
    backpack-worker-<SUB>           one per sub-account: the worker default (read-only signing),
                                    seeded by setup and then the operator's to tailor

Worker grants default to **signatures of read-only instructions only**: a worker policy
written without instructions lets the daemon sign queries (balances, orders, fills...) and
nothing that changes account state, and never hands out the key. State-changing instructions
are granted one by one, and a copy (the key itself, which signs anything) only on request.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Final

from backpack_vault.backpack.instructions import (
    ENDPOINTS,
    EXTRA_INSTRUCTIONS,
    is_known,
    is_state_changing,
)
from backpack_vault.config import Settings, VaultSettings
from backpack_vault.core.keys import KeyRef
from backpack_vault.errors import ConfigError, InvalidInput
from backpack_vault.vault.client import Provisioner, Vault

__all__ = [
    "ACCESSOR_PLACEHOLDER",
    "DAEMON_APPROLE_ROLE",
    "DAEMON_POLICY",
    "DEFAULT_GRANT_PREFIX",
    "METADATA_READER_POLICY",
    "OPERATOR_POLICY",
    "POLICY_FILES",
    "READ_ONLY_INSTRUCTIONS",
    "TEMPLATED_WORKER_POLICY",
    "KubernetesAuth",
    "Outcome",
    "SetupItem",
    "SetupReport",
    "export_policy_files",
    "load_policy_files",
    "render_templated_worker_policy",
    "render_worker_policy",
    "setup",
    "worker_policy_name",
    "worker_role_name",
]

DAEMON_POLICY: Final = "backpack-vault-daemon"
OPERATOR_POLICY: Final = "backpack-vault-operator"
METADATA_READER_POLICY: Final = "backpack-vault-metadata-reader"
TEMPLATED_WORKER_POLICY: Final = "backpack-vault-worker-templated"
DAEMON_APPROLE_ROLE: Final = "backpack-vault-daemon"

# Policies shipped as files in ``policies/``, always written by setup.
POLICY_FILES: Final = (DAEMON_POLICY, OPERATOR_POLICY, METADATA_READER_POLICY)

# The names the shipped files are written with; setup substitutes the configured ones.
DEFAULT_KV_MOUNT: Final = "secret"
DEFAULT_KV_PREFIX: Final = "backpack"
DEFAULT_GRANT_PREFIX: Final = "backpack-broker"
DEFAULT_MAX_WRAP_TTL: Final = "300s"
ACCESSOR_PLACEHOLDER: Final = "APPROLE_MOUNT_ACCESSOR"
ROLE_TEMPLATE: Final = "{{identity.entity.aliases." + ACCESSOR_PLACEHOLDER + ".metadata.role_name}}"

# What a worker policy grants by default: every instruction that changes no account state.
READ_ONLY_INSTRUCTIONS: Final[tuple[str, ...]] = tuple(
    sorted(
        i
        for i in {e.instruction for e in ENDPOINTS} | EXTRA_INSTRUCTIONS
        if not is_state_changing(i)
    )
)

_KV_AREAS: Final = frozenset({"data", "metadata", "delete", "undelete", "destroy"})
_PATH_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")
_ACCESSOR: Final = re.compile(r"[A-Za-z0-9_.-]+")
_INSTRUCTION: Final = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_PATH_LINE: Final = re.compile(r'^(path\s+")([^"]*)(")', re.MULTILINE)
_MAX_WRAP: Final = re.compile(r'(max_wrapping_ttl\s*=\s*")' + re.escape(DEFAULT_MAX_WRAP_TTL) + '"')


def worker_policy_name(sub: str) -> str:
    """The per-sub-account worker policy that ``vault setup`` seeds: ``backpack-worker-<sub>``."""
    return f"backpack-worker-{KeyRef(sub, sub).subaccount}"


def worker_role_name(sub: str) -> str:
    """The AppRole or Kubernetes auth role of a sub-account's workers (same as its policy)."""
    return worker_policy_name(sub)


# -- rendering --------------------------------------------------------------------------


def _checked_name(setting: str, value: str) -> str:
    value = value.strip("/")
    if not _PATH_NAME.fullmatch(value):
        raise ConfigError(
            f"{setting} {value!r} cannot be used in a Vault path: use letters, digits, "
            "'.', '_', '-' and '/' between parts"
        )
    return value


def _checked_instructions(instructions: Iterable[str]) -> tuple[str, ...]:
    chosen = []
    for instruction in instructions:
        if not _INSTRUCTION.fullmatch(instruction) or not is_known(instruction):
            raise InvalidInput(
                f"{instruction!r} is not a Backpack instruction this version knows "
                "(examples: balanceQuery, orderExecute, orderCancel)"
            )
        chosen.append(instruction)
    return tuple(sorted(set(chosen)))


def _stanza(path: str, capability: str) -> str:
    return f'path "{path}" {{ capabilities = ["{capability}"] }}'


def _grants(
    grant_prefix: str, sub: str, key: str, instructions: tuple[str, ...], *, copy: bool
) -> list[str]:
    base = f"{grant_prefix}/{sub}/{key}"
    lines = [_stanza(f"{base}/copy", "read")] if copy else []
    lines += [_stanza(f"{base}/sign/{i}", "update") for i in instructions]
    return lines


def _explain(instructions: tuple[str, ...], *, default: bool, copy: bool) -> list[str]:
    if default:
        text = [
            "Signatures of read-only instructions only (the default): the daemon signs",
            "queries for this worker; the key never leaves the daemon, and no order,",
            "cancellation, withdrawal or other state change can be signed. Grant",
            "state-changing instructions one by one (for example orderExecute).",
        ]
    else:
        text = [
            "Signatures of the instructions listed below only; the key never leaves the daemon.",
        ]
    if copy:
        text += [
            "COPY GRANT: the worker also receives the key itself (wrapped, short-lived) and",
            "can sign any instruction with it, whatever the sign grants say.",
        ]
    elif instructions:
        text.append("No copy grant: the worker never receives the key itself.")
    return text


def _worker_header(title: list[str], explain: list[str]) -> list[str]:
    return [
        *(f"# {line}".rstrip() for line in title),
        "# Grant paths are virtual: the daemon asks Vault (sys/capabilities-self, with the",
        "# worker's own token) whether this token holds them; nothing is mounted there.",
        "# Workers hold no capability on the KV paths of stored keys.",
        "#",
        *(f"# {line}".rstrip() for line in explain),
        "",
    ]


def render_worker_policy(
    grant_prefix: str,
    sub: str,
    key: str | None = None,
    instructions: Iterable[str] = (),
    *,
    copy: bool = False,
) -> str:
    """The HCL of a worker policy (what ``backpack-vault policy worker`` prints).

    ``sub`` scopes the grants to one sub-account, ``key`` to one key of it (default: all its
    keys). With no ``instructions`` the worker may have every read-only instruction signed
    (:data:`READ_ONLY_INSTRUCTIONS`) and nothing else; with instructions, exactly those. A
    copy grant is added only with ``copy=True``: a copy is the key itself.
    """
    prefix = _checked_name("grant prefix", grant_prefix)
    ref = KeyRef(sub, key if key is not None else sub)
    chosen = _checked_instructions(instructions)
    default = not chosen
    signed = READ_ONLY_INSTRUCTIONS if default else chosen
    scope = f"key {ref}" if key is not None else f"every key of sub-account {ref.subaccount}"
    lines = _worker_header(
        [f"Worker policy for {scope}, printed by `backpack-vault policy worker`."],
        _explain(chosen, default=default, copy=copy),
    )
    lines += _grants(
        prefix, ref.subaccount, ref.name if key is not None else "+", signed, copy=copy
    )
    return "\n".join(lines) + "\n"


def render_templated_worker_policy(grant_prefix: str = DEFAULT_GRANT_PREFIX) -> str:
    """The templated worker policy (``policies/backpack-vault-worker-templated.hcl``).

    One policy for every AppRole role *named after its sub-account*: the grant paths use the
    role name where the sub-account goes. The accessor of the AppRole mount is known only
    once it is enabled, so the text holds :data:`ACCESSOR_PLACEHOLDER`; left in place, the
    template never resolves and the policy grants nothing.
    """
    prefix = _checked_name("grant prefix", grant_prefix)
    title = [
        f"{TEMPLATED_WORKER_POLICY}: the default worker grants for every AppRole role that is",
        "named exactly after its sub-account (role `scalper` -> sub-account scalper).",
        "`backpack-vault vault setup` writes it with the accessor of the AppRole mount in place",
        f"of {ACCESSOR_PLACEHOLDER}; left in place, the template never resolves and the policy",
        "grants nothing. AppRole alias metadata holds only the role name, which every secret-id",
        "of a role shares, so a token can never gain another role's grants. The roles that",
        "setup creates (backpack-worker-<SUB>) use per-sub-account policies instead.",
        "",
    ]
    lines = _worker_header(title, _explain((), default=True, copy=False))
    lines += _grants(prefix, ROLE_TEMPLATE, "+", READ_ONLY_INSTRUCTIONS, copy=False)
    return "\n".join(lines) + "\n"


def _read_shipped(name: str) -> str:
    return (resources.files("backpack_vault.vault") / "policies" / f"{name}.hcl").read_text(
        encoding="utf-8"
    )


def _localize(hcl: str, vault: VaultSettings, max_wrap_ttl: int) -> str:
    mount = _checked_name("KV mount", vault.kv_mount)
    prefix = _checked_name("KV prefix", vault.kv_prefix)
    grants = _checked_name("grant prefix", vault.grant_prefix)

    def path(match: re.Match[str]) -> str:
        parts = match.group(2).split("/")
        if len(parts) > 2 and parts[0] == DEFAULT_KV_MOUNT and parts[1] in _KV_AREAS:  # noqa: PLR2004
            parts[0] = mount
            if parts[2] == DEFAULT_KV_PREFIX:
                parts[2] = prefix
            elif parts[2].startswith(f"{DEFAULT_KV_PREFIX}-"):
                parts[2] = prefix + parts[2][len(DEFAULT_KV_PREFIX) :]
        elif parts[0] == DEFAULT_GRANT_PREFIX:
            parts[0] = grants
        return f"{match.group(1)}{'/'.join(parts)}{match.group(3)}"

    hcl = _PATH_LINE.sub(path, hcl)
    return _MAX_WRAP.sub(rf'\g<1>{int(max_wrap_ttl)}s"', hcl)


def load_policy_files(settings: Settings, *, approle_accessor: str | None = None) -> dict[str, str]:
    """Policy name -> HCL of the shipped files, with the configured names substituted.

    Always the daemon, operator and metadata-reader policies; the templated worker policy
    too when ``approle_accessor`` (of the AppRole mount its roles live on) is given.
    """
    vault = settings.vault
    policies = {
        name: _localize(_read_shipped(name), vault, settings.broker.max_wrap_ttl)
        for name in POLICY_FILES
    }
    if approle_accessor is not None:
        if not _ACCESSOR.fullmatch(approle_accessor):
            raise ConfigError(f"{approle_accessor!r} is not an auth mount accessor")
        templated = _localize(
            _read_shipped(TEMPLATED_WORKER_POLICY), vault, settings.broker.max_wrap_ttl
        )
        policies[TEMPLATED_WORKER_POLICY] = templated.replace(
            ACCESSOR_PLACEHOLDER, approle_accessor
        )
    return policies


def export_policy_files(settings: Settings | None = None) -> dict[str, str]:
    """File name -> HCL of every shipped policy (what ``backpack-vault policy export`` writes).

    Without ``settings``, the files exactly as shipped, with the default names (``secret``,
    ``backpack``, ``backpack-broker``, ``300s``): what ``deploy/vault/policies`` holds and
    what ``vault setup`` writes under default settings. With ``settings``, the configured
    names in their place, as ``vault setup`` writes them; the templated worker policy keeps
    :data:`ACCESSOR_PLACEHOLDER` either way (the AppRole mount's accessor is known only once
    it is enabled).
    """
    names = (*POLICY_FILES, TEMPLATED_WORKER_POLICY)
    if settings is None:
        return {f"{name}.hcl": _read_shipped(name) for name in names}
    max_wrap_ttl = settings.broker.max_wrap_ttl
    return {
        f"{name}.hcl": _localize(_read_shipped(name), settings.vault, max_wrap_ttl)
        for name in names
    }


# -- setup ------------------------------------------------------------------------------


class Outcome(enum.StrEnum):
    CREATED = "created"
    CHANGED = "changed"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class SetupItem:
    kind: str  # "secrets engine", "policy", "auth method", "approle role", "kubernetes role"
    name: str
    outcome: Outcome
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "outcome": self.outcome.value} | (
            {"detail": self.detail} if self.detail else {}
        )

    def __str__(self) -> str:
        text = f"{self.outcome.value:<9}  {self.kind} {self.name}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True, slots=True)
class SetupReport:
    items: tuple[SetupItem, ...]

    @property
    def changed(self) -> bool:
        return any(item.outcome is not Outcome.UNCHANGED for item in self.items)

    def outcome(self, kind: str, name: str) -> Outcome:
        for item in self.items:
            if (item.kind, item.name) == (kind, name):
                return item.outcome
        raise KeyError((kind, name))

    def as_dict(self) -> dict[str, object]:
        """The stable ``--json`` shape."""
        return {"changed": self.changed, "items": [item.as_dict() for item in self.items]}

    def __str__(self) -> str:
        return "\n".join(str(item) for item in self.items)


@dataclass(frozen=True, slots=True)
class KubernetesAuth:
    """Kubernetes auth roles: the daemon's, and optionally one per worker sub-account.

    The daemon's role binds ``service_account`` in ``namespaces`` to the daemon policy. Each
    sub-account in ``worker_subaccounts`` gets role ``backpack-worker-<sub>`` for service
    account ``backpack-worker-<sub>`` in ``worker_namespaces`` (default: ``namespaces``) with
    the per-sub-account worker policy. The auth
    method's own config (``auth/<mount>/config``: the cluster's API address and CA) is the
    Vault administrator's: it depends on where Vault runs.
    """

    role: str = "backpack-vault"
    service_account: str = "backpack-vault"
    namespaces: tuple[str, ...] = ("backpack-vault",)
    mount: str = "kubernetes"
    worker_subaccounts: tuple[str, ...] = ()
    worker_namespaces: tuple[str, ...] = ()


class _Setup:
    def __init__(self, provisioner: Provisioner) -> None:
        self.p = provisioner
        self.items: list[SetupItem] = []
        self.policies = set(provisioner.policy_names())

    def add(self, kind: str, name: str, outcome: Outcome, detail: str = "") -> None:
        self.items.append(SetupItem(kind, name, outcome, detail))

    def changed(self, kind: str, name: str, *, existed: bool, changed: bool) -> None:
        if not changed:
            self.add(kind, name, Outcome.UNCHANGED)
        else:
            self.add(kind, name, Outcome.CHANGED if existed else Outcome.CREATED)

    def policy(self, name: str, hcl: str) -> None:
        existed = name in self.policies
        self.changed("policy", name, existed=existed, changed=self.p.ensure_policy(name, hcl))
        self.policies.add(name)

    def seed_policy(self, name: str, hcl: str) -> None:
        """Write a policy only when missing: worker policies are the operator's to tailor."""
        if any(item.kind == "policy" and item.name == name for item in self.items):
            return  # already reported in this run (a sub-account with AppRole and Kubernetes)
        if name in self.policies:
            self.add(
                "policy", name, Outcome.UNCHANGED, "kept: worker policies are never overwritten"
            )
            return
        self.p.ensure_policy(name, hcl)
        self.policies.add(name)
        self.add("policy", name, Outcome.CREATED)

    def auth(self, method: str, mount: str) -> str:
        created = self.p.ensure_auth(method, mount)
        self.add("auth method", f"{mount}/", Outcome.CREATED if created else Outcome.UNCHANGED)
        accessor = self.p.auth_accessor(mount)
        if accessor is None:  # pragma: no cover - Vault just said it is enabled
            raise ConfigError(f"auth method {mount}/ was enabled but Vault does not list it")
        return accessor


def _subaccounts(subs: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(KeyRef(s, s).subaccount for s in subs))


def setup(
    vault: Vault,
    settings: Settings,
    *,
    approle_subaccounts: Iterable[str] = (),
    approle_daemon: bool = False,
    approle_mount: str = "approle",
    kubernetes: KubernetesAuth | None = None,
) -> SetupReport:
    """Make Vault ready for backpack-vault; safe to run again (``backpack-vault vault setup``).

    ``vault`` must be logged in with an administrator's token (mounts, policies, auth).
    Steps: the KV v2 mount; the daemon, operator and metadata-reader policies; with
    ``approle_subaccounts`` or ``approle_daemon``, the AppRole method, the templated worker
    policy, role ``backpack-worker-<sub>`` per sub-account bound to policy
    ``backpack-worker-<sub>`` (seeded with the read-only default when missing, never
    overwritten) and role ``backpack-vault-daemon``; with ``kubernetes``, the Kubernetes
    method and its roles (see :class:`KubernetesAuth`).
    """
    subs = _subaccounts(approle_subaccounts)
    k8s_subs = _subaccounts(kubernetes.worker_subaccounts) if kubernetes else ()
    grant_prefix = _checked_name("grant prefix", settings.vault.grant_prefix)
    p = Provisioner(vault)
    run = _Setup(p)

    mount = _checked_name("KV mount", settings.vault.kv_mount)
    created = p.ensure_kv_v2(mount)
    run.add("secrets engine", f"{mount}/", Outcome.CREATED if created else Outcome.UNCHANGED)

    for name, hcl in load_policy_files(settings).items():
        run.policy(name, hcl)

    def worker_policy(sub: str) -> str:
        name = worker_policy_name(sub)
        run.seed_policy(name, render_worker_policy(grant_prefix, sub))
        return name

    if subs or approle_daemon:
        approle = _checked_name("AppRole mount", approle_mount)
        accessor = run.auth("approle", approle)
        templated = load_policy_files(settings, approle_accessor=accessor)
        run.policy(TEMPLATED_WORKER_POLICY, templated[TEMPLATED_WORKER_POLICY])
        wanted = {worker_role_name(s): worker_policy(s) for s in subs}
        if approle_daemon:
            wanted[DAEMON_APPROLE_ROLE] = DAEMON_POLICY
        existing = p.role_names(approle)
        for role, policy in wanted.items():
            changed = p.ensure_approle_role(role, [policy], mount=approle)
            run.changed(
                "approle role", f"{approle}/{role}", existed=role in existing, changed=changed
            )

    if kubernetes is not None:
        k8s = _checked_name("Kubernetes auth mount", kubernetes.mount)
        run.auth("kubernetes", k8s)
        worker_namespaces = list(kubernetes.worker_namespaces or kubernetes.namespaces)
        # role -> (service account, namespaces, policy)
        k8s_wanted = {
            kubernetes.role: (
                kubernetes.service_account,
                list(kubernetes.namespaces),
                DAEMON_POLICY,
            )
        }
        for sub in k8s_subs:
            role = worker_role_name(sub)
            k8s_wanted[role] = (role, worker_namespaces, worker_policy(sub))
        existing = p.role_names(k8s)
        for role, (account, namespaces, policy) in k8s_wanted.items():
            changed = p.ensure_kubernetes_role(
                role, [policy], service_accounts=[account], namespaces=namespaces, mount=k8s
            )
            run.changed(
                "kubernetes role", f"{k8s}/{role}", existed=role in existing, changed=changed
            )

    return SetupReport(tuple(run.items))
