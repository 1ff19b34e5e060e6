"""The page's data (the ``/state`` JSON) and its HTML, every value escaped.

The JSON is the one view of the data: the server renders the first page from it
and ``page.js`` rebuilds the tables from it on every refresh, the same way.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar

from backpack_vault.core.clock import iso_utc
from backpack_vault.core.keys import KeyRecord
from backpack_vault.errors import ServiceError, UpstreamError
from backpack_vault.logging import get_logger
from backpack_vault.ui.source import OK, ActivityRow, LastCheck, UiSource
from backpack_vault.vault.port import Change

__all__ = ["HISTORY_LIMIT", "REFRESH_MS", "gather", "login_page", "page"]

log = get_logger("backpack_vault.ui")

HISTORY_LIMIT: Final = 20
REFRESH_MS: Final = 2000
_T = TypeVar("_T")


def _key_row(
    record: KeyRecord, outstanding: Mapping[str, int], checks: Mapping[str, LastCheck]
) -> dict[str, object]:
    name = str(record.ref)
    check = checks.get(name)
    return {
        "key": name,
        "subaccount": record.ref.subaccount,
        "label": record.label,
        "status": record.status.value,
        "status_since": record.status_since,
        "status_reason": record.status_reason,
        "status_by": record.status_by,
        "last_verdict": record.last_verdict,
        "last_checked_at": record.last_checked_at,
        "last_check": check.as_dict() if check is not None else None,
        "read_only": record.read_only,
        "origin": record.origin.value,
        "exchange": record.exchange,
        "api_key": record.api_key,
        "outstanding": outstanding.get(name, 0),
    }


def _rotation_row(record: KeyRecord) -> dict[str, object] | None:
    """A key's successor or standby, predecessor and last rotation; None when it has none."""
    nxt, previous = record.next, record.previous
    if nxt is None and previous is None and not record.history:
        return None
    last = record.history[-1] if record.history else None
    return {
        "key": str(record.ref),
        "api_key": record.api_key,
        "next": nxt.as_public_dict() if nxt else None,
        "previous": previous.as_public_dict() if previous else None,
        "advice": rotation_advice(record),
        "last_event": last.as_public_dict() if last else None,
        "events": len(record.history),
    }


def rotation_advice(record: KeyRecord) -> str:
    """What the operator does next about a key's rotation, in one sentence."""
    nxt, previous = record.next, record.previous
    if previous is not None and previous.status == "retiring":
        return (
            f"Delete {previous.api_key} in the Backpack UI after {_when(previous.safe_at)} UTC, "
            "when its last copy has expired."
        )
    if previous is not None and previous.status == "retired":
        return f"Delete {previous.api_key} in the Backpack UI now: no copy of it is left."
    if nxt is not None and nxt.role.value == "successor":
        return (
            f"Create an API key in the Backpack UI with the public key {nxt.api_key}; "
            "the name switches to it once Backpack accepts it."
        )
    if nxt is not None and not nxt.ready:
        return f"Create an API key in the Backpack UI with the public key {nxt.api_key}."
    if nxt is None and record.history and record.history[-1].event == "failover":
        return "A failover used the standby: store a new one (keys add --standby)."
    return ""


def gather(source: UiSource, identity: str, ends_at: float, now: float) -> dict[str, object]:
    """The page's data (the /state JSON). A part that fails is named in ``errors``."""
    errors: dict[str, str] = {}

    def part(name: str, read: Callable[[], _T], empty: _T) -> _T:
        try:
            return read()
        except ServiceError as exc:
            errors[name] = exc.message if isinstance(exc, UpstreamError) else exc.code
        except Exception as exc:  # noqa: BLE001 - one part failing must not blank the page
            log.error("ui.part_failed", part=name, error=type(exc).__name__)  # noqa: TRY400
            errors[name] = "internal error; see the daemon's logs"
        return empty

    records: list[KeyRecord] = part("keys", source.keys, [])
    outstanding: Mapping[str, int] = part("outstanding", source.outstanding, {})
    checks: Mapping[str, LastCheck] = part("last_checks", source.last_checks, {})
    health: Mapping[str, str] = part("health", source.health, {})
    activity: list[ActivityRow] = part("activity", lambda: source.activity(now), [])
    history: list[Change] = part("history", lambda: source.history(HISTORY_LIMIT), [])
    return {
        "operator": {"identity": identity, "session_ends_at": iso_utc(ends_at)},
        "now": iso_utc(now),
        "health": dict(health),
        "leader": part("leader", source.leader, None),
        "keys": [_key_row(r, outstanding, checks) for r in sorted(records, key=lambda r: r.ref)],
        "rotations": [
            row
            for row in (_rotation_row(r) for r in sorted(records, key=lambda r: r.ref))
            if row is not None
        ],
        "outstanding_total": sum(outstanding.values()),
        "activity": [r.as_dict() for r in activity],
        "history": [c.as_dict() for c in history],
        "errors": errors,
    }


