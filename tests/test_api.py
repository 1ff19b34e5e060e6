"""The worker API over real loopback HTTP: routes, the error table, metrics, and no leaks.

The app is served by uvicorn in a thread (``ServerThread``) in front of a broker
talking to the session's real OpenBao dev server.
"""

from __future__ import annotations

import base64
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import nacl.signing
import pytest
import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from backpack_vault.api import _Api, _Refills, create_app
from backpack_vault.backpack.signing import signing_string, verify
from backpack_vault.broker import COPY, Broker
from backpack_vault.config import BrokerSettings, Secret, VaultSettings
from backpack_vault.core.keys import KeyPair, KeyRef, Status
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import ServiceError
from backpack_vault.events import Cause, KeyStatusChanged
from backpack_vault.metrics import Metrics
from backpack_vault.testing import NOW, FakeClock, store_key, wait_until
from backpack_vault.vault.client import Provisioner, Vault

ORDER = {"symbol": "SOL_USDC", "side": "Bid", "orderType": "Limit", "price": "1", "quantity": "1"}


@dataclass
class Served:
    url: str
    vault_addr: str
    root: Secret
    broker: Broker
    clock: FakeClock
    vault: Vault
    reports: list[tuple[str, str]] = field(default_factory=list)
    ready: list[Any] = field(default_factory=lambda: [True])

    def call(
        self,
        method: str,
        path: str,
        *,
        token: Secret | None = None,
        bearer: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        headers: dict[str, str] = {}
        if token is not None:
            headers = (
                {"Authorization": f"Bearer {token.reveal()}"}
                if bearer
                else {"X-Vault-Token": token.reveal()}
            )
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=10, **kwargs)

    def sign(self, body: dict[str, Any]) -> httpx.Response:
        """POST /v1/keys/main/bot-a/sign with ``body``, as the root token."""
        return self.call("POST", "/v1/keys/main/bot-a/sign", token=self.root, json=body)

    def unwrap(self, wrap_token: str) -> httpx.Response:
        return httpx.post(
            f"{self.vault_addr}/v1/sys/wrapping/unwrap", headers={"X-Vault-Token": wrap_token}
        )


@pytest.fixture
def served(vault: Vault, vault_settings: VaultSettings, dev_vault: DevVault) -> Iterator[Served]:
    clock = FakeClock()
    broker = Broker(vault, BrokerSettings(), grant_prefix=vault_settings.grant_prefix, clock=clock)
    state = Served("", dev_vault.addr, dev_vault.root_token, broker, clock, vault)

    def readiness() -> bool | tuple[bool, str]:
        return state.ready[-1]

    app = create_app(
        broker,
        readiness=readiness,
        metrics=Metrics(CollectorRegistry()),
        report=lambda ref, reason: state.reports.append((str(ref), reason)),
        report_interval_s=60,
        clock=clock,
    )
    with ServerThread(app) as server:
        state.url = server.url
        yield state


@pytest.fixture
def key(vault: Vault) -> KeyPair:
    return store_key(vault, KeyRef("main", "bot-a"))


def worker_token(vault: Vault, grants: str, hcl: str) -> Secret:
    """A token whose only non-default policy is ``hcl`` with GRANTS replaced by the prefix."""
    name = f"{vault.settings.kv_prefix}-{abs(hash(hcl)) % 10**8}"
    provisioner = Provisioner(vault)
    provisioner.ensure_policy(name, hcl.replace("GRANTS", grants))
    return provisioner.create_token([name])


class TestCopyRoute:
    @pytest.mark.parametrize("bearer", [False, True], ids=["x-vault-token", "bearer"])
    def test_copy_answers_the_documented_fields(
        self, served: Served, key: KeyPair, bearer: bool
    ) -> None:
        """POST .../copy returns wrap_token, wrap_ttl, expires_at, api_key, version."""
        answer = served.call("POST", "/v1/keys/main/bot-a/copy", token=served.root, bearer=bearer)
        assert answer.status_code == 200
        body = answer.json()
        assert set(body) == {"wrap_token", "wrap_ttl", "expires_at", "api_key", "version"}
        assert body["api_key"] == key.api_key
        assert body["wrap_ttl"] == 60
        assert body["expires_at"].endswith("Z")

    def test_the_copy_unwraps_once_at_vault(self, served: Served, key: KeyPair) -> None:
        """The wrapping token yields the secret at Vault once; a second unwrap fails."""
        body = served.call("POST", "/v1/keys/main/bot-a/copy", token=served.root).json()
        first = served.unwrap(body["wrap_token"])
        assert first.json()["data"]["api_secret"] == key.secret.reveal()
        assert served.unwrap(body["wrap_token"]).status_code == 400

    @pytest.mark.usefixtures("key")
    def test_a_key_in_demand_is_copied_from_a_spare(self, served: Served) -> None:
        """After two quick copies, spares are wrapped off the request path; the next is one."""
        path = "/v1/keys/main/bot-a/copy"
        for _ in range(2):
            assert served.call("POST", path, token=served.root).status_code == 200
        wait_until(lambda: served.broker.outstanding == 4, what="two spares wrapped")
        served.clock.advance(1)
        assert served.broker.answers_from_memory(served.root, KeyRef("main", "bot-a"), COPY)
        body = served.call("POST", path, token=served.root).json()
        assert body["wrap_ttl"] == 59  # wrapped a second before it was asked for
        assert served.unwrap(body["wrap_token"]).status_code == 200


