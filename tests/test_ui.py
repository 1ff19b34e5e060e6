"""The operator page over real loopback HTTP, in front of the session's real OpenBao.

The page is mounted at ``/ui`` of a small app as the worker API mounts it
(``ui_routes``, ``redirect_slashes`` off), and served by uvicorn in a thread.
Tokens are made with the shipped policies: metadata-reader, operator, and a
worker's grant-path policy.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import nacl.signing
import pytest
from starlette.applications import Starlette
from structlog.testing import capture_logs

from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyPair, KeyRef, Origin, Status
from backpack_vault.daemon.serving import ServerThread, free_port
from backpack_vault.errors import NotAuthenticated, NotPermitted, VaultUnavailable
from backpack_vault.testing import NOW, FakeClock, make_record, store_key
from backpack_vault.ui import (
    Activity,
    DaemonSource,
    LastCheck,
    Operator,
    _Sessions,
    create_ui,
    ui_routes,
)
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.vault.setup import (
    METADATA_READER_POLICY,
    OPERATOR_POLICY,
    load_policy_files,
    render_worker_policy,
)

LOGIN_FORM = 'name="token"'
KEY_TABLE = 'id="keys-body"'


def policy_token(vault: Vault, name: str, hcl: str, *, ttl: str = "1h") -> Secret:
    """A token whose one policy (besides default) is ``hcl``, named per test."""
    provisioner = Provisioner(vault)
    full = f"{vault.settings.kv_prefix}-{name}"
    provisioner.ensure_policy(full, hcl)
    return provisioner.create_token([full], ttl=ttl)


@dataclass
class Tokens:
    reader: Secret
    operator: Secret
    worker: Secret


@pytest.fixture
def tokens(vault: Vault, vault_settings: VaultSettings) -> Tokens:
    shipped = load_policy_files(
        Settings(vault=vault_settings, broker=BrokerSettings(), checks=CheckSettings())
    )
    worker_hcl = render_worker_policy(vault_settings.grant_prefix, "main", copy=True)
    return Tokens(
        reader=policy_token(vault, "reader", shipped[METADATA_READER_POLICY]),
        operator=policy_token(vault, "operator", shipped[OPERATOR_POLICY]),
        worker=policy_token(vault, "worker", worker_hcl),
    )


@dataclass
class Served:
    """The page at ``{url}/ui/`` and what feeds it."""

    url: str
    vault: Vault
    source: DaemonSource
    activity: Activity
    clock: FakeClock
    outstanding: dict[KeyRef, int]
    ready: list[tuple[bool, Mapping[str, object]]]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, follow_redirects=False)

    def login(self, http: httpx.Client, token: Secret, **headers: str) -> httpx.Response:
        return http.post("/ui/login", data={"token": token.reveal()}, headers=headers)


def serve_ui(vault: Vault, clock: FakeClock, **options: Any) -> tuple[Starlette, Served]:
    """The page mounted as the worker API mounts it, over a DaemonSource of ``vault``."""
    outstanding: dict[KeyRef, int] = {}
    ready: list[tuple[bool, Mapping[str, object]]] = [(True, {"vault": "ok", "auth": "ok"})]
    activity = Activity()
    source = DaemonSource(
        vault,
        kv_mount=vault.settings.kv_mount,
        kv_prefix=vault.settings.kv_prefix,
        activity=activity,
        outstanding=lambda: outstanding,
        leader=lambda: "replica-0123abcd",
        readiness=lambda: ready[-1],
        clock=clock,
    )
    app = Starlette(routes=ui_routes(create_ui(source, clock=clock, **options)))
    app.router.redirect_slashes = False  # as in the worker API
    return app, Served("", vault, source, activity, clock, outstanding, ready)


@pytest.fixture
def served(vault: Vault) -> Iterator[Served]:
    app, state = serve_ui(vault, FakeClock())
    with ServerThread(app) as server:
        state.url = server.url
        yield state


@pytest.fixture
def logged_in(served: Served, tokens: Tokens) -> Iterator[httpx.Client]:
    with served.client() as http:
        assert served.login(http, tokens.reader).status_code == 303
        yield http


def set_cookie(response: httpx.Response) -> str:
    return str(response.headers.get("set-cookie", ""))


class TestLoginForm:
    def test_without_a_session_only_the_login_form_is_shown(
        self, served: Served, vault: Vault
    ) -> None:
        """GET /ui/ with no cookie: the form, and nothing about any key."""
        store_key(vault, KeyRef("main", "bot-a"))
        with served.client() as http:
            page = http.get("/ui/")
            state = http.get("/ui/state")
        assert page.status_code == 200
        assert LOGIN_FORM in page.text
        assert KEY_TABLE not in page.text
        assert "bot-a" not in page.text
        assert state.status_code == 401
        assert state.json()["error"]["code"] == "not_authenticated"

    def test_ui_without_a_slash_leads_to_the_page(self, served: Served) -> None:
        """/ui is the documented route; it redirects to /ui/."""
        with served.client() as http:
            answer = http.get("/ui")
        assert answer.status_code == 307
        assert answer.headers["location"] == "/ui/"

    def test_every_answer_forbids_caching_and_framing(self, served: Served) -> None:
        """no-store, a strict CSP with no inline script, no framing, no referrer."""
        with served.client() as http:
            headers = http.get("/ui/").headers
        assert headers["cache-control"] == "no-store"
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"

    def test_the_static_files_are_served(self, served: Served) -> None:
        """The style sheet and the refresh script; nothing else under static/."""
        with served.client() as http:
            css = http.get("/ui/static/page.css")
            js = http.get("/ui/static/page.js")
            other = http.get("/ui/static/../__init__.py")
            missing = http.get("/ui/static/secret.txt")
        assert css.headers["content-type"].startswith("text/css")
        assert js.headers["content-type"].startswith("text/javascript")
        assert "fetch(" in js.text
        assert other.status_code == 404
        assert missing.status_code == 404


class TestLogin:
    @pytest.mark.parametrize("who", ["reader", "operator"], ids=str)
    def test_a_metadata_reader_or_operator_token_opens_a_session(
        self, served: Served, tokens: Tokens, vault: Vault, who: str
    ) -> None:
        """303 to the page, a strict cookie that is not the token, then the key table."""
        store_key(vault, KeyRef("main", "bot-a"))
        token: Secret = getattr(tokens, who)
        with served.client() as http:
            answer = served.login(http, token)
            page = http.get("/ui/")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/ui/"
        cookie = set_cookie(answer)
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Path=/ui" in cookie
        assert "Secure" not in cookie
        assert token.reveal() not in cookie
        assert KEY_TABLE in page.text
        assert 'data-key="main/bot-a"' in page.text
        assert LOGIN_FORM not in page.text

    def test_a_worker_token_is_refused_with_403(self, served: Served, tokens: Tokens) -> None:
        """A token with grant paths only (no KV metadata read): the form again, no cookie."""
        with served.client() as http:
            answer = served.login(http, tokens.worker)
        assert answer.status_code == 403
        assert LOGIN_FORM in answer.text
        assert "metadata-reader or operator token" in answer.text
        assert not set_cookie(answer)

    @pytest.mark.parametrize("how", ["unknown", "revoked", "empty"], ids=str)
    def test_a_dead_token_is_refused_with_401(self, served: Served, vault: Vault, how: str) -> None:
        """Unknown, revoked or missing: 401 and the form, never a traceback."""
        token = Secret("s.not-a-token")
        if how == "revoked":
            token = Provisioner(vault).create_token(["default"])
            httpx.post(
                f"{vault.settings.addr}/v1/auth/token/revoke-self",
                headers={"X-Vault-Token": token.reveal()},
            ).raise_for_status()
        with served.client() as http:
            answer = http.post(
                "/ui/login", data={"token": "" if how == "empty" else token.reveal()}
            )
        assert answer.status_code == 401
        assert LOGIN_FORM in answer.text
        assert "Traceback" not in answer.text
        assert not set_cookie(answer)

    def test_an_unreachable_vault_is_a_503_form_not_a_500(self) -> None:
        """Vault down at login: the form says so, with 503."""
        gone = Vault(VaultSettings(addr=f"http://127.0.0.1:{free_port()}", timeout=2))
        app, state = serve_ui(gone, FakeClock())
        with ServerThread(app) as server, httpx.Client(base_url=server.url) as http:
            answer = state.login(http, Secret("s.whatever"))
        gone.close()
        assert answer.status_code == 503
        assert "Vault cannot be asked right now" in answer.text

    def test_the_session_ends_with_a_shorter_token_ttl(self, served: Served, vault: Vault) -> None:
        """A token with 2 minutes left gets a cookie (and a session) of at most 2 minutes."""
        shipped = load_policy_files(
            Settings(vault=vault.settings, broker=BrokerSettings(), checks=CheckSettings())
        )
        token = policy_token(vault, "reader", shipped[METADATA_READER_POLICY], ttl="2m")
        with served.client() as http:
            answer = served.login(http, token)
        max_age = int(set_cookie(answer).split("Max-Age=")[1].split(";")[0])
        assert 100 <= max_age <= 120

    def test_under_tls_the_cookie_is_secure(self, vault: Vault, tokens: Tokens) -> None:
        """secure_cookies=True (the daemon serving TLS) marks the cookie Secure."""
        app, state = serve_ui(vault, FakeClock(), secure_cookies=True)
        with ServerThread(app) as server, httpx.Client(base_url=server.url) as http:
            answer = state.login(http, tokens.reader)
        assert "Secure" in set_cookie(answer)

    @pytest.mark.parametrize(
        "headers",
        [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}],
        ids=["other-origin", "null-origin", "cross-site-fetch"],
    )
    def test_a_login_from_another_site_is_refused(
        self, served: Served, tokens: Tokens, headers: dict[str, str]
    ) -> None:
        """A form posted from another origin opens no session, whatever the token."""
        with served.client() as http:
            answer = served.login(http, tokens.reader, **headers)
        assert answer.status_code == 403
        assert not set_cookie(answer)

    def test_a_login_from_the_page_itself_passes_the_origin_check(
        self, served: Served, tokens: Tokens
    ) -> None:
        """The browser's own Origin header (same host and port) is accepted."""
        with served.client() as http:
            answer = served.login(http, tokens.reader, Origin=served.url)
        assert answer.status_code == 303

    def test_login_attempts_are_limited(self, served: Served) -> None:
        """Ten attempts a minute per client; the eleventh is 429 without asking Vault."""
        with served.client() as http:
            answers = [served.login(http, Secret("s.guess")).status_code for _ in range(11)]
            served.clock.advance(60)
            later = served.login(http, Secret("s.guess")).status_code
        assert answers == [401] * 10 + [429]
        assert later == 401

    def test_a_get_of_the_login_route_leads_to_the_page(self, served: Served) -> None:
        """Reloading /ui/login after a failed login does not 405."""
        with served.client() as http:
            answer = http.get("/ui/login")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/ui/"


