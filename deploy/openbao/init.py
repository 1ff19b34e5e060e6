# ruff: noqa: INP001, T201 - a standalone script for the compose demo, not part of the package
"""Initialise and unseal the compose demo's OpenBao. DEMO ONLY: it keeps the unseal key.

On the first start it initialises the server with a single unseal key and writes the answer
(unseal key and root token) to ``$BOOTSTRAP_DIR/init.json`` and the root token alone to
``$BOOTSTRAP_DIR/root-token``, both mode 0600; on every start it unseals the server with that
key. A real deployment uses auto-unseal and never stores the key beside the data.

Standard library only, so it runs in the backpack-vault image (or any Python 3.11).
Environment: ``BAO_ADDR`` (default ``http://openbao:8200``), ``BOOTSTRAP_DIR`` (default
``/bootstrap``), ``BOOTSTRAP_UID`` (owner of the written files when run as root).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def call(addr: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - the address is the operator's
        f"{addr}/v1/{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.loads(response.read() or b"null")


def wait_for(addr: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            call(addr, "GET", "sys/seal-status")
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        else:
            return


def wait_active(addr: str, timeout: float) -> None:
    """Wait until sys/health answers 200: unsealed and active, ready for `vault setup`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            call(addr, "GET", "sys/health")
        except urllib.error.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        else:
            return


def write_private(path: Path, text: str, uid: int | None) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    if uid is not None and os.geteuid() == 0:
        os.chown(path, uid, uid)


def main() -> int:
    addr = os.environ.get("BAO_ADDR", "http://openbao:8200").rstrip("/")
    bootstrap = Path(os.environ.get("BOOTSTRAP_DIR", "/bootstrap"))
    uid = int(os.environ["BOOTSTRAP_UID"]) if os.environ.get("BOOTSTRAP_UID") else None
    answer_file = bootstrap / "init.json"
    wait_for(addr, float(os.environ.get("BAO_WAIT_S", "60")))

    if not call(addr, "GET", "sys/init")["initialized"]:
        answer = call(addr, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        bootstrap.mkdir(parents=True, exist_ok=True)
        write_private(answer_file, json.dumps(answer), None)
        write_private(bootstrap / "root-token", answer["root_token"], uid)
        print(json.dumps({"event": "openbao.initialised", "bootstrap": str(bootstrap)}))
    elif not answer_file.exists():
        print(
            json.dumps(
                {"event": "openbao.foreign", "hint": "initialised elsewhere: unseal by hand"}
            ),
            file=sys.stderr,
        )
        return 1

    if call(addr, "GET", "sys/seal-status")["sealed"]:
        key = json.loads(answer_file.read_text(encoding="utf-8"))["keys_base64"][0]
        call(addr, "PUT", "sys/unseal", {"key": key})
        print(json.dumps({"event": "openbao.unsealed"}))
    else:
        print(json.dumps({"event": "openbao.already_unsealed"}))
    wait_active(addr, float(os.environ.get("BAO_WAIT_S", "60")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
