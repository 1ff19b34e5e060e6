"""The daemon's HTTP protocol (``daemon/quick.py``) on real uvicorn and real sockets.

A lane answers what it can; everything else reaches the ASGI app as if the
protocol were uvicorn's own: whole, in order, with its disconnects. The app here
echoes what it was sent, and the lane answers bodies that say "quick", declines
those that say "app" and raises on "boom", so each test shows who answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn

from backpack_vault.api import QuickAnswer
from backpack_vault.daemon.quick import _PER_READ, quick_protocol
from backpack_vault.daemon.serving import free_port
from backpack_vault.testing import wait_until

LIMIT = 1024
KEEP_ALIVE_S = 1
SIGN = "/v1/keys/main/bot-a/sign"


@dataclass
class Seen:
    lane: list[tuple[str, str, str, dict[str, str], bytes]] = field(default_factory=list)
    app: list[dict[str, Any]] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    app_headers: list[list[bytes]] = field(default_factory=list)


@dataclass
class Served:
    port: int
    seen: Seen
    server: uvicorn.Server
    thread: threading.Thread

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def lane(seen: Seen) -> Any:
    def answer(
        route: str, sub: str, name: str, headers: Mapping[str, str], body: bytes
    ) -> QuickAnswer | None:
        seen.lane.append((route, sub, name, dict(headers), body))
        if b"boom" in body:
            raise RuntimeError("a bug in the lane")
        if b"quick" not in body:
            return None
        digest = hashlib.sha256(body).hexdigest()

        def then() -> None:
            if b"unrecorded" in body:
                raise RuntimeError("a bug in the bookkeeping")
            seen.after.append(digest)

        return QuickAnswer(json.dumps({"by": "lane", "sha": digest}).encode(), then)

    return answer


def echo_app(seen: Seen) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, disconnected = b"", False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.app.append(
            {"path": scope["path"], "method": scope["method"], "body": body, "gone": disconnected}
        )
        seen.app_headers.append([name for name, _ in scope["headers"]])
        if disconnected:
            return
        if scope["path"].startswith("/slow/"):  # still answering when the next requests arrive
            await asyncio.sleep(float(scope["path"].removeprefix("/slow/")))
        payload = json.dumps({"by": "app", "sha": hashlib.sha256(body).hexdigest()}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return app


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """uvicorn serving ``echo_app`` through the quick protocol; the keep-alive timeout is
    ``KEEP_ALIVE_S`` unless the test passes another (indirect parametrisation)."""
    seen = Seen()
    port = free_port()
    config = uvicorn.Config(
        echo_app(seen),
        host="127.0.0.1",
        port=port,
        http=quick_protocol(lane(seen), body_limit=LIMIT),
        log_config=None,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=getattr(request, "param", KEEP_ALIVE_S),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="uvicorn started")
    try:
        yield Served(port, seen, server, thread)
    finally:
        server.should_exit = True
        thread.join(10)


def request(
    path: str = SIGN,
    body: bytes = b'{"quick": 1}',
    *,
    method: str = "POST",
    version: str = "1.1",
    headers: tuple[str, ...] = (),
) -> bytes:
    head = [f"{method} {path} HTTP/{version}", "Host: test", "X-Vault-Token: hvs.worker"]
    head += [*headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One HTTP/1.1 answer with a Content-Length, read off ``sock`` byte by byte."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"connection closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(body) < length:
        body += sock.recv(length - len(body))
    return int(status_line.split()[1]), headers, json.loads(body)


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class TestAnsweredInTheCallback:
    def test_what_the_lane_answers_never_reaches_the_app(self, served: Served) -> None:
        """Three requests on one kept connection: each a 200 with the lane's body and
        uvicorn's own headers, the work after it done once written."""
        with served.connect() as sock:
            for n in range(3):
                body = b'{"quick": %d}' % n
                sock.sendall(request(body=body))
                status, headers, answer = read_answer(sock)
                assert (status, answer["by"]) == (200, "lane")
                assert answer["sha"] == hashlib.sha256(body).hexdigest()
                assert headers["content-type"] == "application/json"
                assert {"date", "server"} <= set(headers)
        assert served.seen.app == []
        assert [entry[:3] for entry in served.seen.lane] == [("sign", "main", "bot-a")] * 3
        assert served.seen.lane[0][3] == {"x-vault-token": "hvs.worker"}
        wait_until(lambda: len(served.seen.after) == 3, what="the work after each answer")

    def test_a_body_in_pieces_is_held_until_it_is_whole(self, served: Served) -> None:
        body = b'{"quick": "' + b"x" * 600 + b'"}'
        wire = request(body=body)
        with served.connect() as sock:
            sock.sendall(wire[:-97])
            wait_until(lambda: holding(served), what="the request held")
            assert served.seen.lane == []  # not offered before its body is whole
            for start in range(len(wire) - 97, len(wire), 13):
                sock.sendall(wire[start : start + 13])
            status, _, answer = read_answer(sock)
        assert (status, answer["by"]) == (200, "lane")
        assert served.seen.lane[0][4] == body

    def test_a_repeated_token_header_counts_once_as_the_app_reads_it(self, served: Served) -> None:
        with served.connect() as sock:
            sock.sendall(request(headers=("X-Vault-Token: hvs.second", "Authorization: Bearer b")))
            read_answer(sock)
        assert served.seen.lane[0][3] == {
            "x-vault-token": "hvs.worker",
            "authorization": "Bearer b",
        }

    def test_a_failure_after_the_answer_leaves_the_answer_and_connection_alone(
        self, served: Served
    ) -> None:
        with served.connect() as sock:
            sock.sendall(request(body=b'{"quick": "unrecorded"}'))
            assert read_answer(sock)[:1] == (200,)
            sock.sendall(request())
            assert read_answer(sock)[2]["by"] == "lane"
        wait_until(lambda: len(served.seen.after) == 1, what="the second answer's work")

    def test_the_copy_route_is_offered_too(self, served: Served) -> None:
        with served.connect() as sock:
            sock.sendall(request("/v1/keys/sub-1/bot.b_c/copy"))
            assert read_answer(sock)[2]["by"] == "lane"
        assert served.seen.lane[0][:3] == ("copy", "sub-1", "bot.b_c")


