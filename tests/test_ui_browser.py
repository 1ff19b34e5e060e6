"""The operator page in a real browser: Debian's Chromium, driven by Playwright.

Covered: the login form, the key table, a status change appearing without a
reload, logout, and a worker token refused. Playwright downloads no browser
here: it drives ``/usr/bin/chromium`` (``apt-get install chromium``), with
flags that keep Chromium off the network it would otherwise call on its own.

The main test keeps a screenshot: in a temporary directory, or in
``docs/operator-page.png`` when ``UPDATE_SCREENSHOT=1`` is set (the shared
conftest removes every ``BACKPACK_VAULT_*`` variable, so the switch is named
otherwise)::

    UPDATE_SCREENSHOT=1 .venv/bin/python -m pytest tests/test_ui_browser.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.applications import Starlette

from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.clock import iso_utc
from backpack_vault.core.keys import KeyRef, Origin, Status, generate_pair
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.testing import make_record
from backpack_vault.ui import Activity, DaemonSource, create_ui, ui_routes
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.setup import (
    METADATA_READER_POLICY,
    load_policy_files,
    render_worker_policy,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "operator-page.png"
WAIT_MS = 10_000

try:
    from playwright.sync_api import BrowserContext, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - CI installs it (.ci/run, the dev extras)
    if os.environ.get("CI"):
        raise
    pytest.skip(
        "the playwright package is not installed: pip install playwright",
        allow_module_level=True,
    )
if not CHROMIUM.exists():  # pragma: no cover - CI installs it (.ci/run)
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium", pytrace=False)
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium", allow_module_level=True)

pytestmark = pytest.mark.slow


@dataclass
class Served:
    url: str
    vault: Vault
    activity: Activity
    outstanding: dict[KeyRef, int]
    reader: Secret
    worker: Secret


def _token(vault: Vault, name: str, hcl: str) -> Secret:
    provisioner = Provisioner(vault)
    policy = f"{vault.settings.kv_prefix}-{name}"
    provisioner.ensure_policy(policy, hcl)
    return provisioner.create_token([policy])


@pytest.fixture
def served(vault: Vault, vault_settings: VaultSettings) -> Iterator[Served]:
    """The page mounted at /ui as the worker API mounts it, over the real OpenBao."""
    shipped = load_policy_files(
        Settings(vault=vault_settings, broker=BrokerSettings(), checks=CheckSettings())
    )
    activity = Activity()
    outstanding: dict[KeyRef, int] = {}
    ready: tuple[bool, Mapping[str, object]] = (True, {"vault": "ok", "auth": "ok"})
    source = DaemonSource(
        vault,
        kv_mount=vault_settings.kv_mount,
        kv_prefix=vault_settings.kv_prefix,
        activity=activity,
        outstanding=lambda: outstanding,
        leader=lambda: "replica-5e2c81d0a4f1",
        readiness=lambda: ready,
    )
    app = Starlette(routes=ui_routes(create_ui(source)))
    app.router.redirect_slashes = False
    with ServerThread(app) as server:
        yield Served(
            server.url,
            vault,
            activity,
            outstanding,
            reader=_token(vault, "reader", shipped[METADATA_READER_POLICY]),
            worker=_token(
                vault, "worker", render_worker_policy(vault_settings.grant_prefix, "scalper")
            ),
        )


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    """Chromium with a fresh profile, closed by Playwright at the end."""
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1360, "height": 900},
            locale="en-GB",
            timezone_id="UTC",
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    """A tab that fails the test on any console error (a CSP violation, a script error)."""
    tab = browser.new_page()
    problems: list[str] = []
    tab.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: problems.append(str(e)))
    yield tab
    # A refused login is logged by Chromium as a failed resource load: that one is expected.
    assert [p for p in problems if "status of 40" not in p] == []


def log_in(page: Page, served: Served, token: Secret) -> int:
    """Open /ui, fill the form, submit; the HTTP status of the login answer."""
    page.goto(f"{served.url}/ui")
    expect(page.get_by_label("Vault token")).to_be_visible()
    page.get_by_label("Vault token").fill(token.reveal())
    with page.expect_response(lambda r: r.url.endswith("/ui/login")) as answer:
        page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state()
    return answer.value.status


def stock(served: Served) -> None:
    """A few keys, as an operator would have them, and an hour of handouts."""
    vault, now = served.vault, time.time()
    keys = [
        (KeyRef("main", "treasury"), "read-only balances", True, Origin.BACKPACK_UI),
        (KeyRef("scalper", "bot-a"), "desk 1 <scalping>", False, Origin.BACKPACK_UI),
        (KeyRef("scalper", "bot-b"), "desk 1 backup", False, Origin.GENERATED),
        (KeyRef("mm", "quoter"), "market making", False, Origin.BACKPACK_UI),
        (KeyRef("mm", "old-quoter"), "rotated out", False, Origin.BACKPACK_UI),
    ]
    for ref, label, read_only, origin in keys:
        pair = generate_pair()
        stamp = iso_utc(now - 86_400)
        status = Status.PENDING if origin is Origin.GENERATED else Status.ACTIVE
        record = make_record(
            ref,
            pair.api_key,
            status=status,
            read_only=read_only,
            origin=origin,
            label=label,
            now=stamp,
        )
        vault.create_key(record, pair.secret)
    stamp = iso_utc(now - 600)
    vault.set_status(KeyRef("mm", "old-quoter"), Status.RETIRED, now=stamp, actor="ops")
    stamp = iso_utc(now - 300)
    vault.set_status(KeyRef("scalper", "bot-b"), Status.ACTIVE, now=stamp, verdict="VALID")
    served.outstanding.update({KeyRef("scalper", "bot-a"): 2, KeyRef("mm", "quoter"): 1})
    for key in ("main/treasury", "scalper/bot-a", "scalper/bot-b", "mm/quoter"):
        served.activity.checked(key, "VALID", now=now - 120)
    for i in range(14):
        served.activity.record("approle-scalper", "sign", "scalper/bot-a", ok=True, now=now - i)
    served.activity.record("approle-scalper", "copy", "scalper/bot-b", ok=True, now=now - 30)
    for i in range(3):
        served.activity.record("approle-mm", "copy", "mm/quoter", ok=True, now=now - 60 * i)
    served.activity.record("approle-mm", "sign", "mm/old-quoter", ok=False, now=now - 5)


class TestOperatorPageInChromium:
    def test_log_in_see_a_status_change_live_and_log_out(
        self, page: Page, served: Served, tmp_path: Path
    ) -> None:
        """Login, the key table, a revoke appearing without a reload, logout."""
        stock(served)
        assert log_in(page, served, served.reader) == 303
        rows = page.locator("#keys-body tr[data-key]")
        expect(rows).to_have_count(5)
        bot_a = page.locator('#keys-body tr[data-key="scalper/bot-a"]')
        expect(bot_a.locator('[data-col="status"]')).to_have_text("active")
        expect(bot_a.locator('[data-col="label"]')).to_have_text("desk 1 <scalping>")
        expect(bot_a.locator('[data-col="outstanding"]')).to_have_text("2")
        expect(page.locator('[data-health="leader"] dd')).to_have_text("replica-5e2c81d0a4f1")
        expect(page.locator('#activity-body tr[data-identity="approle-scalper"]')).to_be_visible()

        page.evaluate("window.sameDocument = true")  # gone if the page reloads
        served.vault.set_status(
            KeyRef("scalper", "bot-a"),
            Status.REVOKED,
            now=iso_utc(),
            verdict="REJECTED",
            reason="Backpack rejected the key twice",
            actor="check",
        )
        expect(bot_a.locator('[data-col="status"]')).to_have_text("revoked", timeout=WAIT_MS)
        expect(bot_a.locator('[data-col="last_verdict"]')).to_have_text("REJECTED")
        expect(page.locator("#history-body tr").first.locator('[data-col="key"]')).to_have_text(
            "scalper/bot-a"
        )
        assert page.evaluate("window.sameDocument === true")
        expect(page.locator("#live")).to_have_class("live on")
        page.wait_for_timeout(2600)  # let the changed row's highlight fade for the picture

        shot = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert served.reader.reveal() not in page.content()

        page.get_by_role("button", name="Log out").click()
        expect(page.get_by_label("Vault token")).to_be_visible()
        expect(page.locator("#keys-body")).to_have_count(0)
        assert page.request.get(f"{served.url}/ui/state").status == 401
        page.goto(f"{served.url}/ui/")
        expect(page.get_by_label("Vault token")).to_be_visible()

    def test_a_worker_token_is_refused(self, page: Page, served: Served) -> None:
        """A worker's token: 403, the form again with the reason, no key in sight."""
        stock(served)
        assert log_in(page, served, served.worker) == 403
        expect(page.get_by_role("alert")).to_contain_text("may not read key metadata")
        expect(page.locator("#keys-body")).to_have_count(0)
        assert "scalper/bot-a" not in page.content()
        assert page.context.cookies() == []

    def test_without_a_session_the_page_is_the_login_form(self, page: Page, served: Served) -> None:
        """Straight to /ui/ in a fresh browser: only the form."""
        stock(served)
        page.goto(f"{served.url}/ui/")
        expect(page.get_by_role("button", name="Log in")).to_be_visible()
        expect(page.locator("table")).to_have_count(0)