class TestSignRoute:
    def test_an_integer_beyond_64_bits_is_signed_as_the_integer_it_is(
        self, served: Served, key: KeyPair
    ) -> None:
        """JSON integers have no size limit; the body's parser must not turn one into a
        float (which would be refused as one)."""
        params = {"symbol": "SOL_USDC", "clientId": 2**64 + 1}
        stamp = int(time.time() * 1000)
        answer = served.sign({"instruction": "orderCancel", "params": params, "timestamp": stamp})
        assert answer.status_code == 200, answer.text
        message = signing_string("orderCancel", params, stamp, 5000)
        assert f"clientId={2**64 + 1}" in message  # the integer itself, signed as sent
        assert verify(key.api_key, message, answer.json()["headers"]["X-Signature"])

    def test_sign_returns_headers_that_verify(self, served: Served, key: KeyPair) -> None:
        """POST .../sign returns the four headers for the exact request."""
        params = {"symbol": "SOL_USDC", "orderId": "28"}
        stamp = int(time.time() * 1000)
        answer = served.sign({"instruction": "orderCancel", "params": params, "timestamp": stamp})
        assert answer.status_code == 200
        headers = answer.json()["headers"]
        assert set(headers) == {"X-API-Key", "X-Signature", "X-Timestamp", "X-Window"}
        message = signing_string("orderCancel", params, stamp, 5000)
        assert verify(key.api_key, message, headers["X-Signature"])

    @pytest.mark.usefixtures("key")
    def test_a_timestamp_far_from_now_is_refused(self, served: Served) -> None:
        """A signature dated minutes away (it would outlive a revoked grant) gets 422."""
        for offset_ms in (-3_600_000, 86_400_000):
            answer = served.sign(
                {
                    "instruction": "accountQuery",
                    "timestamp": int(time.time() * 1000) + offset_ms,
                }
            )
            assert answer.status_code == 422
            assert "within 60 s" in answer.json()["error"]["message"]

    def test_a_batch_is_signed_from_a_list_of_orders(self, served: Served, key: KeyPair) -> None:
        """params may be a list of objects for batch orders."""
        orders = [{"symbol": "SOL_USDC", "side": "Bid"}, {"symbol": "SOL_USDC", "side": "Ask"}]
        stamp = int(time.time() * 1000) - 30_000
        answer = served.sign({"instruction": "orderExecute", "params": orders, "timestamp": stamp})
        message = signing_string("orderExecute", orders, stamp, 5000)
        assert verify(key.api_key, message, answer.json()["headers"]["X-Signature"])


class TestInfoRoute:
    def test_info_shows_status_and_grants_never_the_secret(
        self, served: Served, key: KeyPair, vault: Vault
    ) -> None:
        """GET .../{name} answers metadata and the caller's grants; a sign grant is enough."""
        token = worker_token(
            vault,
            vault.settings.grant_prefix,
            'path "GRANTS/main/bot-a/sign/balanceQuery" { capabilities = ["update"] }',
        )
        answer = served.call("GET", "/v1/keys/main/bot-a", token=token)
        assert answer.status_code == 200
        body = answer.json()
        assert body["status"] == "active"
        assert body["api_key"] == key.api_key
        assert body["grants"] == {"copy": False, "sign": ["balanceQuery"]}
        assert key.secret.reveal() not in answer.text

    @pytest.mark.usefixtures("key")
    def test_info_needs_a_copy_or_sign_grant(self, served: Served) -> None:
        """A token with neither grant gets 403."""
        token = Provisioner(served.vault).create_token(["default"])
        assert served.call("GET", "/v1/keys/main/bot-a", token=token).status_code == 403