class TestHandedToTheApp:
    @pytest.mark.parametrize(
        "body", [b'{"app": 1}', b'{"boom": 1}', b""], ids=["declined", "raised", "empty"]
    )
    def test_what_the_lane_does_not_answer_reaches_the_app_whole(
        self, served: Served, body: bytes
    ) -> None:
        with served.connect() as sock:
            sock.sendall(request(body=body))
            status, _, answer = read_answer(sock)
            sock.sendall(request())  # the connection serves on, through the lane again
            assert read_answer(sock)[2]["by"] == "lane"
        assert (status, answer["by"]) == (200, "app")
        assert served.seen.app == [{"path": SIGN, "method": "POST", "body": body, "gone": False}]

    def test_a_body_over_the_limit_reaches_the_app_in_full(self, served: Served) -> None:
        body = b'{"quick": "' + b"y" * (3 * LIMIT) + b'"}'
        wire = request(body=body)
        with served.connect() as sock:
            sock.sendall(wire[:200])
            wait_until(lambda: holding(served), what="the request held")
            sock.sendall(wire[200:])
            status, _, answer = read_answer(sock)
        assert (status, answer["by"]) == (200, "app")
        assert answer["sha"] == hashlib.sha256(body).hexdigest()
        assert served.seen.lane == []

    @pytest.mark.parametrize(
        ("path", "method", "version", "headers"),
        [
            (SIGN, "GET", "1.1", ()),
            (SIGN + "/", "POST", "1.1", ()),
            (SIGN + "?x=1", "POST", "1.1", ()),
            ("/v1/keys/main/bot%2Da/sign", "POST", "1.1", ()),
            ("/v1/keys/main/bot-a/report", "POST", "1.1", ()),
            ("/v1/keys/main/a/b/sign", "POST", "1.1", ()),
            ("/v1/keys/main/bot~a/sign", "POST", "1.1", ()),
            (SIGN, "POST", "1.1", ("Connection: close",)),
            (SIGN, "POST", "1.0", ()),
            (SIGN, "POST", "1.1", ("Expect: 100-continue",)),
        ],
        ids=[
            "get",
            "trailing-slash",
            "query",
            "escaped",
            "other-route",
            "deeper",
            "not-a-name",
            "connection-close",
            "http-1.0",
            "expect",
        ],
    )
    def test_requests_outside_the_lane_are_never_offered_to_it(
        self, served: Served, path: str, method: str, version: str, headers: tuple[str, ...]
    ) -> None:
        with served.connect() as sock:
            sock.sendall(request(path, method=method, version=version, headers=headers))
            if "Expect: 100-continue" in headers:
                interim = b"HTTP/1.1 100 Continue\r\n\r\n"
                assert sock.recv(len(interim)) == interim
            status, _, answer = read_answer(sock)
        assert (status, answer["by"]) == (200, "app")
        assert served.seen.lane == []

    def test_pipelined_requests_are_answered_in_the_order_sent(self, served: Served) -> None:
        """A request behind one the app is still answering waits its turn (the app's),
        rather than overtake it through the lane."""
        with served.connect() as sock:
            sock.sendall(
                request("/slow/0.2", body=b"first") + request(body=b'{"quick": 2}') + request()
            )
            answers = [read_answer(sock)[2] for _ in range(3)]
        assert answers[0] == {"by": "app", "sha": hashlib.sha256(b"first").hexdigest()}
        assert len(served.seen.lane) == 0
        assert [a["sha"] for a in answers[1:]] == [
            hashlib.sha256(b'{"quick": 2}').hexdigest(),
            hashlib.sha256(b'{"quick": 1}').hexdigest(),
        ]

    def test_a_request_after_one_answered_at_once_runs_to_its_end(self, served: Served) -> None:
        """An answer from the lane arms the keep-alive timeout; a request read in the same
        breath, longer than it, still gets its answer (uvicorn clears it per request)."""
        with served.connect() as sock:
            sock.sendall(request() + request(f"/slow/{KEEP_ALIVE_S + 0.5}", body=b"long"))
            assert read_answer(sock)[2]["by"] == "lane"
            assert read_answer(sock)[2]["by"] == "app"

    def test_many_requests_in_one_read_leave_room_for_other_connections(
        self, served: Served
    ) -> None:
        """Eight are answered in the callback; the rest queue as uvicorn's, one task each
        (other connections are served between them), still in the order sent."""
        bodies = [b'{"quick": %d}' % n for n in range(12)]
        with served.connect() as sock:
            sock.sendall(b"".join(request(body=body) for body in bodies))
            answers = [read_answer(sock)[2] for _ in bodies]
        assert [a["by"] for a in answers] == ["lane"] * _PER_READ + ["app"] * (12 - _PER_READ)
        assert [a["sha"] for a in answers] == [hashlib.sha256(b).hexdigest() for b in bodies]

    def test_a_chunked_bodys_trailer_is_no_header(self, served: Served) -> None:
        """A token sent in a chunked body's trailer is not the request's token: neither the
        lane nor, for a request handed over, the app sees it."""
        for word in (b"quick", b"app"):
            chunk = b'{"%s": 1}' % word
            wire = (
                b"POST " + SIGN.encode() + b" HTTP/1.1\r\nHost: test\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n0\r\nX-Vault-Token: from-trailer\r\n\r\n"
                % (len(chunk), chunk)
            )
            with served.connect() as sock:
                sock.sendall(wire)
                assert read_answer(sock)[2]["by"] == word.decode().replace("quick", "lane")
        assert [entry[3] for entry in served.seen.lane] == [{}, {}]
        assert served.seen.app_headers == [[b"host", b"transfer-encoding"]]

    def test_a_client_gone_before_its_body_is_in_is_the_apps_to_see(self, served: Served) -> None:
        wire = request(body=b'{"quick": "' + b"z" * 100 + b'"}')
        with served.connect() as sock:
            sock.sendall(wire[:-20])
            wait_until(lambda: holding(served), what="the request held")
        wait_until(lambda: served.seen.app != [], what="the app told of the disconnect")
        assert served.seen.app[0]["gone"] is True
        assert served.seen.lane == []


