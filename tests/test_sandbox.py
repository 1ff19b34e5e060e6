"""The sandbox exchange: Backpack's public and signed routes, the key registry, faults."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from bpx.account import Account

from backpack_vault.backpack.instructions import lookup
from backpack_vault.backpack.signing import sign_request
from backpack_vault.config import Secret
from backpack_vault.core.keys import KeyPair, KeyRecord, KeyRef, Origin, Status, generate_pair
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import free_port
from backpack_vault.testing.sandbox import (
    EXPIRED_ANSWER,
    INVALID_SIGNATURE_ANSWER,
    READ_ONLY_ANSWER,
    SANDBOX_HEADER,
    UNKNOWN_KEY_ANSWER,
    Answer,
    Faults,
    SandboxAdmin,
    SandboxState,
    create_app,
)
from backpack_vault.vault.client import Vault

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "vectors.json").read_text(encoding="utf-8")
)
REST_VECTORS = [v for v in VECTORS["vectors"] if "path" in v]
VECTOR_KEY = KeyPair(VECTORS["key"]["api_key"], Secret(VECTORS["key"]["api_secret"]))

FROZEN_MS = 1_700_000_001_000
# What each vector's request gets once its signature is accepted.
EXPECTED_STATUS = {"V1": 200, "V2": 200, "V3": 200, "V4": 200, "V5": 200, "D1": 404, "D2": 200}


def _error(response: httpx.Response) -> Answer:
    body = response.json()
    return Answer(response.status_code, body["code"], body["message"])


def send_signed(
    http: httpx.Client,
    method: str,
    path: str,
    pair: KeyPair,
    *,
    query: Mapping[str, str | int | bool] | None = None,
    body: Any = None,
    timestamp: int | None = None,
    window: int = 5000,
    extra_headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    """Sign like a Backpack client: query values as sent, or the JSON body's values."""
    instruction = lookup(method, path).instruction
    ts = timestamp if timestamp is not None else int(time.time() * 1000)
    signed = body if body is not None else dict(query or {})
    headers = sign_request(pair.api_key, pair.secret, instruction, signed, ts, window)
    headers |= dict(extra_headers or {})
    content = None
    if body is not None:
        content = json.dumps(body)
        headers["Content-Type"] = "application/json; charset=utf-8"
    params = {
        k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (query or {}).items()
    }
    return http.request(method, path, params=params, content=content, headers=headers)


@pytest.fixture(scope="module")
def frozen_server() -> Iterator[tuple[ServerThread, SandboxState]]:
    """A sandbox whose clock stands still at FROZEN_MS (the vectors' time plus one second)."""
    state = SandboxState()
    with ServerThread(create_app(state, clock=lambda: FROZEN_MS / 1000)) as server:
        yield server, state


@pytest.fixture
def frozen(frozen_server: tuple[ServerThread, SandboxState]) -> Iterator[SandboxAdmin]:
    server, state = frozen_server
    state.reset()
    with httpx.Client(base_url=server.url, timeout=5.0) as http:
        yield SandboxAdmin(http)


def _at(admin: SandboxAdmin, server_ms: int) -> None:
    """Move the frozen sandbox's clock to ``server_ms``."""
    admin.set_faults(clock_offset_ms=server_ms - FROZEN_MS)


