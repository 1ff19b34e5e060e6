"""argv -> Settings -> one command. Errors become a message on stderr and an exit code.

Exit codes (also in docs/cli.md)::

    0  success                          6  conflict or key not usable
    1  internal error                   7  rate limited
    2  configuration or usage error     8  upstream error
    3  invalid input                    9  Vault unavailable (sealed, down, unreachable)
    4  not authenticated / not allowed  10 Vault denied our token or policy
    5  unknown key                      11 Backpack unavailable   12 key rejected by Backpack
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import click

from backpack_vault import __version__
from backpack_vault.config import Secret, Settings, load_from_os, read_secret_file
from backpack_vault.core.clock import iso_utc
from backpack_vault.core.keys import (
    KeyPair,
    KeyRecord,
    KeyRef,
    Origin,
    Status,
    generate_pair,
    parse_key_pair,
)
from backpack_vault.core.rotation import NextKey, NextState, Role
from backpack_vault.errors import (
    ConfigError,
    ExchangeUnavailable,
    InvalidInput,
    KeyNotUsable,
    KeyRejected,
    ServiceError,
    WriteConflict,
)
from backpack_vault.logging import configure as configure_logging
from backpack_vault.vault.client import Vault

P = ParamSpec("P")
R = TypeVar("R")

MAX_SECRET_INPUT = 4096


def now_iso() -> str:
    return iso_utc()


class Context:
    """What every command gets: flags collected so far; Settings built once, on first use."""

    def __init__(self, config: Path | None, flags: dict[str, object | None]) -> None:
        self.config = config
        self.flags = flags
        self._settings: Settings | None = None

    def settings(self, **more: object | None) -> Settings:
        if self._settings is None or more:
            self.flags.update(more)
            self._settings = load_from_os(self.config, self.flags)
            configure_logging(self._settings.log_format, self._settings.log_level)
        return self._settings

    def vault(self) -> Vault:
        vault = Vault(self.settings().vault)
        vault.login()
        return vault


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn our errors into `error: ...` on stderr and the class's exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ServiceError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


pass_ctx = click.make_pass_decorator(Context)


def key_ref(_ctx: click.Context, _param: click.Parameter, value: str) -> KeyRef:
    try:
        return KeyRef.parse(value)
    except InvalidInput as exc:
        raise click.BadParameter(exc.message) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="backpack-vault")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file (default: $BACKPACK_VAULT_CONFIG).",
)
@click.option("--vault-addr", help="Vault address (default: $VAULT_ADDR).")
@click.option("--log-format", type=click.Choice(["json", "console"]), help="Log format.")
@click.pass_context
def cli(
    ctx: click.Context, config: Path | None, vault_addr: str | None, log_format: str | None
) -> None:
    """Backpack Exchange API keys in Vault, handed to trading bots under Vault policy."""
    ctx.obj = Context(config, {"vault_addr": vault_addr, "log_format": log_format})


# -- keys ---------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Store, inspect, check and retire keys."""


def _read_secret(secret_file: Path | None) -> Secret:
    if secret_file is not None:
        text = read_secret_file(secret_file, "--secret-file", error=InvalidInput).reveal()
    elif sys.stdin.isatty():
        text = click.prompt("API secret (input hidden)", hide_input=True, err=True)
    else:
        text = sys.stdin.read(MAX_SECRET_INPUT + 1)
    if len(text) > MAX_SECRET_INPUT:
        raise InvalidInput(
            "the API secret input is far too long: paste only the 44-character secret"
        )
    if not text.strip():
        raise InvalidInput(
            "no API secret given: pipe it on stdin or use --secret-file (never on the command line)"
        )
    return Secret(text.strip())


EXCHANGE_OPTION = click.option(
    "--exchange",
    metavar="URL",
    help="The exchange the key belongs to (its REST base URL). Default: "
    "BACKPACK_VAULT_BACKPACK_URL, which is Backpack itself unless set (a sandbox, say).",
)


def _exchange(ctx: Context, given: str | None) -> str:
    url = (given or ctx.settings().checks.backpack_url).strip()
    if not url.startswith(("https://", "http://")):
        raise InvalidInput(f"--exchange {url!r} is not an http(s) URL")
    return url


