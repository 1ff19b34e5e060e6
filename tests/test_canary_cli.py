"""A canary secret goes through every CLI path; no output of any kind contains it."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backpack_vault.config import VaultSettings
from backpack_vault.core.keys import generate_pair


@pytest.fixture
def canary() -> tuple[str, str]:
    pair = generate_pair()
    return pair.api_key, pair.secret.reveal()


def forms(secret: str) -> list[str]:
    """The secret as text, and its raw seed in the encodings a leak could take."""
    seed = base64.b64decode(secret)
    return [secret, seed.hex(), base64.urlsafe_b64encode(seed).decode().rstrip("=")]


class TestCanary:
    def test_cli_flows_never_print_the_secret(
        self, vault_settings: VaultSettings, canary: tuple[str, str], tmp_path: Path
    ) -> None:
        """add, generate, list, show, rotate, standby, refusals and errors: no stdout, stderr
        or log holds it."""
        api_key, secret = canary
        env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ["HOME"],
            "VAULT_ADDR": vault_settings.addr,
            "VAULT_TOKEN": (vault_settings.token.reveal() if vault_settings.token else ""),
            "BACKPACK_VAULT_KV_PREFIX": vault_settings.kv_prefix,
            "BACKPACK_VAULT_LOG_LEVEL": "debug",
        }
        secret_file = tmp_path / "s"
        secret_file.write_text(secret)
        other = generate_pair()
        runs = [
            (["keys", "add", "main/canary", "--api-key", api_key], secret),
            (["keys", "add", "main/canary", "--api-key", api_key], secret),  # conflict
            (["keys", "add", "main/c2", "--api-key", other.api_key], secret),  # mismatch
            (
                ["keys", "add", "main/c3", "--api-key", api_key, "--secret-file", str(secret_file)],
                None,
            ),
            (["keys", "add", "main/c4", "--api-key", api_key], secret + secret),  # too long
            (["keys", "generate", "main/gen"], None),
            (["keys", "list"], None),
            (["keys", "list", "--json"], None),
            (["keys", "show", "main/canary"], None),
            (["keys", "show", "main/canary", "--json"], None),
            (["keys", "retire", "main/canary"], None),
            # rotation and standby keys: the canary as a standby, then a successor of c3
            (["keys", "generate", "main/c5"], None),
            (["keys", "add", "main/c5", "--standby", "--api-key", api_key], secret),
            (["keys", "show", "main/c5"], None),
            (["keys", "show", "main/c5", "--json"], None),
            (["keys", "rotate", "main/c3"], None),
            (["keys", "rotate", "main/c3", "--json"], None),  # conflict: one is pending
            (["keys", "show", "main/c3"], None),
            (["keys", "rotate", "main/c3", "--abort"], None),
            (["keys", "rotate", "main/c5", "--abort", "--json"], None),
        ]
        outputs = []
        for args, stdin in runs:
            done = subprocess.run(
                [sys.executable, "-m", "backpack_vault", *args],
                input=stdin or "",
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            outputs.append(f"{args} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
        joined = "\n".join(outputs)
        assert "stored main/canary" in joined  # the scenario really ran
        assert "already stored" in joined
        assert "does not belong" in joined
        assert "stored a standby for main/c5" in joined
        assert "already has a successor" in joined
        for form in forms(secret):
            assert form not in joined
        # argv of every run was visible to the host: the secret was never in it.
        assert all(secret not in " ".join(args) for args, _ in runs)