class TestPublicRoutes:
    def test_time_is_epoch_milliseconds_as_text(self, frozen: SandboxAdmin) -> None:
        """/api/v1/time answers text/plain epoch milliseconds."""
        response = frozen.http.get("/api/v1/time")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert response.text == str(FROZEN_MS)

    @pytest.mark.parametrize("offset_ms", [10_000, -10_000], ids=["ahead", "behind"])
    def test_clock_offset_shifts_time(self, frozen: SandboxAdmin, offset_ms: int) -> None:
        """An injected clock offset moves the server's time."""
        frozen.set_faults(clock_offset_ms=offset_ms)
        assert frozen.http.get("/api/v1/time").text == str(FROZEN_MS + offset_ms)

    def test_status_is_ok(self, sandbox: SandboxAdmin) -> None:
        """/api/v1/status says Ok with a null message."""
        assert sandbox.http.get("/api/v1/status").json() == {"status": "Ok", "message": None}

    def test_status_reports_maintenance(self, sandbox: SandboxAdmin) -> None:
        """In maintenance /api/v1/status still answers 200, saying Maintenance."""
        sandbox.set_faults(maintenance=True)
        response = sandbox.http.get("/api/v1/status")
        assert response.status_code == 200
        assert response.json()["status"] == "Maintenance"

    def test_ping_pongs(self, sandbox: SandboxAdmin) -> None:
        """/api/v1/ping answers pong."""
        assert sandbox.http.get("/api/v1/ping").text == "pong"

    @pytest.mark.parametrize("path", ["/api/v1/status", "/api/v1/time", "/api/v1/account"])
    def test_every_answer_says_it_is_a_sandbox(self, sandbox: SandboxAdmin, path: str) -> None:
        """Public and signed answers alike carry the sandbox header."""
        assert sandbox.http.get(path).headers[SANDBOX_HEADER] == "true"