class TestReportRoute:
    @pytest.mark.usefixtures("key")
    def test_a_report_reaches_the_callback(self, served: Served) -> None:
        """POST .../report calls the daemon's report callback with the key and reason."""
        answer = served.call(
            "POST",
            "/v1/keys/main/bot-a/report",
            token=served.root,
            json={"reason": "Backpack answered 401 UNAUTHORIZED"},
        )
        assert answer.status_code == 202
        assert served.reports == [("main/bot-a", "Backpack answered 401 UNAUTHORIZED")]

    def test_reports_are_rate_limited_per_key(self, served: Served, vault: Vault) -> None:
        """A second report within the interval is 429 with Retry-After; other keys are not held."""
        store_key(vault, KeyRef("main", "bot-a"))
        store_key(vault, KeyRef("main", "bot-b"))
        path = "/v1/keys/main/{}/report"
        assert served.call("POST", path.format("bot-a"), token=served.root).status_code == 202
        again = served.call("POST", path.format("bot-a"), token=served.root)
        assert again.status_code == 429
        assert int(again.headers["Retry-After"]) >= 1
        assert served.call("POST", path.format("bot-b"), token=served.root).status_code == 202
        assert [r[0] for r in served.reports] == ["main/bot-a", "main/bot-b"]

    @pytest.mark.usefixtures("key")
    def test_a_key_may_be_reported_again_after_the_interval(self, served: Served) -> None:
        """The limit is one report per key per report_interval_s (here 60 s), not forever."""
        path = "/v1/keys/main/bot-a/report"
        assert served.call("POST", path, token=served.root).status_code == 202
        served.clock.advance(30)
        again = served.call("POST", path, token=served.root)
        assert again.status_code == 429
        assert again.headers["Retry-After"] == "30"
        served.clock.advance(30)
        assert served.call("POST", path, token=served.root).status_code == 202
        assert len(served.reports) == 2

    def test_a_report_for_an_unknown_key_is_404(self, served: Served) -> None:
        """A report names a stored key; an unknown one triggers nothing and labels no metric."""
        answer = served.call("POST", "/v1/keys/main/ghost-123/report", token=served.root)
        assert answer.status_code == 404
        assert served.reports == []
        metrics = served.call("GET", "/metrics", token=None).text
        assert 'backpack_vault_reports_total{key="main/ghost-123"' not in metrics

    @pytest.mark.usefixtures("key")
    def test_a_caller_without_a_grant_cannot_report(self, served: Served) -> None:
        """Reports need a grant on the key, so strangers cannot trigger checks."""
        token = Provisioner(served.vault).create_token(["default"])
        answer = served.call("POST", "/v1/keys/main/bot-a/report", token=token)
        assert answer.status_code == 403
        assert served.reports == []


# Each row: id, method, path, token, body, status, code.
ERRORS = [
    ("no-token", "POST", "/v1/keys/main/bot-a/copy", None, None, 401, "not_authenticated"),
    ("unknown-token", "POST", "/v1/keys/main/bot-a/copy", "bogus", None, 401, "not_authenticated"),
    ("no-grant", "POST", "/v1/keys/main/bot-a/copy", "default", None, 403, "forbidden"),
    ("unknown-key", "POST", "/v1/keys/main/nope/copy", "root", None, 404, "unknown_key"),
    ("retired", "POST", "/v1/keys/main/old/copy", "root", None, 409, "key_not_usable"),
    ("read-only", "POST", "/v1/keys/main/ro/sign", "root",
     {"instruction": "orderExecute", "params": {}}, 403, "read_only_key"),
    ("bad-key-name", "POST", "/v1/keys/Main/bot-a/copy", "root", None, 422, "invalid_input"),
    ("not-json", "POST", "/v1/keys/main/bot-a/sign", "root", b"{", 422, "invalid_input"),
    ("too-large", "POST", "/v1/keys/main/bot-a/sign", "root", b" " * 300_000, 413,
     "body_too_large"),
    ("not-object", "POST", "/v1/keys/main/bot-a/sign", "root", [1], 422, "invalid_input"),
    ("no-instruction", "POST", "/v1/keys/main/bot-a/sign", "root", {}, 422, "invalid_input"),
    ("unknown-instruction", "POST", "/v1/keys/main/bot-a/sign", "root",
     {"instruction": "fooBar"}, 422, "invalid_input"),
    ("params-not-object", "POST", "/v1/keys/main/bot-a/sign", "root",
     {"instruction": "orderExecute", "params": "x"}, 422, "invalid_input"),
    ("float-param", "POST", "/v1/keys/main/bot-a/sign", "root",
     {"instruction": "orderExecute", "params": {"price": 1.5}}, 422, "invalid_input"),
    ("bool-timestamp", "POST", "/v1/keys/main/bot-a/sign", "root",
     {"instruction": "orderExecute", "timestamp": True}, 422, "invalid_input"),
    ("window-too-long", "POST", "/v1/keys/main/bot-a/sign", "root",
     {"instruction": "orderExecute", "window": 60001}, 422, "invalid_input"),
    ("unknown-route", "GET", "/v1/nothing", None, None, 404, "not_found"),
    ("wrong-method", "GET", "/v1/keys/main/bot-a/copy", None, None, 405, "method_not_allowed"),
]  # fmt: skip