@keys.command("add")
@click.argument("key", callback=key_ref, metavar="SUB/NAME")
@click.option("--api-key", required=True, help="The API key (public) from the Backpack web UI.")
@click.option("--read-only", is_flag=True, help="The key was created with Read Only on.")
@click.option("--label", default="", help="A note for operators.")
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the API secret from this file instead of stdin.",
)
@click.option(
    "--standby",
    is_flag=True,
    help="Store it as the standby of an existing SUB/NAME: it takes over when the current "
    "key is revoked.",
)
@EXCHANGE_OPTION
@pass_ctx
@handle_errors
def keys_add(
    ctx: Context,
    key: KeyRef,
    api_key: str,
    read_only: bool,
    label: str,
    secret_file: Path | None,
    standby: bool,
    exchange: str | None,
) -> None:
    """Store a key created in the Backpack web UI. The secret comes from stdin or a file."""
    pair = parse_key_pair(api_key, _read_secret(secret_file))
    if standby:
        vault = ctx.vault()
        current = vault.read_record(key)
        if current.read_only != read_only:
            mode = "read-only" if current.read_only else "trading (not read-only)"
            raise InvalidInput(
                f"{key} is {mode}: its standby must match, or a failover would change what "
                "the name can do; "
                + ("add --read-only" if current.read_only else "drop --read-only")
            )
        stored = _store_next(vault, key, pair, Role.STANDBY, Origin.BACKPACK_UI, read_only)
        click.echo(f"stored a standby for {stored.ref} ({pair.api_key}): ready once a check")
        click.echo("sees Backpack accept it; it takes over if the current key is revoked")
        return
    record = KeyRecord.new(
        key,
        pair.api_key,
        origin=Origin.BACKPACK_UI,
        now=now_iso(),
        read_only=read_only,
        label=label,
        exchange=_exchange(ctx, exchange),
    )
    stored = ctx.vault().create_key(record, pair.secret)
    click.echo(f"stored {stored.ref} ({stored.status}, version {stored.version})")


@keys.command("generate")
@click.argument("key", callback=key_ref, metavar="SUB/NAME")
@click.option("--read-only", is_flag=True, help="You will switch Read Only on in the web UI.")
@click.option("--label", default="", help="A note for operators.")
@click.option(
    "--standby",
    is_flag=True,
    help="Make the standby of an existing SUB/NAME (Read Only as the current key's).",
)
@EXCHANGE_OPTION
@pass_ctx
@handle_errors
def keys_generate(
    ctx: Context, key: KeyRef, read_only: bool, label: str, standby: bool, exchange: str | None
) -> None:
    """Make a key pair here; the secret goes straight into Vault, the public key to you."""
    pair = generate_pair()
    if standby:
        vault = ctx.vault()
        read_only = vault.read_record(key).read_only
        _store_next(vault, key, pair, Role.STANDBY, Origin.GENERATED, read_only)
        click.echo(pair.api_key)
        click.echo(_ui_steps(key, read_only, "Stored a standby for"), err=True)
        click.echo(
            "The standby is ready once a check sees Backpack accept it; it takes over\n"
            "within one check interval when the current key is revoked.",
            err=True,
        )
        return
    record = KeyRecord.new(
        key,
        pair.api_key,
        origin=Origin.GENERATED,
        now=now_iso(),
        read_only=read_only,
        label=label,
        exchange=_exchange(ctx, exchange),
    )
    ctx.vault().create_key(record, pair.secret)
    click.echo(pair.api_key)
    click.echo(
        _ui_steps(key, read_only, "Stored", "as pending")
        + f"""
The key becomes active when a check sees Backpack accept it:
  backpack-vault keys check {key}""",
        err=True,
    )


def _ui_steps(key: KeyRef, read_only: bool, stored: str, state: str = "") -> str:
    """What to do in the Backpack web UI with a key pair made here."""
    read_only_step = "switch Read Only ON" if read_only else "leave Read Only OFF"
    where = " (the main account)" if key.subaccount == "main" else ""
    return f"""
{stored} {key}{" " + state if state else ""}. Now, in the Backpack web UI
(https://backpack.exchange/portfolio/settings/api-keys):
  1. New API Key; name it (e.g. {key.name}).
  2. Choose the sub-account {key.subaccount!r}{where}.
  3. Paste the public key above into the "Public Key" field.
  4. {read_only_step}, then create the key."""