class TestSignatureVerification:
    @pytest.mark.parametrize("vector", REST_VECTORS, ids=[v["id"] for v in REST_VECTORS])
    def test_vectors_are_accepted(self, frozen: SandboxAdmin, vector: dict[str, Any]) -> None:
        """Each published vector's exact headers are accepted at the vector's time."""
        frozen.register(vector["api_key"])
        _at(frozen, vector["timestamp"] + 1000)
        headers = {
            "X-API-Key": vector["api_key"],
            "X-Signature": vector["signature"],
            "X-Timestamp": str(vector["timestamp"]),
            "X-Window": str(vector["window"]),
        }
        if vector["params_in"] == "body":
            response = frozen.http.request(
                vector["method"],
                vector["path"],
                content=json.dumps(vector["params"]),
                headers=headers | {"Content-Type": "application/json; charset=utf-8"},
            )
        else:
            query = {k: str(v) for k, v in vector["params"].items()}
            response = frozen.http.request(
                vector["method"], vector["path"], params=query, headers=headers
            )
        assert response.status_code == EXPECTED_STATUS[vector["id"]], response.text

    def test_query_order_on_the_wire_does_not_matter(self, frozen: SandboxAdmin) -> None:
        """Query pairs are sorted for signing, whatever their order in the URL (V4)."""
        vector = next(v for v in REST_VECTORS if v["id"] == "V4")
        frozen.register(vector["api_key"])
        url = f"{vector['path']}?symbol=SOL_USDC_PERP&marketType=PERP"
        response = frozen.http.get(
            url,
            headers={
                "X-API-Key": vector["api_key"],
                "X-Signature": vector["signature"],
                "X-Timestamp": str(vector["timestamp"]),
                "X-Window": "5000",
            },
        )
        assert response.status_code == 200

    @pytest.mark.parametrize(
        ("change", "value"),
        [("price", "180.51"), ("side", "Ask"), ("postOnly", False)],
        ids=["price", "side", "boolean"],
    )
    def test_a_tampered_body_is_an_invalid_signature(
        self, frozen: SandboxAdmin, change: str, value: object
    ) -> None:
        """Changing any signed value after signing gives 400 "Invalid signature"."""
        vector = next(v for v in REST_VECTORS if v["id"] == "V5")
        frozen.register(vector["api_key"])
        body = vector["params"] | {change: value}
        response = frozen.http.post(
            vector["path"],
            content=json.dumps(body),
            headers={
                "X-API-Key": vector["api_key"],
                "X-Signature": vector["signature"],
                "X-Timestamp": str(vector["timestamp"]),
                "X-Window": "5000",
            },
        )
        assert _error(response) == INVALID_SIGNATURE_ANSWER

    def test_another_keys_signature_is_invalid(self, sandbox: SandboxAdmin) -> None:
        """A signature by another secret under this key's X-API-Key is refused."""
        pair, other = generate_pair(), generate_pair()
        sandbox.register(pair.api_key)
        forged = KeyPair(pair.api_key, other.secret)
        headers = sign_request(other.api_key, other.secret, "accountQuery", {}, _now(), 5000)
        headers["X-API-Key"] = forged.api_key
        response = sandbox.http.get("/api/v1/account", headers=headers)
        assert _error(response) == INVALID_SIGNATURE_ANSWER

    @pytest.mark.parametrize(
        ("server_offset_ms", "window"),
        [(5001, 5000), (-5001, 5000), (0, 60001)],
        ids=["late", "future", "window-over-60000"],
    )
    def test_out_of_window_requests_have_expired(
        self, frozen: SandboxAdmin, server_offset_ms: int, window: int
    ) -> None:
        """Late, too-early and over-long windows get 400 "Request has expired"."""
        pair = generate_pair()
        frozen.register(pair.api_key)
        _at(frozen, 1_700_000_000_000 + server_offset_ms)
        headers = {
            "X-API-Key": pair.api_key,
            "X-Signature": "x",
            "X-Timestamp": "1700000000000",
            "X-Window": str(window),
        }
        response = frozen.http.get("/api/v1/account", headers=headers)
        assert _error(response) == EXPIRED_ANSWER

    def test_the_last_millisecond_of_the_window_is_accepted(self, frozen: SandboxAdmin) -> None:
        """A request arriving exactly at timestamp + window is still valid."""
        frozen.register(VECTOR_KEY.api_key)
        _at(frozen, 1_700_000_005_000)
        response = send_signed(
            frozen.http, "GET", "/api/v1/account", VECTOR_KEY, timestamp=1_700_000_000_000
        )
        assert response.status_code == 200

    def test_a_missing_window_means_5000(self, sandbox: SandboxAdmin) -> None:
        """Without X-Window the server assumes (and verifies) 5000."""
        pair = generate_pair()
        sandbox.register(pair.api_key)
        headers = sign_request(pair.api_key, pair.secret, "accountQuery", {}, _now(), 5000)
        del headers["X-Window"]
        assert sandbox.http.get("/api/v1/account", headers=headers).status_code == 200

    def test_head_is_verified_like_get(self, sandbox: SandboxAdmin) -> None:
        """A HEAD request signed as the GET is accepted, and answers no body."""
        pair = generate_pair()
        sandbox.register(pair.api_key)
        headers = sign_request(pair.api_key, pair.secret, "accountQuery", {}, _now(), 5000)
        response = sandbox.http.head("/api/v1/account", headers=headers)
        assert (response.status_code, response.content) == (200, b"")

    def test_an_unregistered_key_gets_the_unknown_key_answer(self, sandbox: SandboxAdmin) -> None:
        """A key the sandbox never saw gets 401 UNAUTHORIZED (our documented choice)."""
        response = send_signed(sandbox.http, "GET", "/api/v1/account", generate_pair())
        assert _error(response) == UNKNOWN_KEY_ANSWER
        assert UNKNOWN_KEY_ANSWER.status == 401
        assert UNKNOWN_KEY_ANSWER.code == "UNAUTHORIZED"

    def test_a_revoked_key_gets_the_unknown_key_answer(self, sandbox: SandboxAdmin) -> None:
        """After revocation the same key's correct signatures are refused."""
        pair = generate_pair()
        sandbox.register(pair.api_key)
        assert send_signed(sandbox.http, "GET", "/api/v1/account", pair).status_code == 200
        sandbox.revoke(pair.api_key)
        response = send_signed(sandbox.http, "GET", "/api/v1/account", pair)
        assert _error(response) == UNKNOWN_KEY_ANSWER

    def test_a_read_only_key_may_read(self, sandbox: SandboxAdmin) -> None:
        """A read-only key may call read-only instructions."""
        pair = generate_pair()
        sandbox.register(pair.api_key, read_only=True)
        assert send_signed(sandbox.http, "GET", "/api/v1/capital", pair).status_code == 200

    def test_a_read_only_key_may_not_trade(self, sandbox: SandboxAdmin) -> None:
        """A read-only key placing an order gets 403 FORBIDDEN (our documented choice)."""
        pair = generate_pair()
        sandbox.register(pair.api_key, read_only=True)
        response = send_signed(sandbox.http, "POST", "/api/v1/order", pair, body=_ORDER)
        assert _error(response) == READ_ONLY_ANSWER

    def test_signed_routes_answer_503_in_maintenance(self, sandbox: SandboxAdmin) -> None:
        """In maintenance signed routes answer 503 MAINTENANCE."""
        pair = generate_pair()
        sandbox.register(pair.api_key)
        sandbox.set_faults(maintenance=True)
        response = send_signed(sandbox.http, "GET", "/api/v1/account", pair)
        assert (response.status_code, response.json()["code"]) == (503, "MAINTENANCE")

    def test_floats_in_a_body_cannot_be_signed(self, sandbox: SandboxAdmin) -> None:
        """A JSON number with a fraction is refused: decimals are strings in Backpack's API."""
        pair = generate_pair()
        sandbox.register(pair.api_key)
        headers = sign_request(pair.api_key, pair.secret, "orderExecute", _ORDER, _now(), 5000)
        response = sandbox.http.post(
            "/api/v1/order", content=json.dumps(_ORDER | {"price": 180.5}), headers=headers
        )
        assert response.status_code == 400
        assert response.json()["message"].startswith("Parameters cannot be signed")

    @pytest.mark.parametrize(
        ("drop", "override"),
        [("X-Signature", {}), ("X-Timestamp", {}), (None, {"X-Timestamp": "soon"})],
        ids=["no-signature", "no-timestamp", "bad-timestamp"],
    )
    def test_malformed_headers_are_client_errors(
        self, sandbox: SandboxAdmin, drop: str | None, override: dict[str, str]
    ) -> None:
        """Missing or malformed auth headers get 400 INVALID_CLIENT_REQUEST."""
        pair = generate_pair()
        sandbox.register(pair.api_key)
        headers = sign_request(pair.api_key, pair.secret, "accountQuery", {}, _now(), 5000)
        if drop:
            del headers[drop]
        response = sandbox.http.get("/api/v1/account", headers=headers | override)
        assert (response.status_code, response.json()["code"]) == (400, "INVALID_CLIENT_REQUEST")