class TestErrors:
    @pytest.mark.parametrize(
        ("method", "path", "token", "body", "status", "code"),
        [e[1:] for e in ERRORS],
        ids=[e[0] for e in ERRORS],
    )
    @pytest.mark.usefixtures("key")
    def test_errors_follow_the_table(
        self,
        served: Served,
        vault: Vault,
        method: str,
        path: str,
        token: str | None,
        body: Any,
        status: int,
        code: str,
    ) -> None:
        """Each failure has its status and a JSON body {"error": {"code", "message"}}."""
        store_key(vault, KeyRef("main", "old"), status=Status.RETIRED)
        store_key(vault, KeyRef("main", "ro"), read_only=True)
        tokens = {
            "root": served.root,
            "bogus": Secret("s.bogus-token"),
            "default": Provisioner(vault).create_token(["default"]),
        }
        kwargs: dict[str, Any] = {}
        if isinstance(body, bytes):
            kwargs["content"] = body
        elif body is not None:
            kwargs["json"] = body
        answer = served.call(method, path, token=tokens.get(token or ""), **kwargs)
        assert answer.status_code == status
        error = answer.json()["error"]
        assert error["code"] == code
        assert error["message"]
        assert set(error) <= {"code", "message", "status"}

    def test_a_not_usable_key_names_its_status(self, served: Served, vault: Vault) -> None:
        """409 bodies carry the key's status, and the message says which it is."""
        store_key(vault, KeyRef("main", "gone"), status=Status.REVOKED)
        error = served.call("POST", "/v1/keys/main/gone/copy", token=served.root).json()["error"]
        assert error["status"] == "revoked"
        assert "revoked" in error["message"]

    @pytest.mark.parametrize("how", ["expired", "revoked"], ids=str)
    @pytest.mark.usefixtures("key")
    def test_an_expired_or_revoked_worker_token_gets_401(
        self, served: Served, vault: Vault, how: str
    ) -> None:
        """Once Vault no longer knows the token and its cached decision ran out, 401."""
        token = Provisioner(vault).create_token(["root"], ttl="2s" if how == "expired" else "1h")
        path = "/v1/keys/main/bot-a/copy"
        assert served.call("POST", path, token=token).status_code == 200
        lookup = f"{served.vault_addr}/v1/auth/token/lookup-self"
        if how == "revoked":
            httpx.post(
                f"{served.vault_addr}/v1/auth/token/revoke-self",
                headers={"X-Vault-Token": token.reveal()},
            ).raise_for_status()
        wait_until(
            lambda: httpx.get(lookup, headers={"X-Vault-Token": token.reveal()}).status_code == 403
        )
        served.clock.advance(BrokerSettings().decision_cache_s + 0.01)
        answer = served.call("POST", path, token=token)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "not_authenticated"