# -- HTML ----------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(iso: object) -> str:
    """An ISO timestamp as the page shows it (the columns say UTC); the JS does the same."""
    text = "" if iso is None else str(iso)
    return text.replace("T", " ").removesuffix("Z") if text else "\u2014"


def _document(body: str, *, refresh: bool) -> str:
    noscript = '<noscript><meta http-equiv="refresh" content="10"></noscript>' if refresh else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="same-origin">'
        f"<title>backpack-vault operator page</title>{noscript}"
        '<link rel="stylesheet" href="static/page.css">'
        '<script src="static/page.js" defer></script>'
        f"</head><body>{body}</body></html>\n"
    )


def login_page(message: str = "") -> str:
    notice = f'<p class="notice" role="alert">{_e(message)}</p>' if message else ""
    return _document(
        '<main class="login"><h1>backpack-vault</h1>'
        "<p>Log in with a Vault token that may read key metadata "
        "(a metadata-reader or operator token). The token is checked with Vault once and "
        "not kept; the session ends with the token or after an hour.</p>"
        f"{notice}"
        '<form method="post" action="login" autocomplete="off">'
        '<label for="token">Vault token</label>'
        '<input id="token" name="token" type="password" required autocomplete="off" '
        'spellcheck="false" autofocus>'
        '<button type="submit">Log in</button></form></main>',
        refresh=False,
    )


def _health_items(state: Mapping[str, object]) -> str:
    health = state.get("health")
    items = dict(health) if isinstance(health, Mapping) else {}
    leader = state.get("leader")
    cells = [(name, str(items.get(name, "unknown"))) for name in ("vault", "exchange")]
    parts = [
        f'<div class="health-item" data-health="{_e(name)}"><dt>{_e(name.capitalize())}</dt>'
        f'<dd class="{"ok" if word == OK else "warn"}">{_e(word)}</dd></div>'
        for name, word in cells
    ]
    parts.append(
        '<div class="health-item" data-health="leader"><dt>Leader replica</dt>'
        f'<dd class="{"ok" if leader else "warn"}">{_e(leader or "none")}</dd></div>'
    )
    parts.append(
        '<div class="health-item" data-health="outstanding"><dt>Outstanding copies</dt>'
        f"<dd>{_e(state.get('outstanding_total', 0))}</dd></div>"
    )
    return "".join(parts)


def _cell(col: str, text: object, cls: str = "", title: object = "") -> str:
    klass = f' class="{_e(cls)}"' if cls else ""
    tip = f' title="{_e(title)}"' if title else ""
    return f'<td data-col="{col}"{klass}{tip}>{_e(text)}</td>'


def _key_rows(keys: Sequence[Mapping[str, object]]) -> str:
    if not keys:
        return '<tr class="empty"><td colspan="11">No keys stored.</td></tr>'
    rows = []
    for k in keys:
        check = k.get("last_check")
        check_text = "\u2014"
        if isinstance(check, Mapping):
            verdict = f"{check.get('verdict', '')} {check.get('reason', '')}".strip()
            check_text = f"{_when(check.get('at'))} {verdict}"
        label = str(k.get("label") or "")
        reason = str(k.get("status_reason") or "")
        by = str(k.get("status_by") or "")
        why = f"{reason} ({by})" if reason and by else reason or by
        rows.append(
            f'<tr data-key="{_e(k["key"])}">'
            + _cell("key", k["key"], "key", k.get("api_key"))
            + _cell("label", label or "\u2014")
            + _cell("subaccount", k.get("subaccount"))
            + _cell("status", k.get("status"), f"status status-{k.get('status')}", why)
            + _cell("status_since", _when(k.get("status_since")), "time")
            + _cell("last_verdict", k.get("last_verdict") or "\u2014")
            + _cell("last_checked_at", _when(k.get("last_checked_at")), "time")
            + _cell("last_check", check_text, "time")
            + _cell("read_only", "read-only" if k.get("read_only") else "trading")
            + _cell("origin", k.get("origin"))
            + _cell("outstanding", k.get("outstanding", 0), "num")
            + "</tr>"
        )
    return "".join(rows)


