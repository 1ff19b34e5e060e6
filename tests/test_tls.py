"""TLS on the worker API: served from PEM files, reloaded in place without dropping anyone."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from backpack_vault.config import load
from backpack_vault.daemon.serving import ReloadableTLS, ServerThread, free_port
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import ConfigError
from backpack_vault.testing import wait_until

SelfSigned = Callable[..., tuple[Path, Path]]  # the conftest fixture self_signed


def _trust(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def _served_serial(port: int) -> int:
    """The serial number of the certificate a new connection is shown."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _app() -> Starlette:
    async def hello(_request: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    return Starlette(routes=[Route("/", hello)])


class TestTLS:
    def test_https_is_served_with_the_configured_pair(self, self_signed: SelfSigned) -> None:
        """A client that trusts the certificate gets an answer; one that doesn't is refused."""
        cert, key = self_signed("one", 1)
        with ServerThread(_app(), tls=ReloadableTLS(str(cert), str(key))) as server:
            assert server.url.startswith("https://")
            assert httpx.get(server.url, verify=_trust(cert)).text == "hello"
            with pytest.raises(httpx.ConnectError):
                httpx.get(server.url)

    def test_a_reload_swaps_the_certificate_and_keeps_open_connections(
        self, tmp_path: Path, self_signed: SelfSigned
    ) -> None:
        """New handshakes see the new certificate; a kept-alive connection goes on working."""
        one_cert, one_key = self_signed("one", 1)
        two_cert, two_key = self_signed("two", 2)
        served = tmp_path / "served.crt", tmp_path / "served.key"
        served[0].write_bytes(one_cert.read_bytes())
        served[1].write_bytes(one_key.read_bytes())
        tls = ReloadableTLS(str(served[0]), str(served[1]))
        with ServerThread(_app(), tls=tls) as server, httpx.Client(verify=_trust(one_cert)) as kept:
            assert kept.get(server.url).text == "hello"
            assert _served_serial(server.port) == 1
            served[0].write_bytes(two_cert.read_bytes())
            served[1].write_bytes(two_key.read_bytes())
            tls.reload()
            assert _served_serial(server.port) == 2
            assert kept.get(server.url).text == "hello"  # the open connection was not dropped
            assert httpx.get(server.url, verify=_trust(two_cert)).text == "hello"

    def test_a_bad_reload_keeps_the_old_certificate(self, self_signed: SelfSigned) -> None:
        """A half-written file is refused with a clear error, and serving goes on."""
        cert, key = self_signed("one", 1)
        tls = ReloadableTLS(str(cert), str(key))
        with ServerThread(_app(), tls=tls) as server:
            cert.write_text("-----BEGIN CERTIFICATE-----\ntrunc")
            with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
                tls.reload()
            assert _served_serial(server.port) == 1

    def test_cert_and_key_come_together(self) -> None:
        """One of the two settings alone is a configuration error naming both."""
        with pytest.raises(ConfigError, match="BACKPACK_VAULT_TLS_KEY"):
            load({"BACKPACK_VAULT_TLS_CERT": "/x.crt"})
        settings = load({"BACKPACK_VAULT_TLS_CERT": "/x.crt", "BACKPACK_VAULT_TLS_KEY": "/x.key"})
        assert (settings.tls_cert, settings.tls_key) == ("/x.crt", "/x.key")


class TestDaemonTLS:
    def test_serve_answers_https_and_reloads_on_sighup(
        self, tmp_path: Path, dev_vault: DevVault, kv_prefix: str, self_signed: SelfSigned
    ) -> None:
        """`serve` with BACKPACK_VAULT_TLS_CERT/KEY answers HTTPS; SIGHUP swaps the pair."""
        one_cert, one_key = self_signed("one", 1)
        two_cert, two_key = self_signed("two", 2)
        cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
        cert.write_bytes(one_cert.read_bytes())
        key.write_bytes(one_key.read_bytes())
        port = free_port()
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BACKPACK_VAULT_"))
        } | {
            "VAULT_ADDR": dev_vault.addr,
            "VAULT_TOKEN": dev_vault.root_token.reveal(),
            "BACKPACK_VAULT_LISTEN": f"127.0.0.1:{port}",
            "BACKPACK_VAULT_KV_PREFIX": kv_prefix,
            "BACKPACK_VAULT_TLS_CERT": str(cert),
            "BACKPACK_VAULT_TLS_KEY": str(key),
            "BACKPACK_VAULT_BACKPACK_URL": "http://127.0.0.1:9",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "backpack_vault", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"https://127.0.0.1:{port}/healthz"
        try:

            def answers(trust: Path) -> bool:
                try:
                    return httpx.get(url, verify=_trust(trust)).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(lambda: answers(one_cert), 30, "the daemon answers HTTPS")
            cert.write_bytes(two_cert.read_bytes())
            key.write_bytes(two_key.read_bytes())
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: _served_serial(port) == 2, 10, "the new certificate is served")
            assert answers(two_cert)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