class TestContract:
    """Every answer is inside the contract, whatever the request."""

    @pytest.mark.parametrize(
        ("token", "status", "code"),
        [(None, 401, "not_authenticated"), ("root", 422, "invalid_input")],
        ids=["no-token", "root"],
    )
    @pytest.mark.usefixtures("key")
    def test_deeply_nested_json_is_refused_before_any_work(
        self, served: Served, token: str | None, status: int, code: str
    ) -> None:
        """[ x 50,000: the token is checked first, then a 422 without parsing; no traceback."""
        with capture_logs() as logs:
            answer = served.call(
                "POST",
                "/v1/keys/main/bot-a/sign",
                token=served.root if token else None,
                content=b"[" * 50_000,
            )
        assert answer.status_code == status
        assert answer.json()["error"]["code"] == code
        assert not [e for e in logs if e.get("log_level") in ("error", "critical")]

    @pytest.mark.parametrize(
        "path",
        ["/v1/keys/main/bot-a/", "/v1/keys/main/bot-a/copy/", "/nope", "/v1/keys"],
        ids=["info-slash", "copy-slash", "unknown", "short"],
    )
    def test_an_unknown_path_is_a_json_404(self, served: Served, path: str) -> None:
        """No redirect and no empty body: a JSON 404 that names the routes."""
        answer = served.call("GET", path, token=served.root)
        assert answer.status_code == 404
        error = answer.json()["error"]
        assert error["code"] == "not_found"
        assert "/v1/keys/SUB/NAME" in error["message"]

    @pytest.mark.usefixtures("key")
    def test_a_client_that_goes_away_mid_body_is_not_an_error(self, served: Served) -> None:
        """A disconnect while the body is read is logged as such, never as internal."""
        host, port = served.url.removeprefix("http://").split(":")
        with capture_logs() as logs:
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    b"POST /v1/keys/main/bot-a/sign HTTP/1.1\r\nHost: x\r\n"
                    b"X-Vault-Token: " + served.root.reveal().encode() + b"\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                    b'{"instruction": '
                )
            wait_until(lambda: any(e["event"] == "api.client_disconnected" for e in logs))
        assert not [e for e in logs if e["event"] == "api.internal_error"]

    @pytest.mark.usefixtures("key")
    def test_a_token_without_the_default_policy_is_told_what_it_lacks(
        self, served: Served, vault: Vault
    ) -> None:
        """A live token that may not call sys/capabilities-self gets 403 naming the
        default policy, not "expired or unknown"."""
        provisioner = Provisioner(vault)
        name = f"{vault.settings.kv_prefix}-nodefault"
        provisioner.ensure_policy(name, 'path "x/*" { capabilities = ["read"] }')
        created = httpx.post(
            f"{served.vault_addr}/v1/auth/token/create",
            headers={"X-Vault-Token": served.root.reveal()},
            json={"policies": [name], "no_default_policy": True, "ttl": "10m"},
        ).json()["auth"]["client_token"]
        answer = served.call("POST", "/v1/keys/main/bot-a/copy", token=Secret(created))
        assert answer.status_code == 403
        assert "default" in answer.json()["error"]["message"]

    @pytest.mark.usefixtures("key")
    def test_a_denied_grant_names_the_capability_and_path(
        self, served: Served, vault: Vault
    ) -> None:
        """The 403 says which capability on which grant path the policy must give."""
        token = Provisioner(vault).create_token(["default"])
        error = served.call("POST", "/v1/keys/main/bot-a/copy", token=token).json()["error"]
        assert error["code"] == "forbidden"
        assert f'["read"] on {vault.settings.grant_prefix}/main/bot-a/copy' in error["message"]

    def test_a_vault_that_refuses_the_daemon_is_a_503(
        self, served: Served, vault_settings: VaultSettings, vault: Vault
    ) -> None:
        """The daemon's own token revoked: workers get 503 with a clear code, not 502."""
        store_key(vault, KeyRef("main", "bot-z"))
        daemon_token = Provisioner(vault).create_token(["root"])
        own = Vault(dataclasses.replace(vault_settings, token=daemon_token))
        own.login()
        broker = Broker(own, BrokerSettings(), grant_prefix=vault_settings.grant_prefix)
        app = create_app(broker, readiness=lambda: True, metrics=Metrics(CollectorRegistry()))
        httpx.post(
            f"{served.vault_addr}/v1/auth/token/revoke-self",
            headers={"X-Vault-Token": daemon_token.reveal()},
        ).raise_for_status()
        with ServerThread(app) as server:
            answer = httpx.post(
                f"{server.url}/v1/keys/main/bot-z/copy",
                headers={"X-Vault-Token": served.root.reveal()},
            )
        own.close()
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] in ("vault_denied", "vault_unavailable")


