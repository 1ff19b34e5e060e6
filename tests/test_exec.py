"""``backpack-vault exec``: real processes under a real daemon and the session's OpenBao.

The bot is a stand-in script: it checks the pair it finds in its environment
(``parse_key_pair``: the secret derives the key), writes one JSON line per
start, records the signals it gets, and exits 42 on SIGTERM.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backpack_vault.config import BrokerSettings, CheckSettings, Settings, VaultSettings
from backpack_vault.core.keys import KeyPair, KeyRef, Status
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import ConfigError
from backpack_vault.exec import EXIT_KEY_GONE, parse_on_change, write_atomically
from backpack_vault.testing import now_iso, rotate_now, store_key, wait_until
from backpack_vault.vault.client import Vault

REF = KeyRef("main", "bot-a")
BOUND = 20.0


@pytest.fixture
def served(vault_settings: VaultSettings) -> Iterator[str]:
    settings = Settings(vault_settings, BrokerSettings(), CheckSettings())
    daemon = Daemon(settings, feed_interval_s=0.05, watch_heartbeat_s=0.2)
    with daemon, ServerThread(daemon.app) as server:
        yield server.url


@pytest.fixture
def run_exec(exec_runner: Any, served: str) -> Any:
    """``run_exec(*options, names=..., mode=...)``: exec of REF under the served daemon."""
    return functools.partial(exec_runner, served, REF)


def rotate(vault: Vault, ref: KeyRef) -> KeyPair:
    """A successor accepted and switched to, as the daemon does: ``rotated`` on the feed."""
    return rotate_now(vault, ref)


class TestTheChild:
    def test_the_child_gets_a_working_pair_and_its_exit_code_is_execs(
        self, vault: Vault, run_exec: Any
    ) -> None:
        """The pair derives; the worker's token stays out; exit 3 comes back as 3."""
        pair = store_key(vault, REF)
        bot = run_exec(mode="exit3")
        code, err = bot.wait()
        assert code == 3, err
        (start,) = bot.starts()
        assert start["key"] == pair.api_key
        assert start["vault_token"] is False
        assert pair.secret.reveal() not in err

    @pytest.mark.parametrize(
        ("options", "names"),
        [
            (
                ("--preset", "freqtrade"),
                ("FREQTRADE__EXCHANGE__KEY", "FREQTRADE__EXCHANGE__SECRET"),
            ),
            (("--preset", "ccxt"), ("CCXT_APIKEY", "CCXT_SECRET")),
            (("--key-env", "K", "--secret-env", "S"), ("K", "S")),
        ],
        ids=["freqtrade", "ccxt", "renamed"],
    )
    def test_presets_and_names(
        self, vault: Vault, run_exec: Any, options: tuple[str, ...], names: tuple[str, str]
    ) -> None:
        pair = store_key(vault, REF)
        bot = run_exec(*options, names=names, mode="exit0")
        code, err = bot.wait()
        assert code == 0, err
        assert bot.starts()[0]["key"] == pair.api_key

    def test_signals_are_forwarded(self, vault: Vault, run_exec: Any) -> None:
        """SIGHUP reaches the child; SIGTERM too, and the child's 42 is exec's."""
        store_key(vault, REF)
        bot = run_exec()
        wait_until(lambda: bool(bot.starts()), BOUND, "the child started")
        bot.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "HUP" in bot.signals(), BOUND, "HUP forwarded")
        bot.process.send_signal(signal.SIGTERM)
        code, err = bot.wait()
        assert code == 42, err
        assert bot.signals() == ["HUP", "TERM"]

    def test_an_unknown_key_is_exit_5_and_no_child(self, run_exec: Any) -> None:
        bot = run_exec()
        code, err = bot.wait()
        assert code == 5, err
        assert bot.starts() == []


class TestChanges:
    def test_on_retire_the_child_is_stopped(self, vault: Vault, run_exec: Any) -> None:
        store_key(vault, REF)
        bot = run_exec()
        wait_until(lambda: bool(bot.starts()), BOUND, "the child started")
        vault.set_status(REF, Status.RETIRED, now=now_iso())
        code, err = bot.wait()
        assert code == EXIT_KEY_GONE, err
        assert bot.signals() == ["TERM"]

    def test_on_rotation_the_child_restarts_with_the_successor(
        self, vault: Vault, run_exec: Any
    ) -> None:
        first = store_key(vault, REF)
        bot = run_exec()
        wait_until(lambda: bool(bot.starts()), BOUND, "the child started")
        wait_until(lambda: bot.starts()[0]["key"] == first.api_key, BOUND)
        second = rotate(vault, REF)
        wait_until(lambda: len(bot.starts()) == 2, BOUND, "the restart")
        assert [s["key"] for s in bot.starts()] == [first.api_key, second.api_key]
        assert bot.signals() == ["TERM"]
        bot.process.send_signal(signal.SIGTERM)
        assert bot.wait()[0] == 42

    def test_on_change_signal_sends_the_signal(self, vault: Vault, run_exec: Any) -> None:
        store_key(vault, REF)
        bot = run_exec("--on-change", "signal:HUP")
        wait_until(lambda: bool(bot.starts()), BOUND, "the child started")
        rotate(vault, REF)
        wait_until(lambda: "HUP" in bot.signals(), BOUND, "HUP on rotation")
        assert len(bot.starts()) == 1
        bot.process.send_signal(signal.SIGTERM)
        assert bot.wait()[0] == 42