_ORDER: dict[str, Any] = {
    "symbol": "SOL_USDC",
    "side": "Bid",
    "orderType": "Limit",
    "price": "150.25",
    "quantity": "2",
    "clientId": 42,
}


def _now() -> int:
    return int(time.time() * 1000)


class TestOrders:
    @pytest.fixture
    def trader(self, sandbox: SandboxAdmin) -> KeyPair:
        pair = generate_pair()
        sandbox.register(pair.api_key)
        return pair

    def test_a_limit_order_is_placed_queried_and_cancelled(
        self, sandbox: SandboxAdmin, trader: KeyPair
    ) -> None:
        """A placed limit order has an id, is open, can be found and cancelled."""
        placed = send_signed(sandbox.http, "POST", "/api/v1/order", trader, body=_ORDER).json()
        assert placed["id"]
        assert (placed["status"], placed["price"], placed["clientId"]) == ("New", "150.25", 42)
        query = {"symbol": "SOL_USDC", "orderId": placed["id"]}
        found = send_signed(sandbox.http, "GET", "/api/v1/order", trader, query=query).json()
        assert found == placed
        open_orders = send_signed(
            sandbox.http, "GET", "/api/v1/orders", trader, query={"symbol": "SOL_USDC"}
        ).json()
        assert [o["id"] for o in open_orders] == [placed["id"]]
        cancelled = send_signed(sandbox.http, "DELETE", "/api/v1/order", trader, body=query).json()
        assert cancelled["status"] == "Cancelled"
        gone = send_signed(sandbox.http, "GET", "/api/v1/order", trader, query=query)
        assert _error(gone).code == "RESOURCE_NOT_FOUND"

    def test_a_batch_places_every_order(self, sandbox: SandboxAdmin, trader: KeyPair) -> None:
        """POST /api/v1/orders takes an array and answers one order per element."""
        batch = [_ORDER | {"clientId": 1}, _ORDER | {"clientId": 2, "price": "149"}]
        placed = send_signed(sandbox.http, "POST", "/api/v1/orders", trader, body=batch).json()
        assert [o["clientId"] for o in placed] == [1, 2]
        assert len({o["id"] for o in placed}) == 2

    @pytest.mark.parametrize(
        ("change", "code"),
        [
            ({"side": "Buy"}, "INVALID_ORDER"),
            ({"price": "-1"}, "INVALID_PRICE"),
            ({"quantity": "lots"}, "INVALID_QUANTITY"),
            ({"symbol": "solusdc"}, "INVALID_SYMBOL"),
        ],
        ids=["side", "price", "quantity", "symbol"],
    )
    def test_invalid_orders_are_refused(
        self, sandbox: SandboxAdmin, trader: KeyPair, change: dict[str, str], code: str
    ) -> None:
        """A correctly signed but invalid order gets 400 with Backpack's code."""
        response = send_signed(sandbox.http, "POST", "/api/v1/order", trader, body=_ORDER | change)
        assert (response.status_code, _error(response).code) == (400, code)

    def test_other_signed_endpoints_are_verified_but_not_implemented(
        self, sandbox: SandboxAdmin, trader: KeyPair
    ) -> None:
        """Routes the sandbox does not simulate still verify signatures, then answer 501."""
        ok = send_signed(
            sandbox.http, "GET", "/wapi/v1/history/funding", trader, query={"limit": 5}
        )
        assert (ok.status_code, _error(ok).code) == (501, "NOT_IMPLEMENTED")
        sandbox.revoke(trader.api_key)
        refused = send_signed(sandbox.http, "GET", "/wapi/v1/history/funding", trader)
        assert _error(refused) == UNKNOWN_KEY_ANSWER