class TestProbes:
    def test_healthz_is_always_ok(self, served: Served) -> None:
        """/healthz answers 200 while the process runs."""
        assert served.call("GET", "/healthz").json() == {"status": "ok"}

    @pytest.mark.parametrize(
        ("state", "status"),
        [(True, 200), ((True, ""), 200), (False, 503), ((False, "Vault is sealed"), 503)],
        ids=["bool-ready", "tuple-ready", "bool-not-ready", "tuple-not-ready"],
    )
    def test_readyz_follows_readiness(
        self, served: Served, state: bool | tuple[bool, str], status: int
    ) -> None:
        """/readyz is 200 when ready and 503 with a reason otherwise."""
        served.ready.append(state)
        answer = served.call("GET", "/readyz")
        assert answer.status_code == status
        if status == 503:
            assert answer.json()["reason"]

    def test_readyz_says_what_is_missing(self, served: Served) -> None:
        """A readiness with details answers them as JSON, and the reason names them."""
        served.ready.append(
            (False, {"vault": "ok", "auth": "ok", "kv_mount": "missing", "missing": ["kv_mount"]})
        )
        answer = served.call("GET", "/readyz")
        assert answer.status_code == 503
        body = answer.json()
        assert body["kv_mount"] == "missing"
        assert body["missing"] == ["kv_mount"]
        assert "kv_mount" in body["reason"]

    @pytest.mark.usefixtures("key")
    def test_metrics_count_handouts_by_key_and_outcome(self, served: Served) -> None:
        """/metrics exposes handouts, signatures, latency and outstanding wrapping tokens."""
        served.call("POST", "/v1/keys/main/bot-a/copy", token=served.root)
        served.sign({"instruction": "balanceQuery"})
        served.call("POST", "/v1/keys/main/made-up/copy", token=served.root)
        text = served.call("GET", "/metrics").text
        assert 'backpack_vault_handouts_total{key="main/bot-a",outcome="ok"} 1.0' in text
        assert 'backpack_vault_handouts_total{key="-",outcome="unknown_key"} 1.0' in text
        assert (
            'backpack_vault_signatures_total{instruction="balanceQuery",key="main/bot-a",'
            'outcome="ok"} 1.0'
        ) in text
        assert "backpack_vault_wrapping_tokens_outstanding 1.0" in text
        assert 'backpack_vault_api_request_seconds_count{route="copy"} 2.0' in text
        assert "made-up" not in text