class TestFileSink:
    def test_the_file_is_0600_and_removed_on_revoke(
        self, vault: Vault, run_exec: Any, tmp_path: Path
    ) -> None:
        pair = store_key(vault, REF)
        sink = tmp_path / "key.json"
        bot = run_exec("--file", str(sink), names=("-", "-"))
        wait_until(lambda: bool(bot.starts()), BOUND, "the child started")
        assert stat.S_IMODE(sink.stat().st_mode) == 0o600
        assert json.loads(sink.read_text())["api_key"] == pair.api_key
        assert bot.starts()[0]["key"] == pair.api_key
        vault.set_status(REF, Status.REVOKED, now=now_iso(), reason="leaked")
        code, err = bot.wait()
        assert code == EXIT_KEY_GONE, err
        assert not sink.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".key.json")] == []

    def test_the_env_format(self, vault: Vault, run_exec: Any, tmp_path: Path) -> None:
        store_key(vault, REF)
        sink = tmp_path / "key.env"
        bot = run_exec("--file", str(sink), "--format", "env", names=("-", "-"), mode="exit0")
        # the child reads JSON: with env format it fails to parse, and exec says so by its code
        code, _ = bot.wait()
        assert code != 0
        assert not sink.exists()  # removed when exec ends

    def test_a_reader_never_sees_a_partial_file(self, tmp_path: Path) -> None:
        """Rewrites race a reader: every read is one whole version."""
        sink = tmp_path / "key.json"
        write_atomically(sink, json.dumps({"n": 0, "pad": "x" * 100_000}))
        done = threading.Event()
        bad: list[str] = []

        def read() -> None:
            while not done.is_set():
                text = sink.read_text()
                try:
                    json.loads(text)
                except ValueError:
                    bad.append(text[:20])

        reader = threading.Thread(target=read)
        reader.start()
        for n in range(1, 200):
            write_atomically(sink, json.dumps({"n": n, "pad": "x" * 100_000}))
        done.set()
        reader.join(BOUND)
        assert bad == []
        assert json.loads(sink.read_text())["n"] == 199
        assert sorted(p.name for p in tmp_path.iterdir()) == ["key.json"]


class TestOnChange:
    def test_defaults(self) -> None:
        assert parse_on_change([]) == {
            "rotated": "restart",
            "refresh": "restart",
            "retired": "stop",
            "revoked": "stop",
        }
        assert parse_on_change([], file_sink=True)["refresh"] == "ignore"

    def test_event_and_action(self) -> None:
        actions = parse_on_change(["signal:HUP", "revoked=restart"])
        assert (actions["rotated"], actions["refresh"], actions["revoked"]) == (
            "signal:HUP",
            "signal:HUP",
            "restart",
        )

    @pytest.mark.parametrize("value", ["explode", "signal:NOPE", "moved=stop"])
    def test_unknown_values_are_config_errors(self, value: str) -> None:
        with pytest.raises(ConfigError):
            parse_on_change([value])


ROOT = Path(__file__).resolve().parents[1]

FREQTRADE = r"""
import os, sys
from backpack_vault.config import Secret
from backpack_vault.core.keys import parse_key_pair

assert sys.argv[1:] == ["trade", "--config", "config.json"], sys.argv
parse_key_pair(
    os.environ["FREQTRADE__EXCHANGE__KEY"], Secret(os.environ["FREQTRADE__EXCHANGE__SECRET"])
)
print(os.environ["FREQTRADE__EXCHANGE__KEY"])
"""


class TestExamples:
    def test_the_freqtrade_script_hands_freqtrade_its_pair(
        self, vault: Vault, served: str, dev_vault: DevVault, tmp_path: Path
    ) -> None:
        """examples/freqtrade_exec.sh with a stand-in freqtrade that checks its environment."""
        pair = store_key(vault, KeyRef("scalper", "freqtrade"))
        stand_in = tmp_path / "freqtrade"
        stand_in.write_text(f"#!{sys.executable}\n{FREQTRADE}")
        stand_in.chmod(0o700)
        environ = {
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "HOME": os.environ["HOME"],
            "BACKPACK_VAULT_DAEMON_URL": served,
            "VAULT_ADDR": dev_vault.addr,
            "BACKPACK_VAULT_WORKER_AUTH": "token",
            "VAULT_TOKEN": dev_vault.root_token.reveal(),
            "FREQTRADE": str(stand_in),
        }
        done = subprocess.run(
            ["/bin/sh", str(ROOT / "examples" / "freqtrade_exec.sh")],
            env=environ,
            capture_output=True,
            text=True,
            timeout=BOUND,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == pair.api_key

    def test_the_kubernetes_worker_validates_and_touches_no_namespace(self) -> None:
        import kubernetes_validate  # noqa: PLC0415 - a test-only dependency
        import yaml  # noqa: PLC0415

        text = (ROOT / "examples" / "kubernetes-worker.yaml").read_text()
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        for doc in docs:
            kubernetes_validate.validate(
                doc, kubernetes_validate.utils.latest_version(), strict=True
            )
            assert "namespace" not in doc["metadata"]
        assert sorted(doc["kind"] for doc in docs) == ["Deployment", "ServiceAccount"]
        (pod,) = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env["BACKPACK_VAULT_WORKER_AUTH"] == "kubernetes"
        assert pod["containers"][0]["command"][:2] == ["backpack-vault", "exec"]
