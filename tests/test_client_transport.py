"""Kept-alive HTTP/1.1 (wire.py): BrokerClient's calls to the daemon, and its unwraps at Vault.

A ``BrokerClient`` that makes its own httpx client sends its four calls and its
unwraps this way; one handed an ``httpx.Client`` sends them through it. Both are run against a real
daemon on loopback (over plain HTTP and over TLS) and must answer and fail alike;
the protocol corners (a connection the server closed while idle, chunked answers,
``Connection: close``) are run against a small scripted HTTP server on loopback.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from backpack_vault.backpack.signing import signing_string, verify
from backpack_vault.client.broker import BrokerClient
from backpack_vault.client.protocol import tls_context
from backpack_vault.config import BrokerSettings, CheckSettings, Secret, Settings, VaultSettings
from backpack_vault.core.keys import KeyRef, Status
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ReloadableTLS, ServerThread, free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import (
    AccessDenied,
    BrokerUnavailable,
    CopyUnavailable,
    KeyRetired,
    NotAuthenticated,
    ServiceError,
    UnknownKey,
)
from backpack_vault.testing import store_key
from backpack_vault.vault.client import Provisioner, Vault
from backpack_vault.wire import Pool, WireError, WireTimeout

SelfSigned = Callable[..., tuple[Path, Path]]  # the conftest fixture self_signed

REF = KeyRef("main", "bot-a")
ORDER = {"symbol": "SOL_USDC", "side": "Bid", "orderType": "Limit", "price": "1", "quantity": "1"}


@dataclass
class Served:
    url: str
    vault_addr: str
    root: Secret
    reports: list[tuple[str, str]]


def _daemon(vault: Vault, vault_settings: VaultSettings, reports: list[tuple[str, str]]) -> Daemon:
    settings = Settings(vault_settings, BrokerSettings(), CheckSettings())
    return Daemon(
        settings,
        vault=vault,
        report=lambda ref, reason: reports.append((str(ref), reason)),
        report_interval_s=0.01,
    )


@pytest.fixture
def served(vault: Vault, vault_settings: VaultSettings, dev_vault: DevVault) -> Iterator[Served]:
    reports: list[tuple[str, str]] = []
    with (
        _daemon(vault, vault_settings, reports) as daemon,
        ServerThread(daemon.app) as server,
    ):
        yield Served(server.url, dev_vault.addr, dev_vault.root_token, reports)


def pool_of(broker: BrokerClient) -> Pool:
    pool = broker._pool_for(broker.url)
    assert pool is not None
    return pool


class TestLeanPath:
    def test_the_four_calls_share_one_kept_connection(self, served: Served, vault: Vault) -> None:
        pair = store_key(vault, REF)
        with BrokerClient(served.url, vault_addr=served.vault_addr, token=served.root) as b:
            for _ in range(20):
                stamp = int(time.time() * 1000)
                headers = b.sign(REF, "orderExecute", ORDER, timestamp=stamp, window=6000)
                message = signing_string("orderExecute", ORDER, stamp, 6000)
                assert verify(pair.api_key, message, headers["X-Signature"])
            assert b.copy(REF).api_key == pair.api_key
            assert b.info(REF)["status"] == "active"
            b.report(REF, "Invalid signature")
            assert pool_of(b).connections == 1
        assert served.reports == [(str(REF), "Invalid signature")]

    def test_unwraps_at_vault_share_one_kept_connection(self, served: Served, vault: Vault) -> None:
        pair = store_key(vault, REF)
        with BrokerClient(served.url, vault_addr=served.vault_addr, token=served.root) as b:
            copies = [b.copy(REF) for _ in range(5)]
            to_vault = b._pool_for(b.vault_addr)
            assert to_vault is not None
            assert to_vault.connections == 1
        assert {c.api_secret.reveal() for c in copies} == {pair.secret.reveal()}

    def test_a_used_wrapping_token_is_copy_unavailable_either_way(
        self, served: Served, vault: Vault
    ) -> None:
        """Vault refuses a second unwrap; both paths say so in the same words."""
        store_key(vault, REF)
        messages = []
        with httpx.Client() as http:
            for given in (None, http):
                with BrokerClient(
                    served.url, vault_addr=served.vault_addr, token=served.root, http=given
                ) as b:
                    assert (b._pool_for(b.vault_addr) is None) is (given is not None)
                    wrap_token = Secret(b._call("POST", REF, "/copy")["wrap_token"])
                    b._unwrap(REF, wrap_token)
                    with pytest.raises(CopyUnavailable) as refused:
                        b._unwrap(REF, wrap_token)
                    messages.append(refused.value.message)
        assert messages[0] == messages[1]

    @pytest.mark.parametrize("path", ["pool", "httpx"], ids=str)
    @pytest.mark.parametrize(
        ("case", "error"),
        [
            ("unknown-token", NotAuthenticated),
            ("no-grant", AccessDenied),
            ("unknown-key", UnknownKey),
            ("retired", KeyRetired),
        ],
        ids=lambda v: v if isinstance(v, str) else v.__name__,
    )
    def test_refusals_are_the_same_errors_either_way(
        self, served: Served, vault: Vault, path: str, case: str, error: type[ServiceError]
    ) -> None:
        store_key(vault, REF, status=Status.RETIRED if case == "retired" else Status.ACTIVE)
        token = {
            "unknown-token": Secret("s.unknown"),
            "no-grant": Provisioner(vault).create_token(["default"]),
        }.get(case, served.root)
        key = KeyRef("main", "nothing") if case == "unknown-key" else REF
        with httpx.Client() as http:
            kwargs: dict[str, Any] = {"http": http} if path == "httpx" else {}
            with BrokerClient(served.url, vault_addr=served.vault_addr, token=token, **kwargs) as b:
                with pytest.raises(error):
                    b.sign(key, "accountQuery")
                assert (b._pool_for(b.url) is None) is (path == "httpx")

    def test_an_idle_connection_the_daemon_closed_is_replaced(
        self, served: Served, vault: Vault, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """uvicorn closes a connection idle for 5 s: the next call opens another."""
        store_key(vault, REF)
        with BrokerClient(served.url, vault_addr=served.vault_addr, token=served.root) as b:
            b.sign(REF, "accountQuery")
            monkeypatch.setattr("backpack_vault.wire.IDLE_S", 60.0)
            for conn in pool_of(b)._idle:
                conn.sock.shutdown(socket.SHUT_RDWR)  # as the daemon's close looks from here
            assert b.sign(REF, "accountQuery")["X-API-Key"]
            assert pool_of(b).connections == 2

    def test_an_unreachable_daemon_is_broker_unavailable(self, dev_vault: DevVault) -> None:
        url = f"http://127.0.0.1:{free_port()}"
        with (
            BrokerClient(url, vault_addr=dev_vault.addr, token="s.x") as b,
            pytest.raises(BrokerUnavailable, match="unreachable: ConnectionRefusedError"),
        ):
            b.sign(REF, "accountQuery")

    @pytest.mark.parametrize(
        ("environ", "pool"),
        [
            ({}, True),
            ({"HTTP_PROXY": "http://proxy.example:3128"}, False),
            ({"ALL_PROXY": "http://proxy.example:3128"}, False),
            ({"HTTP_PROXY": "http://proxy.example:3128", "NO_PROXY": "127.0.0.1"}, True),
            ({"HTTPS_PROXY": "http://proxy.example:3128"}, True),  # not for an http:// daemon
        ],
        ids=["none", "http-proxy", "all-proxy", "no-proxy", "https-proxy"],
    )
    def test_a_proxy_that_applies_leaves_the_calls_to_httpx(
        self, monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], pool: bool
    ) -> None:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
            monkeypatch.delenv(name.lower(), raising=False)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        found = Pool.for_url("http://127.0.0.1:8280", timeout=1.0, tls=tls_context(verify=True))
        assert (found is not None) is pool


class TestTLS:
    def test_the_daemon_over_https_with_its_ca(
        self,
        vault: Vault,
        vault_settings: VaultSettings,
        dev_vault: DevVault,
        self_signed: SelfSigned,
    ) -> None:
        """The CA bundle verifies the daemon; without it the call is refused, as httpx would."""
        pair = store_key(vault, REF)
        cert, key = self_signed("daemon")
        reports: list[tuple[str, str]] = []
        with (
            _daemon(vault, vault_settings, reports) as daemon,
            ServerThread(daemon.app, tls=ReloadableTLS(str(cert), str(key))) as server,
        ):
            assert server.url.startswith("https://")
            root = dev_vault.root_token
            with BrokerClient(
                server.url, vault_addr=dev_vault.addr, token=root, verify=str(cert)
            ) as b:
                assert b.sign(REF, "accountQuery")["X-API-Key"] == pair.api_key
                assert b.info(REF)["api_key"] == pair.api_key
            with (
                BrokerClient(server.url, vault_addr=dev_vault.addr, token=root) as untrusting,
                pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED"),
            ):
                untrusting.sign(REF, "accountQuery")


# -- the protocol's corners, against a scripted server ---------------------------------------


@dataclass
class Script:
    """What the scripted server answers, one entry per request, and what it received."""

    answers: list[bytes]
    close_after: set[int] = field(default_factory=set)  # close the connection after these
    received: list[bytes] = field(default_factory=list)
    connections: int = 0


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], Pool]]:
    servers: list[socketserver.ThreadingTCPServer] = []
    pools: list[Pool] = []

    def start(script: Script) -> Pool:
        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                script.connections += 1
                while script.answers:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = self.rfile.readline()
                        if not line:
                            return
                        head += line
                    length = next(
                        (
                            int(line.split(b":")[1])
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        ),
                        0,
                    )
                    script.received.append(head + self.rfile.read(length))
                    self.wfile.write(script.answers.pop(0))
                    self.wfile.flush()
                    if len(script.received) in script.close_after:
                        return

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        port = server.server_address[1]
        pool = Pool.for_url(f"http://127.0.0.1:{port}", timeout=5.0, tls=tls_context(verify=True))
        assert pool is not None
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        pool.close()
    for server in servers:
        server.shutdown()
        server.server_close()


def ok(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"".join(extra)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


class TestProtocol:
    def test_one_write_per_request_with_the_token_and_the_body(
        self, scripted: Callable[[Script], Pool]
    ) -> None:
        script = Script([ok(b'{"a":1}')])
        pool = scripted(script)
        assert pool.request("POST", "/v1/keys/main/b/sign", b'{"x":1}', "s.tok") == (
            200,
            {"content-type": "application/json", "content-length": "7"},
            b'{"a":1}',
        )
        [sent] = script.received
        assert sent.startswith(b"POST /v1/keys/main/b/sign HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nX-Vault-Token: s.tok\r\n" in sent
        assert b"\r\nContent-Length: 7\r\n" in sent
        assert sent.endswith(b"\r\n\r\n" + b'{"x":1}')  # headers and body in one write

    def test_a_connection_closed_by_the_server_after_answering_is_replaced(
        self, scripted: Callable[[Script], Pool]
    ) -> None:
        script = Script([ok(b"{}"), ok(b'{"n":2}')], close_after={1})
        pool = scripted(script)
        assert pool.request("GET", "/one", None, "t")[2] == b"{}"
        time.sleep(0.05)  # the server's close arrives
        assert pool.request("GET", "/two", None, "t")[2] == b'{"n":2}'
        assert (pool.connections, script.connections) == (2, 2)

    def test_chunked_answers_and_connection_close_are_read(
        self, scripted: Callable[[Script], Pool]
    ) -> None:
        chunked = (
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n'
        )
        closing = ok(b'{"b":2}', b"Connection: close\r\n")
        script = Script([chunked, closing, ok(b"{}")], close_after={2})
        pool = scripted(script)
        assert pool.request("GET", "/", None, "t")[::2] == (503, b'{"a":1}')
        assert pool.request("GET", "/", None, "t")[2] == b'{"b":2}'
        assert pool.request("GET", "/", None, "t")[2] == b"{}"
        assert pool.connections == 2  # kept after the chunked answer, not after the close

    def test_a_fresh_connection_closed_without_an_answer_is_an_error(
        self, scripted: Callable[[Script], Pool]
    ) -> None:
        pool = scripted(Script([b""], close_after={1}))
        with pytest.raises(WireError, match="without answering"):
            pool.request("GET", "/", None, "t")

    def test_an_answer_that_runs_to_the_close_is_read_whole(
        self, scripted: Callable[[Script], Pool]
    ) -> None:
        """No Content-Length, no chunks: HTTP/1.1 says the body ends where the connection
        does; it is read whole, and the connection is not kept."""
        script = Script([b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"a":1}'], {1})
        pool = scripted(script)
        assert pool.request("GET", "/", None, "t")[::2] == (200, b'{"a":1}')
        assert pool._idle == []

    def test_a_connection_closed_in_the_middle_of_an_answer_is_an_error(
        self, scripted: Callable[[Script], Pool]
    ) -> None:
        """Part of an answer came back: the request may have been acted on, so it is not
        sent again; the caller hears the daemon did not finish answering."""
        script = Script([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"], {1})
        pool = scripted(script)
        with pytest.raises(WireError, match="in the middle of an answer"):
            pool.request("POST", "/v1/keys/main/b/sign", b"{}", "t")
        assert len(script.received) == 1

    def test_an_interim_answer_is_skipped_and_bytes_after_the_answer_close_it(
        self, scripted: Callable[[Script], Pool]
    ) -> None:
        """A 100 Continue before the answer is not the answer; an answer followed by more
        bytes is read, and its connection is not reused (the bytes belong to nobody)."""
        interim = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"a":1}')
        trailing = ok(b'{"b":2}') + ok(b'{"c":3}')
        script = Script([interim, trailing, ok(b'{"d":4}')], {2})
        pool = scripted(script)
        assert pool.request("POST", "/", b"{}", "t")[::2] == (200, b'{"a":1}')
        assert pool.request("POST", "/", b"{}", "t")[::2] == (200, b'{"b":2}')
        assert pool._idle == []
        assert pool.request("POST", "/", b"{}", "t")[::2] == (200, b'{"d":4}')
        assert pool.connections == 2

    def test_a_token_that_is_not_ascii_is_never_sent(
        self, scripted: Callable[[Script], Pool]
    ) -> None:
        script = Script([ok(b"{}")])
        pool = scripted(script)
        with pytest.raises(WireError, match="not ASCII"):
            pool.request("GET", "/", None, "s.tök")
        assert script.received == []

    def test_a_server_that_never_answers_is_a_timeout(self) -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            pool = Pool.for_url(f"http://127.0.0.1:{port}", timeout=0.2, tls=None)
            assert pool is not None
            started = time.monotonic()
            with pytest.raises(WireTimeout, match="did not answer in time"):
                pool.request("GET", "/", None, "t")
            assert time.monotonic() - started < 5
            pool.close()

    def test_extra_headers_are_sent_and_a_line_break_in_one_is_refused(
        self, scripted: Callable[[Script], Pool]
    ) -> None:
        script = Script([ok(b"{}")])
        pool = scripted(script)
        pool.request("GET", "/v1/x", None, "t", {"X-Vault-Wrap-TTL": "60s"})
        assert b"\r\nX-Vault-Wrap-TTL: 60s\r\n" in script.received[0]
        with pytest.raises(WireError, match="line break"):
            pool.request("GET", "/", None, "t", {"X-Evil": "1\r\nX-More: 2"})
        assert len(script.received) == 1

    def test_a_token_with_a_line_break_is_never_sent(
        self, scripted: Callable[[Script], Pool]
    ) -> None:
        script = Script([ok(b"{}")])
        pool = scripted(script)
        with pytest.raises(WireError, match="line break"):
            pool.request("GET", "/", None, "s.tok\r\nX-Evil: 1")
        assert script.received == []