class TestQuickLane:
    """A copy or signature from memory is answered in the HTTP protocol's callback
    (``daemon/quick.py``), never the ASGI app: the same answer, the same records."""

    @pytest.fixture
    def lane(self, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
        """Whether each request offered to the lane was answered there (True) or went on to
        the app (False). Requested before ``served``, so its server's lane is this spy."""
        answered: list[bool] = []
        original = _Api.answer_at_once

        def spy(api: _Api, *args: Any) -> Any:
            answer = original(api, *args)
            answered.append(answer is not None)
            return answer

        monkeypatch.setattr(_Api, "answer_at_once", spy)
        return answered

    def sign(self, served: Served, stamp: int, **extra: Any) -> httpx.Response:
        return served.sign(
            {"instruction": "orderExecute", "params": ORDER, "timestamp": stamp, **extra}
        )

    def test_a_signature_from_memory_answers_and_is_recorded_as_the_route_does(
        self, lane: list[bool], served: Served, key: KeyPair
    ) -> None:
        stamp = int(time.time() * 1000)
        with capture_logs() as logs:
            first, second = self.sign(served, stamp), self.sign(served, stamp)
            # Recorded once each answer is out, in the server's thread.
            wait_until(lambda: sum(e["event"] == "api.handout" for e in logs) == 2)
        assert lane == [False, True]  # the first asked Vault (the app's way); the second not
        for answer in (first, second):
            assert answer.status_code == 200
            signed = answer.json()["headers"]
            message = signing_string("orderExecute", ORDER, stamp, 5000)
            assert verify(key.api_key, message, signed["X-Signature"])
        assert set(second.headers) == set(first.headers)
        assert second.headers["content-type"] == first.headers["content-type"]
        assert second.json() == first.json()  # ed25519 is deterministic
        handouts = [e for e in logs if e["event"] == "api.handout"]
        assert [(e["outcome"], e["instruction"], e["key"]) for e in handouts] == [
            ("ok", "orderExecute", "main/bot-a")
        ] * 2
        assert handouts[0]["identity"] == handouts[1]["identity"]
        text = served.call("GET", "/metrics").text
        assert (
            'backpack_vault_signatures_total{instruction="orderExecute",key="main/bot-a",'
            'outcome="ok"} 2.0'
        ) in text
        assert 'backpack_vault_api_requests_total{route="sign",status="200"} 2.0' in text
        assert 'backpack_vault_api_request_seconds_count{route="sign"} 2.0' in text

    def test_a_copy_from_a_spare_is_answered_at_once_and_the_next_is_wrapped(
        self, lane: list[bool], served: Served, key: KeyPair
    ) -> None:
        """Two copies in quick succession make the key one in demand: from then on each
        copy is a spare, and the next spare is wrapped after it, off the request path."""
        ref = KeyRef("main", "bot-a")
        secrets = []
        for n in range(4):
            answer = served.call("POST", "/v1/keys/main/bot-a/copy", token=served.root)
            assert answer.status_code == 200
            assert answer.json()["api_key"] == key.api_key
            secrets.append(served.unwrap(answer.json()["wrap_token"]).json()["data"]["api_secret"])
            if n:
                wait_until(lambda: served.broker.answers_from_memory(served.root, ref, COPY))
        assert secrets == [key.secret.reveal()] * 4
        assert lane == [False, False, True, True]
        text = served.call("GET", "/metrics").text
        assert 'backpack_vault_handouts_total{key="main/bot-a",outcome="ok"} 4.0' in text

    @pytest.mark.usefixtures("key")
    def test_a_refusal_from_memory_gets_the_apps_error(
        self, lane: list[bool], served: Served
    ) -> None:
        """The lane answers only successes: a refusal it could make goes on to the app,
        whose error table answers it as ever."""
        stamp = int(time.time() * 1000)
        assert self.sign(served, stamp).status_code == 200  # grant and key now in memory
        far = self.sign(served, stamp - 3_600_000)
        unknown = self.sign(served, stamp, window=-1)
        not_json = served.call(
            "POST", "/v1/keys/main/bot-a/sign", token=served.root, content=b"{nope"
        )
        no_token = served.call("POST", "/v1/keys/main/bot-a/sign", json={"instruction": "x"})
        assert (far.status_code, far.json()["error"]["code"]) == (422, "invalid_input")
        assert "within 60 s" in far.json()["error"]["message"]
        assert unknown.status_code == 422
        assert (not_json.status_code, not_json.json()["error"]["code"]) == (422, "invalid_input")
        assert no_token.status_code == 401
        assert lane == [False, False, False, False, False]

    @pytest.mark.usefixtures("key")
    def test_a_revocation_is_honoured_by_the_next_answer_from_memory(
        self, lane: list[bool], served: Served, vault: Vault
    ) -> None:
        ref = KeyRef("main", "bot-a")
        stamp = int(time.time() * 1000)
        assert [self.sign(served, stamp).status_code for _ in range(2)] == [200, 200]
        assert lane == [False, True]
        vault.set_status(ref, Status.REVOKED, now=NOW)
        served.broker.on_event(KeyStatusChanged(ref, Status.ACTIVE, Status.REVOKED, Cause.CHECK))
        refused = self.sign(served, stamp)
        assert (refused.status_code, refused.json()["error"]["status"]) == (409, "revoked")


# -- secrets never leak -------------------------------------------------------------------------

CANARY_SEED = b"CANARY-SECRET-do-not-leak-000000"


def canary_pair() -> KeyPair:
    signing_key = nacl.signing.SigningKey(CANARY_SEED)
    return KeyPair(
        api_key=base64.b64encode(bytes(signing_key.verify_key)).decode(),
        secret=Secret(base64.b64encode(CANARY_SEED).decode()),
    )


class TestNoSecretLeaks:
    def test_the_canary_appears_only_in_the_unwrapped_copy(
        self,
        served: Served,
        vault: Vault,
        capfd: pytest.CaptureFixture[str],
    ) -> None:
        """Copy, sign, errors, metrics and logs never show the secret, a wrap or worker token."""
        pair = canary_pair()
        store_key(vault, KeyRef("main", "canary"), pair=pair)
        store_key(vault, KeyRef("main", "canary-ro"), pair=canary_pair(), read_only=True)
        worker = Provisioner(vault).create_token(["root"])
        base = "/v1/keys/main/canary"
        bodies: list[str] = []
        wrap_tokens: list[str] = []
        with structlog.testing.capture_logs() as logs:
            for token in (served.root, worker):
                copy = served.call("POST", f"{base}/copy", token=token)
                wrap_tokens.append(copy.json()["wrap_token"])
                unwrapped = served.unwrap(wrap_tokens[-1])
                assert unwrapped.json()["data"]["api_secret"] == pair.secret.reveal()
            requests: list[tuple[str, str, Secret | None, Any]] = [
                ("POST", f"{base}/sign", worker, {"instruction": "orderExecute", "params": {}}),
                ("POST", f"{base}/sign", worker, {"instruction": "orderExecute", "params": [1]}),
                ("POST", f"{base}/sign", worker, {"instruction": "x", "params": {"a": 1.5}}),
                ("POST", f"{base}/sign", worker, {"instruction": "accountQuery", "window": 0}),
                ("POST", f"{base}-ro/sign", worker, {"instruction": "orderExecute"}),
                ("POST", f"{base}/copy", Secret("s.bogus"), None),
                ("POST", f"{base}/copy", None, None),
                ("GET", base, worker, None),
                ("POST", f"{base}/report", worker, {"reason": "Invalid signature"}),
                ("POST", f"{base}/report", worker, {"reason": "again"}),
                ("POST", "/v1/keys/main/nope/copy", worker, None),
                ("GET", "/readyz", None, None),
                ("GET", "/metrics", None, None),
            ]
            for method, path, caller, body in requests:
                bodies.append(served.call(method, path, token=caller, json=body).text)
            vault.set_status(KeyRef("main", "canary"), Status.RETIRED, now=NOW)
            served.broker.on_event(
                KeyStatusChanged(
                    KeyRef("main", "canary"), Status.ACTIVE, Status.RETIRED, Cause.CHECK
                )
            )
            bodies.append(served.call("POST", f"{base}/copy", token=worker).text)
            exceptions: list[str] = []
            for call in (
                lambda: served.broker.copy(worker, KeyRef("main", "canary")),
                lambda: served.broker.sign(worker, KeyRef("main", "canary-ro"), "withdraw", {}),
                lambda: served.broker.sign(worker, KeyRef("main", "canary-ro"), "x", {}),
            ):
                with pytest.raises(ServiceError) as caught:
                    call()
                exceptions.append(f"{caught.value!s} {caught.value!r} {caught.value.args!r}")
        out, err = capfd.readouterr()
        handouts = [e for e in logs if e["event"] == "api.handout"]
        handout_requests = 2 + sum(p.endswith(("/copy", "/sign")) for _, p, _, _ in requests) + 1
        assert len(handouts) == handout_requests  # one event per copy or signature request
        assert {e["identity"] for e in handouts if e["outcome"] == "ok"} == {
            vault.lookup_caller(served.root).identity,
            vault.lookup_caller(worker).identity,
        }
        haystacks = {
            "logs": repr(logs),
            "bodies": "\n".join(bodies),
            "exceptions": "\n".join(exceptions),
            "stdout": out,
            "stderr": err,
        }
        needles = {
            "secret": pair.secret.reveal(),
            "seed": CANARY_SEED.decode(),
            "seed-hex": CANARY_SEED.hex(),
            "worker-token": worker.reveal(),
            "root-token": served.root.reveal(),
            **{f"wrap-token-{i}": t for i, t in enumerate(wrap_tokens)},
        }
        leaks = [
            f"{needle} in {where}"
            for where, text in haystacks.items()
            for needle, value in needles.items()
            if value in text
        ]
        assert leaks == []


class TestRefills:
    """Spares are wrapped in a thread of their own; the event loop only names the key."""

    def test_a_key_asked_for_while_it_waits_is_refilled_once(self) -> None:
        started, release = threading.Event(), threading.Event()
        done: list[KeyRef] = []

        def refill(ref: KeyRef) -> None:
            started.set()
            release.wait(5)
            done.append(ref)

        a, b = KeyRef("main", "a"), KeyRef("main", "b")
        refills = _Refills(refill)
        refills.want(a)
        assert started.wait(5)  # a is being refilled: asking again queues one more
        for ref in (a, b, a, b, a):
            refills.want(ref)
        release.set()
        wait_until(lambda: len(done) == 3, what="three refills")
        refills.close()
        assert done == [a, a, b]

    def test_a_failing_refill_does_not_end_the_thread(self) -> None:
        done: list[KeyRef] = []

        def refill(ref: KeyRef) -> None:
            if ref.name == "bad":
                raise RuntimeError("boom")
            done.append(ref)

        refills = _Refills(refill)
        with capture_logs() as logs:
            refills.want(KeyRef("main", "bad"))
            refills.want(KeyRef("main", "good"))
            wait_until(lambda: done == [KeyRef("main", "good")], what="the next refill")
        refills.close()
        assert [e["event"] for e in logs] == ["api.refill_crashed"]

    def test_closed_it_stops_its_thread_and_takes_no_more(self) -> None:
        done: list[KeyRef] = []
        refills = _Refills(done.append)
        refills.want(KeyRef("main", "a"))
        wait_until(lambda: len(done) == 1, what="one refill")
        thread = refills._thread
        refills.close()
        assert thread is not None
        assert not thread.is_alive()
        refills.want(KeyRef("main", "a"))
        assert refills._queue.empty()  # nothing queued for a thread that is gone
        assert len(done) == 1
