# ruff: noqa: INP001, T201 - a standalone example worker, not part of the package
"""An example trading worker: logs in to Vault with its own identity, then asks the
backpack-vault daemon to sign its Backpack requests. It never sees another worker's keys,
and with the default worker policy it can only have read-only requests signed.

Environment:

- ``BROKER_URL`` (``http://backpack-vault:8280``), ``VAULT_ADDR``, ``BACKPACK_URL``
- ``DEMO_KEY`` (``demo/bot-a``), ``MODE`` (``sign`` or ``copy``), ``INTERVAL_S`` (``10``)
- ``VAULT_AUTH``: ``approle`` (``ROLE_ID_FILE``, ``SECRET_ID_FILE``) or ``kubernetes``
  (``VAULT_ROLE``, the pod's service account token), or ``token-file`` (``TOKEN_FILE``,
  kept fresh by Vault Agent, say).

The token is written to a private file that the client re-reads, so logging in again
(every ``RELOGIN_S``, default 1800) needs no new client.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Literal

import httpx

from backpack_vault.client.broker import BrokerClient

SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 - a path


def login(vault: str) -> str:
    """A Vault token for this worker, by the configured method."""
    method = os.environ.get("VAULT_AUTH", "approle")
    if method == "token-file":
        return Path(os.environ["TOKEN_FILE"]).read_text(encoding="utf-8").strip()
    if method == "kubernetes":
        mount = os.environ.get("VAULT_AUTH_MOUNT", "kubernetes")
        jwt = Path(os.environ.get("JWT_FILE", SA_TOKEN)).read_text(encoding="utf-8").strip()
        body: dict[str, Any] = {"role": os.environ["VAULT_ROLE"], "jwt": jwt}
    else:
        mount = os.environ.get("VAULT_AUTH_MOUNT", "approle")
        body = {
            "role_id": Path(os.environ["ROLE_ID_FILE"]).read_text(encoding="utf-8").strip(),
            "secret_id": Path(os.environ["SECRET_ID_FILE"]).read_text(encoding="utf-8").strip(),
        }
    request = urllib.request.Request(  # noqa: S310 - the address is the operator's
        f"{vault}/v1/auth/{mount}/login",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return str(json.loads(response.read())["auth"]["client_token"])


def main() -> int:
    vault = os.environ.get("VAULT_ADDR", "http://openbao:8200").rstrip("/")
    broker_url = os.environ.get("BROKER_URL", "http://backpack-vault:8280")
    backpack = os.environ.get("BACKPACK_URL", "https://api.backpack.exchange")
    key = os.environ.get("DEMO_KEY", "demo/bot-a")
    mode: Literal["copy", "sign"] = "copy" if os.environ.get("MODE") == "copy" else "sign"
    interval = float(os.environ.get("INTERVAL_S", "10"))
    relogin = float(os.environ.get("RELOGIN_S", "1800"))

    token_file = Path(tempfile.mkdtemp(prefix="worker-")) / "vault-token"
    token_file.touch(mode=0o600)
    token_file.write_text(login(vault), encoding="utf-8")
    logged_in = time.monotonic()
    with (
        BrokerClient(broker_url, vault_addr=vault, token_file=token_file) as broker,
        httpx.Client(base_url=backpack, auth=broker.auth(key, mode=mode), timeout=10) as client,
    ):
        while True:
            if time.monotonic() - logged_in > relogin:
                token_file.write_text(login(vault), encoding="utf-8")
                logged_in = time.monotonic()
            try:
                response = client.get("/api/v1/capital")
                print(json.dumps({"event": "worker.balances", "status": response.status_code}))
            except Exception as exc:  # noqa: BLE001 - a demo keeps going and says why
                print(json.dumps({"event": "worker.failed", "error": str(exc)}))
            time.sleep(interval)


if __name__ == "__main__":
    raise SystemExit(main())