def _store_next(
    vault: Vault, key: KeyRef, pair: KeyPair, role: Role, origin: Origin, read_only: bool
) -> KeyRecord:
    nxt = NextKey(
        api_key=pair.api_key,
        role=role,
        state=NextState.PENDING,
        read_only=read_only,
        origin=origin.value,
        created_at=now_iso(),
        created_by=_operator(vault),
    )
    return vault.store_next(key, nxt, pair.secret)


@keys.command("rotate")
@click.argument("key", callback=key_ref, metavar="SUB/NAME")
@click.option("--abort", is_flag=True, help="Drop a successor (or standby) not yet in use.")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON output.")
@pass_ctx
@handle_errors
def keys_rotate(ctx: Context, key: KeyRef, abort: bool, as_json: bool) -> None:
    """Make a successor under the same name; it takes over once Backpack accepts it.

    Until then workers keep the current key. Then the name switches in one write, the
    old key is retiring until its last copy expires, and then retired: delete it in the
    web UI once `keys show` says it is safe.
    """
    vault = ctx.vault()
    if abort:
        current = vault.read_record(key)
        dropped = current.next
        vault.drop_next(key)
        if as_json:
            gone = dropped.as_public_dict() if dropped else None
            click.echo(json.dumps({"name": str(key), "dropped": gone}, indent=2))
        elif dropped is None:
            click.echo(f"{key} has no successor or standby: nothing to drop")
        else:
            click.echo(
                f"dropped the {dropped.role} {dropped.api_key} of {key}; nothing else changed"
            )
            click.echo("if you registered it in the Backpack web UI, delete it there", err=True)
        return
    current = vault.read_record(key)
    pair = generate_pair()
    _store_next(vault, key, pair, Role.SUCCESSOR, Origin.GENERATED, current.read_only)
    if as_json:
        out = {"api_key": pair.api_key, "name": str(key), "status": NextState.PENDING.value}
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(pair.api_key)
    click.echo(
        _ui_steps(key, current.read_only, "Stored a successor for", "as pending")
        + f"""
Workers keep the current key ({current.api_key}) until a check sees Backpack
accept the new one; then {key} switches to it, and the old key is retiring
until its last copy expires. Delete the old key in the web UI when
`backpack-vault keys show {key}` says it is safe. To give up:
  backpack-vault keys rotate {key} --abort""",
        err=True,
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON output.")
@pass_ctx
@handle_errors
def keys_list(ctx: Context, as_json: bool) -> None:
    """List keys with their status (needs only metadata access)."""
    records = ctx.vault().list_records()
    if as_json:
        click.echo(json.dumps([r.as_public_dict() for r in records], indent=2))
        return
    if not records:
        click.echo("no keys stored", err=True)
        return
    rows = [("KEY", "STATUS", "MODE", "API KEY", "LABEL")]
    rows += [
        (str(r.ref), r.status.value, "read-only" if r.read_only else "trading", r.api_key, r.label)
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@keys.command("show")
@click.argument("key", callback=key_ref, metavar="SUB/NAME")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON output.")
@pass_ctx
@handle_errors
def keys_show(ctx: Context, key: KeyRef, as_json: bool) -> None:
    """Show one key's metadata (never its secret)."""
    shown = ctx.vault().read_record(key).as_public_dict()
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    nxt, previous, history = shown.pop("next"), shown.pop("previous"), shown.pop("history")
    for name, value in shown.items():
        click.echo(f"{name + ':':<16} {_human(value)}")
    if isinstance(nxt, dict):
        click.echo(f"{nxt['role']}:")
        for name in ("api_key", "status", "read_only", "created_at", "created_by", "last_verdict"):
            click.echo(f"  {name + ':':<14} {_human(nxt.get(name))}")
    if isinstance(previous, dict):
        click.echo("previous key:")
        for name in ("api_key", "status", "since", "safe_to_delete_at", "reason"):
            click.echo(f"  {name + ':':<14} {_human(previous.get(name))}")
        click.echo(f"  {_delete_advice(previous)}")
    if isinstance(history, list) and history:
        click.echo("history:")
        for entry in history:
            line = f"  {entry['at']}  {entry['event']:<9} {entry['api_key']}"
            if entry.get("previous"):
                line += f" (was {entry['previous']})"
            click.echo(line)


def _delete_advice(previous: dict[str, object]) -> str:
    """When the operator may delete the previous key in the Backpack web UI."""
    status = previous.get("status")
    if status == "retiring":
        return (
            f"delete it in the Backpack web UI after {previous.get('safe_to_delete_at')} "
            "(its last copy expires then)"
        )
    if status == "retired":
        return "no copy of it is left: delete it in the Backpack web UI now"
    return "it was revoked: delete it in the Backpack web UI if it is still listed there"


def _human(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value) if value not in ("", None) else "-"


@keys.command("retire")
@click.argument("key", callback=key_ref, metavar="SUB/NAME")
@pass_ctx
@handle_errors
def keys_retire(ctx: Context, key: KeyRef) -> None:
    """Stop handing a key out, for good (it stays in Vault for audit)."""
    record = ctx.vault().set_status(key, Status.RETIRED, now=now_iso())
    click.echo(f"{record.ref} is {record.status}")


@keys.command("delete")
@click.argument("key", callback=key_ref, metavar="SUB/NAME")
@click.option("--yes", is_flag=True, help="Confirm: every version and the metadata are destroyed.")
@pass_ctx
@handle_errors
def keys_delete(ctx: Context, key: KeyRef, yes: bool) -> None:
    """Delete a key and all its versions from Vault."""
    if not yes:
        raise ConfigError(f"deleting {key} destroys every version: run again with --yes")
    ctx.vault().delete_key(key)
    click.echo(f"deleted {key}")


_VERDICT_EXIT = {
    "VALID": 0,
    "UNKNOWN": ExchangeUnavailable.exit_code,
    "REJECTED": KeyRejected.exit_code,
    "MISCONFIGURED": InvalidInput.exit_code,
}
# A verdict from another exchange than the key's: shown, not written. The URL is wrong
# for this key, which is the operator's to fix.
_FOREIGN_EXIT = ConfigError.exit_code


def _operator(vault: Vault) -> str:
    """Who the caller is, as recorded with a status change: the Vault token's identity."""
    info = vault.token_info or vault.lookup_self()
    if info.display_name and info.entity_id:
        return f"{info.display_name} ({info.entity_id})"
    return info.identity


@keys.command("check")
@click.argument("key", callback=key_ref, metavar="SUB/NAME")
@click.option(
    "--backpack-url", help="Backpack REST base URL (default: $BACKPACK_VAULT_BACKPACK_URL)."
)
@click.option("--json", "as_json", is_flag=True, help="Stable JSON output.")
@pass_ctx
@handle_errors
def keys_check(ctx: Context, key: KeyRef, backpack_url: str | None, as_json: bool) -> None:
    """Run one signed liveness check now and print the verdict.

    Exit 0 VALID, 11 UNKNOWN (Backpack unreachable, maintenance, rate limited, clock,
    systemic), 12 REJECTED (confirmed: the key is now revoked), 3 MISCONFIGURED, 2 when
    the URL is not the key's exchange (the verdict is shown, never written).
    """
    import httpx  # noqa: PLC0415 - fast start for the other commands

    from backpack_vault.alerts import Webhook  # noqa: PLC0415
    from backpack_vault.backpack.rest import Exchange  # noqa: PLC0415
    from backpack_vault.checks import Checker  # noqa: PLC0415

    settings = ctx.settings(backpack_url=backpack_url)
    url = settings.checks.webhook_url
    with httpx.Client(timeout=httpx.Timeout(settings.checks.timeout)) as http:
        webhook = (  # a revocation found here alerts too
            Webhook(http, url, alert_format=settings.checks.alert_format) if url else None
        )
        exchange = Exchange(http, settings.checks.backpack_url, timeout_s=settings.checks.timeout)
        checker = Checker(ctx.vault(), exchange, emit=webhook.on_event if webhook else None)
        checked = checker.examine(key)
    result = checked.result
    if result.probes == 0 and result.old_status in ("revoked", "retired", "incomplete"):
        if result.old_status == "revoked":
            click.echo(f"if that was wrong: backpack-vault keys reinstate {key}", err=True)
        raise KeyNotUsable(str(key), str(result.old_status))
    if as_json:
        click.echo(json.dumps({**result.as_dict(), "not_written": checked.foreign}, indent=2))
    else:
        status = result.new_status or result.old_status or "-"
        change = f" (now {result.new_status})" if result.new_status else ""
        click.echo(f"{key}: {result.label}, status {status}{change}")
        if result.message:
            click.echo(f"  Backpack said: {result.message}", err=True)
        if checked.foreign:
            click.echo(f"  not written: {checked.foreign}", err=True)
    code = _FOREIGN_EXIT if checked.foreign else _VERDICT_EXIT.get(result.verdict.value, 1)
    if code:
        sys.exit(code)


@keys.command("revoke")
@click.argument("key", callback=key_ref, metavar="SUB/NAME")
@click.option("--reason", default="", help="Why: recorded with the change, with who and when.")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON output (the key's metadata).")
@pass_ctx
@handle_errors
def keys_revoke(ctx: Context, key: KeyRef, reason: str, as_json: bool) -> None:
    """Declare a key dead now: deleted in the web UI, or suspected leaked. No probe.

    The effect is a confirmed REJECTED's: no copy or signature from now on, unclaimed
    copies revoked, no more checks. Works on active and pending keys; a revoked key is
    left as it is. A wrong revocation is undone with `keys reinstate`.
    """
    vault = ctx.vault()
    current = vault.read_record(key)
    record = current
    if current.status is not Status.REVOKED:
        record = vault.set_status(
            key,
            Status.REVOKED,
            now=now_iso(),
            expect=current.status,
            reason=reason or "keys revoke",
            actor=_operator(vault),
        )
    if as_json:
        click.echo(json.dumps(record.as_public_dict(), indent=2))
    elif current.status is Status.REVOKED:
        by = f" by {record.status_by}" if record.status_by else ""
        click.echo(f"{key} was already revoked (since {record.status_since}{by})")
    else:
        click.echo(f"{key} is revoked (was {current.status}): no copy or signature from now on")
        standby = current.next
        if standby is not None and standby.role is Role.STANDBY and standby.ready:
            click.echo(
                f"its standby {standby.api_key} takes over within one check interval; "
                "workers see it as a rotation",
                err=True,
            )
        click.echo(f"if that was wrong: backpack-vault keys reinstate {key}", err=True)


@keys.command("reinstate")
@click.argument("key", callback=key_ref, metavar="SUB/NAME")
@click.option("--reason", default="", help="Why: recorded with the change, with who and when.")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON output.")
@pass_ctx
@handle_errors
def keys_reinstate(ctx: Context, key: KeyRef, reason: str, as_json: bool) -> None:
    """Make a revoked key active again, once its own exchange accepts it (one probe).

    The probe goes to the exchange the key belongs to (`keys show`: exchange), not to
    the configured URL. Only VALID changes anything. Exit 0 active again (or already
    active), 12 still REJECTED, 11 UNKNOWN, 3 MISCONFIGURED, 2 the answer came from
    another exchange (a sandbox posing as Backpack), 6 the key is not revoked.
    """
    import httpx  # noqa: PLC0415 - fast start for the other commands

    from backpack_vault.backpack.rest import Exchange  # noqa: PLC0415
    from backpack_vault.checks import Checker  # noqa: PLC0415

    settings = ctx.settings()
    vault = ctx.vault()
    record = vault.read_record(key)
    if record.status is Status.ACTIVE:
        shown = {"key": str(key), "status": "active", "reinstated": False, "check": None}
        if as_json:
            click.echo(json.dumps({**shown, "not_written": ""}, indent=2))
        else:
            click.echo(f"{key} is already active")
        return
    if record.status is not Status.REVOKED:
        raise WriteConflict(
            str(key), f"only a revoked key can be reinstated, and it is {record.status}"
        )
    with httpx.Client(timeout=httpx.Timeout(settings.checks.timeout)) as http:
        exchange = Exchange(http, record.exchange, timeout_s=settings.checks.timeout)
        checked = Checker(vault, exchange).reinstate(
            key,
            reason=reason or f"keys reinstate: VALID at {record.exchange}",
            actor=_operator(vault),
        )
    result = checked.result
    reinstated = result.new_status is Status.ACTIVE
    if as_json:
        shown = {
            "key": str(key),
            "status": "active" if reinstated else "revoked",
            "reinstated": reinstated,
            "check": result.as_dict(),
            "not_written": checked.foreign,
        }
        click.echo(json.dumps(shown, indent=2))
    elif reinstated:
        click.echo(f"{key} is active again: {record.exchange} accepted it")
    else:
        click.echo(f"{key}: {result.label}; still revoked")
        if result.message:
            click.echo(f"  Backpack said: {result.message}", err=True)
        if checked.foreign:
            click.echo(f"  not written: {checked.foreign}", err=True)
    if checked.foreign:
        sys.exit(_FOREIGN_EXIT)
    if not reinstated:
        sys.exit(_VERDICT_EXIT.get(result.verdict.value, 1) or ExchangeUnavailable.exit_code)


# -- vault and policies -------------------------------------------------------------------


@cli.group("vault")
def vault_group() -> None:
    """Prepare Vault for backpack-vault."""


@vault_group.command("setup")
@click.option(
    "--approle",
    "approle_subs",
    multiple=True,
    metavar="SUB",
    help="Enable AppRole with a worker role for this sub-account (repeatable).",
)
@click.option("--daemon-approle", is_flag=True, help="Also create the daemon's AppRole role.")
@click.option("--approle-mount", default="approle", show_default=True)
@click.option(
    "--kubernetes",
    "kubernetes",
    is_flag=True,
    help="Enable Kubernetes auth with a role for the daemon.",
)
@click.option("--kubernetes-role", default="backpack-vault", show_default=True)
@click.option("--kubernetes-service-account", default="backpack-vault", show_default=True)
@click.option(
    "--kubernetes-namespace",
    "kubernetes_namespaces",
    multiple=True,
    help="Namespace of the daemon's service account (repeatable).",
)
@click.option(
    "--kubernetes-worker",
    "kubernetes_workers",
    multiple=True,
    metavar="SUB",
    help="A Kubernetes worker role for this sub-account (repeatable).",
)
@click.option(
    "--kubernetes-worker-namespace",
    "kubernetes_worker_namespaces",
    multiple=True,
    help="Namespace the worker service accounts live in (repeatable).",
)
@click.option("--kubernetes-mount", default="kubernetes", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Stable JSON report.")
@pass_ctx
@handle_errors
def vault_setup(
    ctx: Context,
    approle_subs: tuple[str, ...],
    daemon_approle: bool,
    approle_mount: str,
    kubernetes: bool,
    kubernetes_role: str,
    kubernetes_service_account: str,
    kubernetes_namespaces: tuple[str, ...],
    kubernetes_workers: tuple[str, ...],
    kubernetes_worker_namespaces: tuple[str, ...],
    kubernetes_mount: str,
    as_json: bool,
) -> None:
    """Idempotent: KV v2 mount, policies, and optionally AppRole and Kubernetes roles."""
    from backpack_vault.vault.setup import KubernetesAuth, setup  # noqa: PLC0415 - fast start

    k8s = None
    if kubernetes:
        k8s = KubernetesAuth(
            role=kubernetes_role,
            service_account=kubernetes_service_account,
            namespaces=kubernetes_namespaces or ("backpack-vault",),
            mount=kubernetes_mount,
            worker_subaccounts=kubernetes_workers,
            worker_namespaces=kubernetes_worker_namespaces,
        )
    report = setup(
        ctx.vault(),
        ctx.settings(),
        approle_subaccounts=approle_subs,
        approle_daemon=daemon_approle,
        approle_mount=approle_mount,
        kubernetes=k8s,
    )
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else str(report))


@cli.group("policy")
def policy_group() -> None:
    """Print worker policies for the grant paths; export the shipped policies."""


@policy_group.command("worker")
@click.argument("sub")
@click.option("--key", "key_name", help="Only this key of the sub-account (default: all).")
@click.option(
    "--instruction",
    "instructions",
    multiple=True,
    help="Grant signing of this instruction (repeatable; default: read-only ones).",
)
@click.option("--copy", "copy", is_flag=True, help="Also grant wrapped copies of the key.")
@pass_ctx
@handle_errors
def policy_worker(
    ctx: Context, sub: str, key_name: str | None, instructions: tuple[str, ...], copy: bool
) -> None:
    """Print a worker policy: sign (and optionally copy) grants for one sub-account."""
    from backpack_vault.vault.setup import render_worker_policy  # noqa: PLC0415 - fast start

    grant_prefix = ctx.settings().vault.grant_prefix
    click.echo(render_worker_policy(grant_prefix, sub, key_name, instructions, copy=copy), nl=False)


@policy_group.command("export")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--configured",
    is_flag=True,
    help="Put the configured KV mount, KV prefix, grant prefix and max wrap TTL in place of "
    "the defaults, as `vault setup` writes them.",
)
@pass_ctx
@handle_errors
def policy_export(ctx: Context, directory: Path, configured: bool) -> None:
    """Write the policy HCL files shipped in the package into DIR, one file per policy.

    By default the files exactly as shipped, with the default names (secret, backpack,
    backpack-broker, 300s): what deploy/vault/policies holds. Files of the same name in DIR
    are replaced; other files are left alone.
    """
    from backpack_vault.vault.setup import export_policy_files  # noqa: PLC0415 - fast start

    files = export_policy_files(ctx.settings() if configured else None)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, hcl in files.items():
            (directory / name).write_text(hcl, encoding="utf-8")
            click.echo(directory / name)
    except OSError as exc:
        raise ConfigError(f"cannot write the policies into {directory}: {exc.strerror}") from exc


# -- servers ------------------------------------------------------------------------------


# -- exec ---------------------------------------------------------------------------------


@cli.command(
    "exec",
    context_settings={"ignore_unknown_options": False},
    epilog="""\b
Environment: BACKPACK_VAULT_DAEMON_URL (or --daemon), BACKPACK_VAULT_DAEMON_CACERT,
VAULT_ADDR, VAULT_CACERT, and the worker's Vault login: BACKPACK_VAULT_WORKER_AUTH
(token | token-file | approle | kubernetes), VAULT_TOKEN, BACKPACK_VAULT_WORKER_TOKEN_FILE,
BACKPACK_VAULT_WORKER_ROLE_ID(_FILE), BACKPACK_VAULT_WORKER_SECRET_ID(_FILE),
BACKPACK_VAULT_WORKER_K8S_ROLE, BACKPACK_VAULT_WORKER_JWT_FILE.

\b
Exit codes: CMD's own (128+N if signal N ended it); 6 CMD stopped because the key
was retired or revoked, or the key is not usable; 2 settings; 4 Vault login or
grant refused; 5 unknown key; 8 daemon or Vault unreachable; 126 CMD cannot run;
127 CMD not found.""",
)
@click.argument("key", callback=key_ref, metavar="SUB/NAME")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARGS]...")
@click.option("--daemon", "daemon_url", help="Daemon URL (default: $BACKPACK_VAULT_DAEMON_URL).")
@click.option(
    "--preset",
    type=click.Choice(["default", "freqtrade", "ccxt"]),
    default="default",
    show_default=True,
    help="Variable names: BACKPACK_API_KEY/_SECRET, FREQTRADE__EXCHANGE__KEY/__SECRET, "
    "CCXT_APIKEY/CCXT_SECRET.",
)
@click.option("--key-env", help="Name of the variable holding the API key.")
@click.option("--secret-env", help="Name of the variable holding the API secret.")
@click.option(
    "--file",
    "file_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the key to this 0600 file (atomically) instead of the environment.",
)
@click.option("--format", "file_format", type=click.Choice(["json", "env"]), default="json")
@click.option(
    "--on-change",
    multiple=True,
    metavar="[EVENT=]ACTION",
    help="EVENT: rotated, retired, revoked, refresh (none: rotated and refresh). ACTION: "
    "restart, stop, ignore, signal:NAME. Defaults: rotated=restart, refresh=restart "
    "(ignore with --file), retired=stop, revoked=stop.",
)
@click.option(
    "--grace", type=float, default=10.0, show_default=True, help="Seconds from SIGTERM to SIGKILL."
)
@click.option(
    "--failover-wait",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="After a revoke of a key with a ready standby: seconds to wait for the switch to "
    "it, CMD stopped meanwhile, before exiting as for a revoke (0: exit at once).",
)
@pass_ctx
@handle_errors
def exec_command(
    ctx: Context,
    key: KeyRef,
    command: tuple[str, ...],
    daemon_url: str | None,
    preset: str,
    key_env: str | None,
    secret_env: str | None,
    file_path: Path | None,
    file_format: str,
    on_change: tuple[str, ...],
    grace: float,
    failover_wait: float,
) -> None:
    """Run CMD with a copy of the key in its environment (or a file); restart or stop it
    when the key rotates, is retired or revoked. Signals are forwarded; CMD's exit code
    is exec's."""
    from backpack_vault import exec as runner  # noqa: PLC0415 - fast start
    from backpack_vault.client.broker import BrokerClient  # noqa: PLC0415 - fast start
    from backpack_vault.config import environ_snapshot  # noqa: PLC0415 - fast start

    environ = environ_snapshot()
    vault_addr = ctx.flags.get("vault_addr")
    if isinstance(vault_addr, str) and vault_addr:
        environ["VAULT_ADDR"] = vault_addr
    names = runner.PRESETS[preset]
    options = runner.ExecOptions(
        key=key,
        command=command,
        key_env=key_env or names[0],
        secret_env=secret_env or names[1],
        file=file_path.absolute() if file_path is not None else None,
        file_format="env" if file_format == "env" else "json",
        actions=runner.parse_on_change(on_change, file_sink=file_path is not None),
        grace_s=grace,
        failover_wait_s=failover_wait,
    )
    broker = BrokerClient.from_env(environ, url=daemon_url)
    sys.exit(runner.run(broker, options, environ))


@cli.command("serve")
@click.option(
    "--listen", metavar="HOST:PORT", help="Default: $BACKPACK_VAULT_LISTEN or 127.0.0.1:8280."
)
@click.option("--backpack-url", help="Backpack REST base URL.")
@click.option("--check-interval", type=float, help="Seconds between checks of one key.")
@click.option("--tls-cert", metavar="FILE", help="PEM certificate: serve HTTPS (with --tls-key).")
@click.option("--tls-key", metavar="FILE", help="PEM key of --tls-cert; both reload on SIGHUP.")
@pass_ctx
@handle_errors
def serve_command(
    ctx: Context,
    listen: str | None,
    backpack_url: str | None,
    check_interval: float | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """The daemon: worker API, liveness checks, token renewal. SIGTERM drains and exits 0."""
    from backpack_vault.daemon import Daemon  # noqa: PLC0415 - fast start

    settings = ctx.settings(
        listen=listen,
        backpack_url=backpack_url,
        check_interval=check_interval,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    sys.exit(Daemon(settings).run())


@cli.command("sandbox")
@click.option("--listen", default="127.0.0.1:8300", show_default=True, metavar="HOST:PORT")
@handle_errors
def sandbox_command(listen: str) -> None:
    """Serve the local Backpack exchange double (for tests, demos and your own bots)."""
    from backpack_vault.testing import sandbox  # noqa: PLC0415 - fast start

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--listen {listen!r} must be HOST:PORT")
    click.echo(
        f"sandbox exchange on http://{host}:{port} (admin routes under /_sandbox/)", err=True
    )
    sandbox.serve(host, int(port))


@cli.command("dev")
@click.option("--tour", is_flag=True, help="Run a scripted revocation scenario, then stop.")
@click.option(
    "--listen", metavar="HOST:PORT", help="The daemon's address. Default: 8280, else a free port."
)
@click.option(
    "--sandbox-port",
    type=click.IntRange(1, 65535),
    help="The sandbox exchange's port. Default: 8300, else a free port.",
)
@click.option(
    "--check-interval", type=float, help="Seconds between checks of one key. Default: 10 (tour: 1)."
)
@click.option(
    "--logs",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the servers' logs here and keep them (default: a temporary directory).",
)
@click.option(
    "--vault-addr",
    metavar="URL",
    help="Use this running Vault (token from VAULT_TOKEN) instead of a dev server. "
    "An exported VAULT_ADDR alone is ignored.",
)
@pass_ctx
@handle_errors
def dev_command(
    ctx: Context,
    tour: bool,
    listen: str | None,
    sandbox_port: int | None,
    check_interval: float | None,
    logs: Path | None,
    vault_addr: str | None,
) -> None:
    """The embedded default: OpenBao dev server, sandbox exchange, daemon, demo key and worker.

    Always starts its own OpenBao dev server, whatever VAULT_ADDR says, unless --vault-addr
    names a Vault explicitly (then the first line of output says so).
    Ctrl-C or SIGTERM stops every process it started. --tour revokes the demo key at the
    sandbox, shows the daemon cutting it off, and exits 0 when every step passed.
    """
    from backpack_vault.dev import env as devenv  # noqa: PLC0415 - fast start

    settings = ctx.settings(listen=listen, check_interval=check_interval)
    configure_logging("console", "warning")  # the terminal shows readable lines, not events
    options = devenv.DevOptions(
        tour=tour,
        listen=settings.listen if listen else None,
        sandbox_port=sandbox_port,
        check_interval=check_interval,
        logs=logs,
        vault_addr=vault_addr,
    )
    sys.exit(devenv.run(settings, options))


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="backpack-vault", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