def holding(served: Served) -> bool:
    """Whether a connection holds a request for the lane (headers read, body not whole)."""
    connections = list(served.server.server_state.connections)
    return any(getattr(c, "_held", None) is not None for c in connections)


def begin_shutdown_while_held(served: Served) -> None:
    """Once the server holds a request, start uvicorn's graceful shutdown, and return when
    it has told the connections (it stops listening first, in the same step)."""
    wait_until(lambda: holding(served), what="the request held")
    served.server.should_exit = True

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", served.port), timeout=1).close()
        except OSError:
            return True
        return False

    wait_until(refused, what="uvicorn shutting down")


# A keep-alive timeout longer than the tests wait: only the shutdown can close a connection.
@pytest.mark.parametrize("served", [60], indirect=True)
class TestShutdown:
    def test_a_held_request_is_answered_then_its_connection_closed(self, served: Served) -> None:
        wire = request()
        with served.connect() as sock:
            sock.sendall(wire[:-3])
            begin_shutdown_while_held(served)
            sock.sendall(wire[-3:])
            status, headers, answer = read_answer(sock)
            assert (status, answer["by"], headers["connection"]) == (200, "lane", "close")
            assert closed(sock)

    def test_nothing_read_after_the_held_request_runs(self, served: Served) -> None:
        """The held request's answer says ``connection: close``; a request behind it in the
        same read is dropped unanswered, as uvicorn drops what is queued on a closing
        connection (a copy taken for nobody would be a copy outstanding for nobody)."""
        wire = request()
        with served.connect() as sock:
            sock.sendall(wire[:-3])
            begin_shutdown_while_held(served)
            sock.sendall(wire[-3:] + request("/v1/keys/main/bot-a/copy", body=b'{"app": 1}'))
            status, headers, _ = read_answer(sock)
            assert (status, headers["connection"]) == (200, "close")
            assert closed(sock)
        served.thread.join(10)  # uvicorn's shutdown waits for every task it started
        assert not served.thread.is_alive()
        assert len(served.seen.lane) == 1
        assert served.seen.app == []

    def test_an_idle_kept_connection_is_closed(self, served: Served) -> None:
        with served.connect() as sock:
            sock.sendall(request())
            read_answer(sock)
            served.server.should_exit = True
            sock.settimeout(5)
            assert closed(sock)
