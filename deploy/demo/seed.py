# ruff: noqa: INP001, T201 - a standalone script for the compose demo, not part of the package
"""Seed the compose demo: one key in Vault and the sandbox, AppRole credentials on a volume.

DEMO ONLY: it uses the root token that deploy/openbao/init.py kept. Steps, each safe to
repeat:

1. Store key ``$DEMO_KEY`` (default ``demo/bot-a``): a fresh Ed25519 pair, stored with
   ``backpack-vault keys add`` (the secret goes through stdin, never argv). An existing key
   is kept.
2. Register its public key with the sandbox exchange (the sandbox forgets keys when it
   restarts, so this runs every time), as an operator would in the Backpack web UI.
3. Write AppRole credentials that ``backpack-vault vault setup --daemon-approle --approle
   demo`` made roles for: ``$CREDS_DIR/daemon/config.toml`` (the daemon's config file) with
   its secret-id file, and ``$CREDS_DIR/worker/{role-id,secret-id}``. Existing ones are kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from backpack_vault.core.keys import generate_pair


def call(url: str, method: str, token: str = "", body: object = None) -> Any:
    request = urllib.request.Request(  # noqa: S310 - addresses come from the compose file
        url,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Content-Type": "application/json"} | ({"X-Vault-Token": token} if token else {}),
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.loads(response.read() or b"null")


def write_private(path: Path, text: str, uid: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    if uid is not None and os.geteuid() == 0:
        os.chown(path.parent, uid, uid)
        os.chown(path, uid, uid)


def store_key(key: str, env: dict[str, str]) -> str:
    """The key's public API key: stored now, or read back when it already exists."""
    shown = subprocess.run(  # noqa: S603
        ["backpack-vault", "keys", "show", key, "--json"],  # noqa: S607
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if shown.returncode == 0:
        print(json.dumps({"event": "demo.key_kept", "key": key}))
        return str(json.loads(shown.stdout)["api_key"])
    pair = generate_pair()
    subprocess.run(  # noqa: S603
        ["backpack-vault", "keys", "add", key, "--api-key", pair.api_key, "--label", "demo"],  # noqa: S607
        env=env,
        input=pair.secret.reveal() + "\n",
        text=True,
        check=True,
    )
    print(json.dumps({"event": "demo.key_stored", "key": key}))
    return pair.api_key


def approle(vault: str, token: str, role: str, mount: str = "approle") -> tuple[str, str]:
    base = f"{vault}/v1/auth/{mount}/role/{role}"
    role_id = call(f"{base}/role-id", "GET", token)["data"]["role_id"]
    secret_id = call(f"{base}/secret-id", "POST", token, {})["data"]["secret_id"]
    return str(role_id), str(secret_id)


def main() -> int:
    vault = os.environ.get("VAULT_ADDR", "http://openbao:8200").rstrip("/")
    sandbox = os.environ.get("SANDBOX_URL", "http://sandbox:8300").rstrip("/")
    key = os.environ.get("DEMO_KEY", "demo/bot-a")
    creds = Path(os.environ.get("CREDS_DIR", "/creds"))
    uid = int(os.environ["CREDS_UID"]) if os.environ.get("CREDS_UID") else None
    token_file = os.environ.get("BACKPACK_VAULT_TOKEN_FILE", "/bootstrap/root-token")
    token = Path(token_file).read_text(encoding="utf-8").strip()
    env = dict(os.environ) | {"VAULT_ADDR": vault, "VAULT_TOKEN": token}
    env.pop("BACKPACK_VAULT_AUTH", None)  # the CLI uses VAULT_TOKEN here

    api_key = store_key(key, env)
    call(f"{sandbox}/_sandbox/keys", "POST", body={"api_key": api_key})  # 200 when known
    print(json.dumps({"event": "demo.key_registered", "key": key}))

    daemon_config = creds / "daemon" / "config.toml"
    if not daemon_config.exists():
        role_id, secret_id = approle(vault, token, "backpack-vault-daemon")
        write_private(creds / "daemon" / "secret-id", secret_id, uid)
        config = (
            'auth = "approle"\n'
            f'approle_role_id = "{role_id}"\n'
            f'approle_secret_id_file = "{creds / "daemon" / "secret-id"}"\n'
        )
        write_private(daemon_config, config, uid)
    worker_role = f"backpack-worker-{key.partition('/')[0]}"
    if not (creds / "worker" / "secret-id").exists():
        role_id, secret_id = approle(vault, token, worker_role)
        write_private(creds / "worker" / "role-id", role_id, uid)
        write_private(creds / "worker" / "secret-id", secret_id, uid)
    print(json.dumps({"event": "demo.credentials_written", "dir": str(creds)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