def _rotation_rows(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return '<tr class="empty"><td colspan="6">No rotation, standby or failover.</td></tr>'
    out = []
    for r in rows:
        nxt = r.get("next")
        previous = r.get("previous")
        last = r.get("last_event")
        next_text = (
            f"{nxt.get('role')} {nxt.get('api_key')} ({nxt.get('status')})"
            if isinstance(nxt, Mapping)
            else "—"
        )
        prev_text = (
            f"{previous.get('api_key')} ({previous.get('status')})"
            if isinstance(previous, Mapping)
            else "—"
        )
        last_text = (
            f"{_when(last.get('at'))} {last.get('event')}" if isinstance(last, Mapping) else "—"
        )
        out.append(
            f'<tr data-rotation="{_e(r["key"])}">'
            + _cell("key", r["key"], "key")
            + _cell("api_key", r.get("api_key"), "key")
            + _cell("next", next_text)
            + _cell("previous", prev_text)
            + _cell("last_event", last_text, "time")
            + _cell("advice", r.get("advice") or "—")
            + "</tr>"
        )
    return "".join(out)


def _activity_rows(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return '<tr class="empty"><td colspan="6">No handouts in the last hour.</td></tr>'
    out = []
    for r in rows:
        keys = r.get("keys")
        out.append(
            f'<tr data-identity="{_e(r["identity"])}">'
            + _cell("identity", r["identity"])
            + _cell("copies", r.get("copies", 0), "num")
            + _cell("signatures", r.get("signatures", 0), "num")
            + _cell("refused", r.get("refused", 0), "num")
            + _cell("keys", ", ".join(map(str, keys)) if isinstance(keys, list) else "")
            + _cell("last_at", _when(r.get("last_at")))
            + "</tr>"
        )
    return "".join(out)


def _history_rows(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return '<tr class="empty"><td colspan="4">No status changes yet.</td></tr>'
    return "".join(
        f'<tr data-seq="{_e(c["seq"])}">'
        + _cell("at", _when(c.get("at")))
        + _cell("key", c.get("key"))
        + _cell("status", c.get("status"), f"status status-{c.get('status')}")
        + _cell("note", _change_note(c))
        + "</tr>"
        for c in rows
    )


def _change_note(change: Mapping[str, object]) -> str:
    if change.get("deleted"):
        return "deleted"
    if change.get("event") == "rotated":
        return f"rotated to {change.get('api_key')}"
    return ""


def _errors(state: Mapping[str, object]) -> str:
    errors = state.get("errors")
    if not isinstance(errors, Mapping) or not errors:
        return ""
    items = "".join(f"<li>{_e(name)}: {_e(text)}</li>" for name, text in errors.items())
    return f"<ul>{items}</ul>"


_KEY_HEAD: Final = (
    "Key", "Label", "Sub-account", "Status", "Since (UTC)", "Last verdict", "Verdict at (UTC)",
    "Last check here (UTC)", "Mode", "Origin", "Copies out",
)  # fmt: skip


def _table(name: str, caption: str, head: Sequence[str], rows: str) -> str:
    th = "".join(f'<th scope="col">{_e(h)}</th>' for h in head)
    return (
        f'<section aria-labelledby="{name}-title"><h2 id="{name}-title">{_e(caption)}</h2>'
        f'<div class="scroll"><table id="{name}"><thead><tr>{th}</tr></thead>'
        f'<tbody id="{name}-body">{rows}</tbody></table></div></section>'
    )


def page(state: Mapping[str, object]) -> str:
    operator = state.get("operator")
    operator = operator if isinstance(operator, Mapping) else {}
    keys = state.get("keys")
    activity = state.get("activity")
    history = state.get("history")
    rotations = state.get("rotations")
    body = (
        f'<main data-state="state" data-every="{REFRESH_MS}">'
        '<header><h1>backpack-vault</h1><div class="who">'
        f'<span>Logged in as <strong id="identity">{_e(operator.get("identity"))}</strong></span> '
        f'<span>until <time id="session-ends">{_e(_when(operator.get("session_ends_at")))}'
        "</time> UTC</span> "
        '<form method="post" action="logout"><button type="submit">Log out</button></form>'
        "</div></header>"
        f'<dl id="health" class="health">{_health_items(state)}</dl>'
        f'<div id="errors" class="notice" role="status">{_errors(state)}</div>'
        + _table("keys", "Keys", _KEY_HEAD, _key_rows(keys if isinstance(keys, list) else []))
        + _table(
            "rotations",
            "Rotations, standbys and old keys",
            ("Key", "Current API key", "Successor or standby", "Previous key", "Last", "To do"),
            _rotation_rows(rotations if isinstance(rotations, list) else []),
        )
        + _table(
            "activity",
            "Handouts in the last hour, per worker identity",
            ("Identity", "Copies", "Signatures", "Refused", "Keys", "Last (UTC)"),
            _activity_rows(activity if isinstance(activity, list) else []),
        )
        + _table(
            "history",
            "Recent status changes",
            ("At (UTC)", "Key", "Status", ""),
            _history_rows(history if isinstance(history, list) else []),
        )
        + '<footer><span id="live" class="live">Updated '
        f'<time id="updated">{_e(_when(state.get("now")))}</time> UTC</span>'
        "<span>Never shows a secret or a token.</span></footer></main>"
    )
    return _document(body, refresh=True)