class TestAdmin:
    @pytest.mark.parametrize(
        ("body", "status"), [(b"[" * 50_000, 400), (b" " * 70_000, 413)], ids=["deep", "large"]
    )
    def test_hostile_admin_bodies_get_a_clear_error(
        self, sandbox: SandboxAdmin, body: bytes, status: int
    ) -> None:
        """Deeply nested or oversized admin bodies are refused, never a 500."""
        answer = sandbox.http.post("/_sandbox/keys", content=body)
        assert answer.status_code == status
        assert answer.json()["error"]

    def test_registering_answers_201_then_200(self, sandbox: SandboxAdmin) -> None:
        """A new key is created (201); registering it again updates it (200)."""
        pair = generate_pair()
        first = sandbox.http.post("/_sandbox/keys", json={"api_key": pair.api_key})
        again = sandbox.http.post(
            "/_sandbox/keys", json={"api_key": pair.api_key, "read_only": True}
        )
        assert (first.status_code, again.status_code) == (201, 200)
        assert sandbox.http.get("/_sandbox/keys").json() == [
            {"api_key": pair.api_key, "read_only": True, "revoked": False}
        ]

    def test_registering_again_reinstates_a_revoked_key(self, sandbox: SandboxAdmin) -> None:
        """A revoked key registered again is accepted again."""
        pair = generate_pair()
        sandbox.register(pair.api_key)
        sandbox.revoke(pair.api_key)
        sandbox.register(pair.api_key)
        assert send_signed(sandbox.http, "GET", "/api/v1/account", pair).status_code == 200

    @pytest.mark.parametrize(
        "body",
        [{"api_key": "not-base64"}, {"api_key": "AAAA"}, {"read_only": True}, [1]],
        ids=["not-base64", "short", "missing", "not-object"],
    )
    def test_bad_keys_are_refused(self, sandbox: SandboxAdmin, body: object) -> None:
        """Only 32-byte base64 public keys can be registered."""
        assert sandbox.http.post("/_sandbox/keys", json=body).status_code == 400

    def test_revoking_an_unknown_key_is_404(self, sandbox: SandboxAdmin) -> None:
        """Revoking a key that was never registered says so."""
        response = sandbox.http.post(
            "/_sandbox/keys/revoke", json={"api_key": generate_pair().api_key}
        )
        assert response.status_code == 404

    @pytest.mark.parametrize(
        "body",
        [{"status": 200}, {"rate": 2}, {"latency_ms": -1}, {"maintenance": "yes"}, {"nope": 1}],
        ids=["status", "rate", "latency", "maintenance", "unknown-field"],
    )
    def test_bad_faults_are_refused(self, sandbox: SandboxAdmin, body: object) -> None:
        """Fault settings are validated field by field."""
        assert sandbox.http.post("/_sandbox/faults", json=body).status_code == 400

    def test_faults_are_replaced_read_and_cleared(self, sandbox: SandboxAdmin) -> None:
        """POST replaces the fault set, GET shows it, DELETE clears it."""
        sandbox.set_faults(status=503, rate=0.25)
        sandbox.set_faults(latency_ms=5)
        shown = sandbox.http.get("/_sandbox/faults").json()
        assert shown == Faults(latency_ms=5).as_dict()
        sandbox.clear_faults()
        assert sandbox.http.get("/_sandbox/faults").json() == Faults().as_dict()

    def test_stats_count_requests_per_route_and_key(self, sandbox: SandboxAdmin) -> None:
        """Stats count every request by route, and signed ones by key."""
        pair = generate_pair()
        sandbox.register(pair.api_key)
        sandbox.http.get("/api/v1/ping")
        send_signed(sandbox.http, "GET", "/api/v1/account", pair)
        send_signed(sandbox.http, "GET", "/api/v1/account", pair)
        stats = sandbox.stats()
        assert stats["routes"] == {"GET /api/v1/ping": 1, "GET /api/v1/account": 2}
        assert stats["keys"] == {pair.api_key: {"GET /api/v1/account": 2}}
        assert sandbox.count("GET /api/v1/account", pair.api_key) == 2
        assert stats["answers"]["GET /api/v1/account 200"] == 2