class TestSession:
    def test_logout_ends_the_session(self, served: Served, logged_in: httpx.Client) -> None:
        """POST /logout: 303 to the form, the cookie cleared, and the old reference is dead."""
        old = logged_in.cookies.get("bv_ui_session")
        answer = logged_in.post("/ui/logout")
        assert answer.status_code == 303
        assert 'bv_ui_session=""' in set_cookie(answer)
        with served.client() as http:
            http.cookies.set("bv_ui_session", old or "", path="/ui")
            assert http.get("/ui/state").status_code == 401
            assert LOGIN_FORM in http.get("/ui/").text

    @pytest.mark.usefixtures("served")
    def test_a_logout_from_another_site_is_refused(self, logged_in: httpx.Client) -> None:
        """A cross-site POST /logout changes nothing."""
        answer = logged_in.post("/ui/logout", headers={"Origin": "http://evil.example"})
        assert answer.status_code == 403
        assert logged_in.get("/ui/state").status_code == 200

    def test_a_session_lasts_one_hour_at_most(self, served: Served, root_token: Secret) -> None:
        """A token that never expires (root) still gets one hour: then the form says it ended."""
        with served.client() as http:
            served.login(http, root_token)
            served.clock.advance(3599)
            assert http.get("/ui/state").status_code == 200
            served.clock.advance(2)
            assert http.get("/ui/state").status_code == 401
            page = http.get("/ui/")
        assert LOGIN_FORM in page.text
        assert "session has ended" in page.text

    def test_a_session_ends_with_the_token(self, served: Served, vault: Vault) -> None:
        """A 10-minute token: its session is gone after 10 minutes, not an hour."""
        shipped = load_policy_files(
            Settings(vault=vault.settings, broker=BrokerSettings(), checks=CheckSettings())
        )
        token = policy_token(vault, "reader", shipped[METADATA_READER_POLICY], ttl="10m")
        with served.client() as http:
            served.login(http, token)
            served.clock.advance(590)
            assert http.get("/ui/state").status_code == 200
            served.clock.advance(15)
            assert http.get("/ui/state").status_code == 401

    def test_sessions_are_bounded_and_the_reference_is_not_kept(self) -> None:
        """Past the bound the session that would end first goes; only a hash is stored."""
        clock = FakeClock()
        sessions = _Sessions(clock, 3600, limit=2)
        opened = [
            sessions.open(Operator(name, ends))
            for name, ends in [("a", clock() + 60), ("b", None), ("c", None)]
        ]
        sids = [o[0] for o in opened if o is not None]
        assert len(sids) == 3
        assert sessions.get(sids[0]) is None
        assert [getattr(sessions.get(sid), "identity", None) for sid in sids[1:]] == ["b", "c"]
        assert len(sessions) == 2
        assert not [sid for sid in sids if sid in repr(sessions.__dict__)]
        assert sessions.open(Operator("d", clock() - 1)) is None  # a token that expired

    def test_a_made_up_cookie_is_no_session(self, served: Served, tokens: Tokens) -> None:
        """Only a reference the server handed out opens the page; a token in the cookie does not."""
        with served.client() as http:
            http.cookies.set("bv_ui_session", tokens.reader.reveal(), path="/ui")
            assert http.get("/ui/state").status_code == 401


