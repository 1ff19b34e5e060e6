"""Shared fixtures: one real OpenBao dev server per test session, fresh paths per test.

Nothing here mocks Vault. HOME points at a temporary directory for the whole
session and VAULT_*/BAO_* variables are removed, so no client can fall back to
a developer's own token.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backpack_vault.config import Secret, VaultSettings
from backpack_vault.core.keys import KeyRef
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


# -- backpack-vault exec with a stand-in bot (tests/test_exec.py, tests/test_rotation.py) ---------

EXEC_BOUND_S = 20.0

EXEC_CHILD = r"""
import json, os, signal, sys, time
from backpack_vault.config import Secret
from backpack_vault.core.keys import parse_key_pair

out, key_env, secret_env = sys.argv[1], sys.argv[2], sys.argv[3]
mode = sys.argv[4] if len(sys.argv) > 4 else "wait"

def note(**entry):
    with open(out, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")

if key_env == "-":
    data = json.loads(open(os.environ["BACKPACK_VAULT_KEY_FILE"], encoding="utf-8").read())
    key, secret = data["api_key"], data["api_secret"]
else:
    key, secret = os.environ[key_env], os.environ[secret_env]
parse_key_pair(key, Secret(secret))
note(start=os.getpid(), key=key, vault_token="VAULT_TOKEN" in os.environ)
if mode.startswith("exit"):
    sys.exit(int(mode[4:]))
signal.signal(signal.SIGHUP, lambda *_: note(signal="HUP"))
signal.signal(signal.SIGTERM, lambda *_: (note(signal="TERM"), sys.exit(42)))
while True:
    time.sleep(0.05)
"""


@dataclasses.dataclass
class Exec:
    process: subprocess.Popen[str]
    out: Path

    def lines(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]

    def starts(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if "start" in line]

    def signals(self) -> list[str]:
        return [line["signal"] for line in self.lines() if "signal" in line]

    def wait(self) -> tuple[int, str]:
        _, err = self.process.communicate(timeout=EXEC_BOUND_S)
        return self.process.returncode, err


ExecRunner = Callable[..., Exec]


@pytest.fixture
def exec_runner(tmp_path: Path, dev_vault: DevVault) -> Iterator[ExecRunner]:
    """``exec_runner(daemon_url, ref, *options, names=..., mode=...)``: ``backpack-vault
    exec REF`` running EXEC_CHILD under the daemon at ``daemon_url``, logged in to the
    session's OpenBao as root; every one still running is killed at the end."""
    started: list[Exec] = []
    child = tmp_path / "child.py"
    child.write_text(EXEC_CHILD)

    def run(
        daemon_url: str,
        ref: KeyRef,
        *options: str,
        names: tuple[str, str] = ("BACKPACK_API_KEY", "BACKPACK_API_SECRET"),
        mode: str = "wait",
    ) -> Exec:
        out = tmp_path / f"out-{len(started)}.jsonl"
        environ = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ["HOME"],
            "BACKPACK_VAULT_DAEMON_URL": daemon_url,
            "VAULT_ADDR": dev_vault.addr,
            "VAULT_TOKEN": dev_vault.root_token.reveal(),
        }
        argv = [
            sys.executable,
            "-m",
            "backpack_vault",
            "exec",
            str(ref),
            *options,
            "--",
            sys.executable,
            str(child),
            str(out),
            *names,
            mode,
        ]
        process = subprocess.Popen(
            argv, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started.append(Exec(process, out))
        return started[-1]

    yield run
    for one in started:
        if one.process.poll() is None:
            one.process.kill()
            one.process.wait()