class TestFaults:
    @pytest.mark.parametrize(
        ("status", "code"),
        [(500, "SERVER_ERROR"), (503, "MAINTENANCE"), (504, "TIMEOUT"), (429, "TOO_MANY_REQUESTS")],
        ids=["500", "503", "504", "429"],
    )
    def test_a_fault_status_hits_public_and_signed_routes(
        self, sandbox: SandboxAdmin, status: int, code: str
    ) -> None:
        """An injected status answers every public and signed route with Backpack's code."""
        pair = generate_pair()
        sandbox.register(pair.api_key)
        sandbox.set_faults(status=status)
        for response in (
            sandbox.http.get("/api/v1/time"),
            sandbox.http.get("/api/v1/status"),
            send_signed(sandbox.http, "GET", "/api/v1/account", pair),
        ):
            assert (response.status_code, response.json()["code"]) == (status, code)

    def test_admin_routes_are_never_faulted(self, sandbox: SandboxAdmin) -> None:
        """Faults never block the admin routes that would clear them."""
        sandbox.set_faults(status=500)
        assert sandbox.http.get("/_sandbox/stats").status_code == 200
        sandbox.clear_faults()
        assert sandbox.http.get("/api/v1/ping").status_code == 200

    def test_rate_faults_a_fraction_of_requests(self, sandbox: SandboxAdmin) -> None:
        """With rate 0.5 some requests fail and some succeed, and stats count the failures."""
        sandbox.set_faults(status=500, rate=0.5)
        statuses = [sandbox.http.get("/api/v1/ping").status_code for _ in range(40)]
        assert set(statuses) == {200, 500}
        assert sandbox.stats()["faulted"] == statuses.count(500)

    def test_the_fault_rng_is_seeded(self) -> None:
        """Two states with the same seed fault the same requests."""
        runs = []
        for _ in range(2):
            state = SandboxState(seed=3)
            state.set_faults(Faults(status=500, rate=0.3))
            runs.append([state.arrive("GET /api/v1/ping", None)[1] for _ in range(50)])
        assert runs[0] == runs[1]
        assert any(runs[0])
        assert not all(runs[0])

    def test_latency_above_the_client_timeout_times_out(self, sandbox: SandboxAdmin) -> None:
        """Injected latency longer than the client's timeout surfaces as a timeout."""
        sandbox.set_faults(latency_ms=400)
        with pytest.raises(httpx.TimeoutException):
            sandbox.http.get("/api/v1/ping", timeout=0.05)


