"""``backpack-vault dev`` and ``dev --tour``, run as real processes on free ports.

Each run starts its own OpenBao dev server, sandbox exchange and daemon (or, with VAULT_ADDR,
uses the session's dev server), so these are end-to-end: what ``make dev`` does. Under
``coverage run`` the child ``backpack-vault dev`` is measured too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from backpack_vault.dev.vault import DevVault, free_port
from backpack_vault.vault.client import Vault

ROOT = Path(__file__).resolve().parents[1]

TOUR_STEPS = (
    r"1\. stored main/demo in Vault \(pending\)$",
    r"2\. Backpack accepted the key: active \(",
    r"3\. worker got a wrapped copy and placed order #\d+ ",
    r"4\. worker had the daemon sign and placed order #\d+ ",
    r"5\. revoked the key at the sandbox \(as in the web UI\)",
    r"6\. daemon detected it: revoked after \d+\.\d s$",
    (
        r"7\. cutoff: copy refused \(409 key_not_usable\), sign refused \(409 key_not_usable\), "
        r"an unclaimed wrapping token no longer unwraps \(400\)$"
    ),
)


def _under_coverage() -> bool:
    try:
        import coverage  # noqa: PLC0415 - only when the suite runs under it
    except ImportError:  # pragma: no cover - coverage is a dev dependency
        return False
    return coverage.Coverage.current() is not None


def dev_command(*args: str) -> list[str]:
    runner = ["-m", "coverage", "run"] if _under_coverage() else []
    return [sys.executable, *runner, "-m", "backpack_vault", "dev", *args]


def ports() -> list[str]:
    return ["--listen", f"127.0.0.1:{free_port()}", "--sandbox-port", str(free_port())]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VAULT_", "BAO_", "BACKPACK_VAULT_"))
    }
    return env | {"HOME": str(home)} | extra


def pids_in(lines: list[str]) -> set[int]:
    return {int(pid) for line in lines for pid in re.findall(r"\bpid (\d+)\b", line)}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_tour(home: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        dev_command("--tour", *ports(), *args),
        env=clean_env(home, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    return done, time.monotonic() - started


def assert_every_step(stdout: str) -> None:
    lines = stdout.splitlines()
    steps = [line for line in lines if re.match(r"\d\. ", line)]
    assert len(steps) == len(TOUR_STEPS), stdout
    for line, pattern in zip(steps, TOUR_STEPS, strict=True):
        assert re.search(pattern, line), f"{line!r} does not match {pattern!r}"
    assert lines[-1] == "stopped"


@pytest.mark.slow
def test_tour_shows_every_step_stops_everything_and_exits_0(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    done, seconds = run_tour(tmp_path, "--logs", str(logs))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_every_step(done.stdout)
    assert seconds < 45
    started = pids_in(done.stdout.splitlines())
    assert len(started) == 3  # OpenBao, sandbox, daemon
    assert not [pid for pid in started if alive(pid)]
    assert sorted(p.name for p in logs.iterdir()) == ["daemon.log", "openbao.log", "sandbox.log"]
    assert "root-" not in done.stdout  # the tour prints no token


@pytest.mark.slow
def test_tour_against_an_existing_vault_leaves_no_key_behind(
    tmp_path: Path, dev_vault: DevVault, vault: Vault, kv_prefix: str
) -> None:
    """With --vault-addr (and VAULT_TOKEN), dev starts no server, says so in its first line,
    and cleans up after itself."""
    done, _ = run_tour(
        tmp_path,
        "--vault-addr",
        dev_vault.addr,
        VAULT_TOKEN=dev_vault.root_token.reveal(),
        BACKPACK_VAULT_KV_PREFIX=kv_prefix,
        BACKPACK_VAULT_GRANT_PREFIX=f"{kv_prefix}-broker",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    assert f"USING THE EXISTING VAULT AT {dev_vault.addr}" in first
    assert_every_step(done.stdout)
    assert f"Vault               {dev_vault.addr}" in done.stdout
    assert len(pids_in(done.stdout.splitlines())) == 2  # sandbox and daemon only
    assert dev_vault.root_token.reveal() not in done.stdout
    assert vault.list_refs() == []  # the demo key was deleted on the way out


@pytest.mark.slow
def test_tour_never_touches_an_exported_vault(tmp_path: Path) -> None:
    """An operator logged into the team's Vault (VAULT_ADDR and VAULT_TOKEN exported, a
    webhook configured) runs the tour: dev starts its own server and writes nothing there."""
    with DevVault() as team:
        root = {"X-Vault-Token": team.root_token.reveal()}
        before = httpx.request("LIST", f"{team.addr}/v1/sys/policies/acl", headers=root).json()
        done, _ = run_tour(
            tmp_path,
            VAULT_ADDR=team.addr,
            VAULT_TOKEN=team.root_token.reveal(),
            BACKPACK_VAULT_WEBHOOK_URL="http://127.0.0.1:9/team-alerts",
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert_every_step(done.stdout)
        assert "EXISTING VAULT" not in done.stdout
        assert len(pids_in(done.stdout.splitlines())) == 3  # its own OpenBao, sandbox, daemon
        assert team.addr not in done.stdout
        after = httpx.request("LIST", f"{team.addr}/v1/sys/policies/acl", headers=root).json()
        assert after["data"]["keys"] == before["data"]["keys"]
        keys = httpx.request("LIST", f"{team.addr}/v1/secret/metadata/backpack", headers=root)
        assert keys.status_code == 404  # nothing was stored under the default prefix


@pytest.mark.slow
def test_dev_is_ready_serves_the_demo_and_stops_every_child_on_sigterm(tmp_path: Path) -> None:
    lines: list[str] = []
    ready = threading.Event()
    with (tmp_path / "stderr").open("w") as stderr:
        proc = subprocess.Popen(
            dev_command(*ports()),
            env=clean_env(tmp_path),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl-C"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(45), "\n".join(lines) + (tmp_path / "stderr").read_text()
        text = "\n".join(lines)
        assert "backpack-vault dev is ready" in text
        started = pids_in(lines)
        assert len(started) == 3
        assert all(alive(pid) for pid in started)

        # The banner's commands work: the worker token reads the demo key at the daemon.
        token = re.search(r"export WORKER_TOKEN=(\S+)", text)
        daemon = re.search(r"^  daemon +pid \d+ +(http://\S+)$", text, re.MULTILINE)
        assert token is not None
        assert daemon is not None
        answer = httpx.get(
            f"{daemon.group(1)}/v1/keys/main/demo", headers={"X-Vault-Token": token.group(1)}
        )
        assert answer.status_code == 200
        assert answer.json()["status"] == "active"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        assert proc.stdout is not None
        proc.stdout.close()
    assert lines[-1] == "stopped"
    assert not [pid for pid in started if alive(pid)]