class TestPage:
    def test_every_key_with_its_status_verdict_and_facts(
        self, served: Served, vault: Vault, logged_in: httpx.Client
    ) -> None:
        """Status, last verdict and its time, last check, sub-account, mode, origin, copies."""
        store_key(vault, KeyRef("main", "bot-a"))
        store_key(
            vault,
            KeyRef("scalper", "ro"),
            read_only=True,
            origin=Origin.GENERATED,
            status=Status.PENDING,
        )
        store_key(vault, KeyRef("scalper", "gone"))
        vault.set_status(
            KeyRef("scalper", "gone"), Status.REVOKED, now=NOW, verdict="REJECTED", actor="check"
        )
        served.outstanding[KeyRef("main", "bot-a")] = 3
        served.activity.checked("main/bot-a", "VALID", now=served.clock())
        keys = {k["key"]: k for k in logged_in.get("/ui/state").json()["keys"]}
        assert list(keys) == ["main/bot-a", "scalper/gone", "scalper/ro"]
        assert keys["main/bot-a"]["outstanding"] == 3
        assert keys["main/bot-a"]["last_check"]["verdict"] == "VALID"
        assert keys["scalper/gone"]["status"] == "revoked"
        assert keys["scalper/gone"]["last_verdict"] == "REJECTED"
        assert keys["scalper/gone"]["last_checked_at"] == NOW
        assert keys["scalper/ro"]["read_only"] is True
        assert keys["scalper/ro"]["origin"] == "generated"
        assert keys["scalper/ro"]["status"] == "pending"
        assert keys["scalper/ro"]["subaccount"] == "scalper"
        page = logged_in.get("/ui/").text
        for name in keys:
            assert f'data-key="{name}"' in page
        assert "read-only" in page
        assert "REJECTED" in page

    def test_health_leader_activity_and_history(
        self, served: Served, vault: Vault, logged_in: httpx.Client
    ) -> None:
        """Vault and exchange health, the leader, handouts per identity, status changes."""
        ref = KeyRef("main", "bot-a")
        store_key(vault, ref)
        vault.set_status(ref, Status.RETIRED, now=NOW, actor="ops")
        now = served.clock()
        served.activity.record("entity-1", "copy", "main/bot-a", ok=True, now=now)
        served.activity.record("entity-1", "sign", "main/bot-a", ok=True, now=now)
        served.activity.record("", "copy", "-", ok=False, now=now)
        served.activity.checked("main/bot-a", "UNKNOWN", "maintenance", now=now)
        served.ready.append((False, {"vault": "sealed", "auth": "ok"}))
        state = logged_in.get("/ui/state").json()
        assert state["health"] == {"vault": "sealed", "exchange": "maintenance"}
        assert state["leader"] == "replica-0123abcd"
        rows = {r["identity"]: r for r in state["activity"]}
        assert rows["entity-1"] | {"last_at": ""} == {
            "identity": "entity-1",
            "copies": 1,
            "signatures": 1,
            "refused": 0,
            "keys": ["main/bot-a"],
            "last_at": "",
        }
        assert rows["(token not recognised)"]["refused"] == 1
        assert rows["(token not recognised)"]["keys"] == []
        assert [(c["key"], c["status"]) for c in state["history"]] == [("main/bot-a", "retired")]
        assert state["operator"]["identity"]
        assert state["errors"] == {}

    def test_a_status_change_reaches_the_state_within_seconds(
        self, served: Served, vault: Vault, logged_in: httpx.Client
    ) -> None:
        """A revoke written to Vault (and its change feed) shows on the next poll."""
        ref = KeyRef("main", "bot-a")
        store_key(vault, ref)

        def status() -> str:
            keys = logged_in.get("/ui/state").json()["keys"]
            return str(next(k["status"] for k in keys if k["key"] == "main/bot-a"))

        assert status() == "active"
        vault.set_status(ref, Status.REVOKED, now=NOW)
        served.clock.advance(1.5)  # past the feed cache: the feed's new seq drops the key cache
        assert status() == "revoked"

    def test_a_key_added_without_a_change_appears_after_the_cache(
        self, served: Served, vault: Vault, logged_in: httpx.Client
    ) -> None:
        """keys add publishes no change: the list is re-read within keys_cache_s anyway."""
        store_key(vault, KeyRef("main", "bot-a"))
        assert len(logged_in.get("/ui/state").json()["keys"]) == 1
        store_key(vault, KeyRef("main", "bot-b"))
        served.clock.advance(11)
        assert len(logged_in.get("/ui/state").json()["keys"]) == 2

    def test_labels_are_escaped(self, vault: Vault, logged_in: httpx.Client) -> None:
        """Operator-written text is text: a label with markup does not become markup."""
        pair = KeyPair(*_pair())
        record = make_record(KeyRef("main", "xss"), pair.api_key, label='<img src=x onerror="1">')
        vault.create_key(record, pair.secret)
        page = logged_in.get("/ui/").text
        assert "<img src=x" not in page
        assert "&lt;img src=x onerror=&quot;1&quot;&gt;" in page

    def test_a_part_that_fails_is_named_and_the_rest_shown(
        self, served: Served, logged_in: httpx.Client, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Vault unavailable for the key list: the page says so and still shows the rest."""

        def down() -> list[Any]:
            raise VaultUnavailable("Vault is unreachable (list)")

        monkeypatch.setattr(served.source, "keys", down)
        answer = logged_in.get("/ui/state")
        page = logged_in.get("/ui/")
        assert answer.status_code == 200
        assert answer.json()["errors"] == {"keys": "Vault is unreachable (list)"}
        assert answer.json()["leader"] == "replica-0123abcd"
        assert page.status_code == 200
        assert "Vault is unreachable (list)" in page.text

    def test_a_bug_in_a_part_is_not_a_500(
        self, served: Served, logged_in: httpx.Client, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unexpected exception in one part is logged by type and shown as internal."""

        def broken() -> str:
            raise RuntimeError("boom")

        monkeypatch.setattr(served.source, "leader", broken)
        with capture_logs() as logs:
            answer = logged_in.get("/ui/state")
        assert answer.status_code == 200
        assert "internal error" in answer.json()["errors"]["leader"]
        assert [e["error"] for e in logs if e["event"] == "ui.part_failed"] == ["RuntimeError"]


# -- nothing secret, ever --------------------------------------------------------------------------

CANARY_SEED = b"UI-CANARY-SECRET-never-shown-000"


def _pair() -> tuple[str, Secret]:
    signing_key = nacl.signing.SigningKey(CANARY_SEED)
    return (
        base64.b64encode(bytes(signing_key.verify_key)).decode(),
        Secret(base64.b64encode(CANARY_SEED).decode()),
    )


class TestNoSecretLeaks:
    def test_no_page_or_answer_holds_a_secret_or_token(
        self,
        served: Served,
        vault: Vault,
        tokens: Tokens,
        capfd: pytest.CaptureFixture[str],
    ) -> None:
        """The canary key's secret, the login tokens and the cookie value never show."""
        pair = KeyPair(*_pair())
        ref = KeyRef("main", "canary")
        record = make_record(ref, pair.api_key, label="desk 1: harmless words")
        vault.create_key(record, pair.secret)
        vault.set_status(ref, Status.REVOKED, now=NOW, reason="operator says: harmless")
        served.activity.record("entity-1", "copy", str(ref), ok=True, now=served.clock())
        texts: list[str] = []
        with capture_logs() as logs, served.client() as http:
            for token in (tokens.worker, Secret("s.dead-token"), tokens.reader):
                answer = served.login(http, token)
                texts += [answer.text, str(answer.headers)]
            page, state = http.get("/ui/").text, http.get("/ui/state").text
            texts += [page, state, http.get("/ui/login").text, http.post("/ui/logout").text]
            texts.append(http.get("/ui/").text)
        assert "desk 1: harmless words" in page  # the canary key is shown...
        assert "operator says: harmless" in page
        assert "desk 1: harmless words" in state
        out, err = capfd.readouterr()
        haystack = "\n".join([*texts, repr(logs), out, err])
        needles = {
            "secret": pair.secret.reveal(),
            "seed": CANARY_SEED.decode(),
            "reader-token": tokens.reader.reveal(),
            "worker-token": tokens.worker.reveal(),
            "dead-token": "s.dead-token",
            "root-token": vault.settings.token.reveal() if vault.settings.token else "-",
        }  # ...and nothing secret is
        assert [name for name, value in needles.items() if value in haystack] == []


# -- the parts, without HTTP ----------------------------------------------------------------------


class TestActivity:
    def test_counts_per_identity_over_the_last_hour(self) -> None:
        """Copies, signatures and refusals per identity; an hour later they are gone."""
        activity = Activity()
        now = 1_000_000.0
        activity.record("a", "copy", "main/x", ok=True, now=now)
        activity.record("a", "sign", "main/y", ok=True, now=now + 10)
        activity.record("a", "sign", "main/y", ok=False, now=now + 20)
        activity.record("b", "sign", "main/x", ok=True, now=now + 30)
        rows = activity.summary(now + 60)
        assert [(r.identity, r.copies, r.signatures, r.refused) for r in rows] == [
            ("a", 1, 1, 1),
            ("b", 0, 1, 0),
        ]
        assert rows[0].keys == ("main/x", "main/y")
        assert rows[0].last_at == now + 20
        assert activity.summary(now + 3600 + 60) == []

    def test_it_is_bounded(self) -> None:
        """Identities past the bound count as (other); key names per identity are capped."""
        activity = Activity(max_identities=2, max_keys=1)
        for name in ("a", "b", "c", "d"):
            activity.record(name, "copy", f"main/{name}", ok=True, now=0.0)
        activity.record("a", "copy", "main/zz", ok=True, now=0.0)
        rows = {r.identity: r for r in activity.summary(1.0)}
        assert set(rows) == {"a", "b", "(other)"}
        assert rows["(other)"].copies == 2
        assert rows["a"].keys == ("main/a",)

    def test_only_copy_and_sign_are_kinds(self) -> None:
        """A typo in the wiring fails loudly."""
        with pytest.raises(ValueError, match="kind"):
            Activity().record("a", "report", "main/x", ok=True, now=0.0)  # type: ignore[arg-type]

    def test_the_last_check_of_each_key_is_kept(self) -> None:
        """checked() keeps the latest verdict per key."""
        activity = Activity()
        activity.checked("main/x", "UNKNOWN", "network", now=1.0)
        activity.checked("main/x", "VALID", now=2.0)
        assert activity.last_checks() == {"main/x": LastCheck(2.0, "VALID", "")}


def source_for(
    vault: Vault,
    *,
    readiness: Callable[[], tuple[bool, Mapping[str, object]]] = lambda: (True, {}),
    exchange: Callable[[], str] | None = None,
) -> DaemonSource:
    return DaemonSource(
        vault,
        kv_mount=vault.settings.kv_mount,
        kv_prefix=vault.settings.kv_prefix,
        activity=Activity(),
        outstanding=dict,
        leader=lambda: None,
        readiness=readiness,
        exchange=exchange,
    )


class TestDaemonSource:
    def test_authorize_asks_vault_about_the_metadata_path(
        self, vault: Vault, tokens: Tokens
    ) -> None:
        """read or list on <mount>/metadata/<prefix>/* is enough; a worker token is refused."""
        source = source_for(vault)
        assert source.metadata_path == f"secret/metadata/{vault.settings.kv_prefix}/*"
        operator = source.authorize(tokens.reader)
        assert operator.identity.startswith("token")
        assert operator.expires_at is not None
        with pytest.raises(NotPermitted):
            source.authorize(tokens.worker)
        with pytest.raises(NotAuthenticated):
            source.authorize(Secret("s.unknown"))

    def test_history_is_newest_first_and_limited(self, vault: Vault) -> None:
        """The change feed's latest entries, newest first."""
        for name in ("a", "b", "c"):
            store_key(vault, KeyRef("main", name))
            vault.set_status(KeyRef("main", name), Status.RETIRED, now=NOW)
        history = source_for(vault).history(2)
        assert [str(c.ref) for c in history[:2]] == ["main/c", "main/b"]
        assert len(history) == 2
        assert source_for(vault).history(0) == []

    @pytest.mark.parametrize(
        ("readiness", "word"),
        [
            ((True, {"vault": "ok", "auth": "ok"}), "ok"),
            ((False, {"vault": "unreachable", "auth": "ok"}), "unreachable"),
            ((False, {"vault": "ok", "auth": "failed"}), "login failed"),
            ((False, {"vault": "ok", "auth": "ok", "missing": ["kv_mount"]}), "missing kv_mount"),
            ((False, {}), "not ready"),
        ],
        ids=["ok", "unreachable", "auth", "missing", "bare"],
    )
    def test_vault_health_is_said_in_a_word(
        self, vault: Vault, readiness: tuple[bool, Mapping[str, object]], word: str
    ) -> None:
        """The readiness details, boiled down to what an operator looks at first."""
        assert source_for(vault, readiness=lambda: readiness).health()["vault"] == word

    def test_exchange_health_comes_from_the_callable_or_the_last_check(self, vault: Vault) -> None:
        """Given a callable, it says; else the last check here; else that there is none."""
        assert source_for(vault, exchange=lambda: "maintenance").health()["exchange"] == (
            "maintenance"
        )
        source = source_for(vault)
        assert source.health()["exchange"] == "no checks on this replica"
        source._activity.checked("main/a", "REJECTED", now=1.0)
        assert source.health()["exchange"] == "ok"
        source._activity.checked("main/b", "UNKNOWN", "rate_limited", now=2.0)
        assert source.health()["exchange"] == "rate_limited"

    def test_a_key_deleted_between_list_and_read_is_skipped(
        self, vault: Vault, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """list_refs then read_record: a key gone in between is not an error."""
        store_key(vault, KeyRef("main", "a"))
        store_key(vault, KeyRef("main", "b"))
        real = vault.list_refs
        monkeypatch.setattr(vault, "list_refs", lambda: [*real(), KeyRef("main", "ghost")])
        records = source_for(vault).keys()
        assert [str(r.ref) for r in records] == ["main/a", "main/b"]
