"""Shared fixtures: one real OpenBao dev server per test session, fresh paths per test.

Nothing here mocks Vault. HOME points at a temporary directory for the whole
session and VAULT_*/BAO_* variables are removed, so no client can fall back to
a developer's own token.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backpack_vault.config import Secret, VaultSettings
from backpack_vault.dev.vault import DevVault
from backpack_vault.vault.client import Vault

_SESSION_HOME = tempfile.mkdtemp(prefix="bv-test-home-")
for _name in [n for n in os.environ if n.startswith(("VAULT_", "BAO_", "BACKPACK_VAULT_"))]:
    del os.environ[_name]
os.environ["HOME"] = _SESSION_HOME


@pytest.fixture(scope="session")
def dev_vault() -> Iterator[DevVault]:
    """A real OpenBao dev server on a random loopback port, stopped by PID at the end."""
    with DevVault() as server:
        yield server


SelfSigned = Callable[..., tuple[Path, Path]]


@pytest.fixture
def self_signed(tmp_path: Path) -> SelfSigned:
    """``self_signed(name, serial=None)``: a self-signed certificate for 127.0.0.1 (its own
    CA, so it also stands in for a cluster's CA) and its key, as PEM files in tmp_path."""

    def make(name: str, serial: int | None = None) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number() if serial is None else serial)
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file

    return make


@pytest.fixture
def kv_prefix() -> str:
    """A KV prefix unique to one test, so tests never see each other's keys."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def vault_settings(dev_vault: DevVault, kv_prefix: str) -> VaultSettings:
    return VaultSettings(
        addr=dev_vault.addr,
        token=dev_vault.root_token,
        kv_prefix=kv_prefix,
        grant_prefix=f"{kv_prefix}-broker",
    )


@pytest.fixture
def vault(vault_settings: VaultSettings) -> Iterator[Vault]:
    """A Vault client logged in with the dev server's root token."""
    client = Vault(vault_settings)
    client.login()
    yield client
    client.close()


@pytest.fixture
def root_token(dev_vault: DevVault) -> Secret:
    return dev_vault.root_token


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


# --- sandbox exchange fixtures ---
# One sandbox exchange per session on a loopback port (real HTTP, real uvicorn);
# each test starts from a clean state: no keys, no faults, no orders, zero counts.

import httpx  # noqa: E402

from backpack_vault.daemon.serving import ServerThread  # noqa: E402
from backpack_vault.testing.sandbox import SandboxAdmin, SandboxState, create_app  # noqa: E402


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[tuple[ServerThread, SandboxState]]:
    state = SandboxState(seed=7)
    with ServerThread(create_app(state)) as server:
        yield server, state


@pytest.fixture
def sandbox_state(sandbox_server: tuple[ServerThread, SandboxState]) -> SandboxState:
    return sandbox_server[1]


@pytest.fixture
def sandbox(sandbox_server: tuple[ServerThread, SandboxState]) -> Iterator[SandboxAdmin]:
    """The session's sandbox, reset; ``sandbox.url`` is its base URL."""
    server, state = sandbox_server
    state.reset()
    with httpx.Client(base_url=server.url, timeout=5.0) as http:
        yield SandboxAdmin(http)
    state.reset()