class TestThirdPartyClient:
    def test_bpx_py_places_an_order_with_a_key_read_from_vault(
        self, sandbox: SandboxAdmin, vault: Vault
    ) -> None:
        """bpx-py, given a key stored in and read back from Vault, signs and trades here."""
        pair = generate_pair()
        ref = KeyRef("main", "bpx-bot")
        vault.create_key(
            KeyRecord(
                ref=ref,
                api_key=pair.api_key,
                read_only=False,
                status=Status.ACTIVE,
                origin=Origin.GENERATED,
                created_at="2025-01-01T00:00:00+00:00",
                status_since="2025-01-01T00:00:00+00:00",
            ),
            pair.secret,
        )
        record, secret = vault.read_key(ref)
        sandbox.register(record.api_key)
        account = Account(public_key=record.api_key, secret_key=secret.reveal(), window=5000)
        account.BPX_API_URL = f"{sandbox.url}/"

        assert account.get_account()["leverageLimit"] == "10"
        order = account.execute_order(
            symbol="SOL_USDC",
            side="Bid",
            order_type="Limit",
            time_in_force="GTC",
            quantity="1.5",
            price="180.50",
            post_only=True,
            client_id=7,
        )
        assert order["status"] == "New"
        assert [o["id"] for o in account.get_open_orders(symbol="SOL_USDC")] == [order["id"]]
        cancelled = account.cancel_order(symbol="SOL_USDC", order_id=order["id"])
        assert cancelled["status"] == "Cancelled"

    def test_bpx_py_with_a_revoked_key_is_refused(self, sandbox: SandboxAdmin) -> None:
        """bpx-py sees the sandbox's unknown-key answer once the key is revoked."""
        pair = generate_pair()
        sandbox.register(pair.api_key)
        sandbox.revoke(pair.api_key)
        account = Account(public_key=pair.api_key, secret_key=pair.secret.reveal())
        account.BPX_API_URL = f"{sandbox.url}/"
        assert account.get_account() == {
            "code": UNKNOWN_KEY_ANSWER.code,
            "message": UNKNOWN_KEY_ANSWER.message,
        }


class TestServe:
    def test_serve_runs_until_sigterm(self) -> None:
        """``serve(host, port)``, the CLI's entry, answers on the port and exits on SIGTERM."""
        port = free_port()
        code = f"from backpack_vault.testing.sandbox import serve; serve('127.0.0.1', {port})"
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            answer = _poll(f"http://127.0.0.1:{port}/api/v1/ping")
            assert answer == "pong"
        finally:
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=15)
        # uvicorn shuts down, then re-raises the captured SIGTERM (exit status 143).
        assert returncode in (0, -signal.SIGTERM)


def _poll(url: str) -> str:
    for _ in range(200):
        try:
            return httpx.get(url, timeout=1).text
        except httpx.TransportError:
            time.sleep(0.05)
    return ""
