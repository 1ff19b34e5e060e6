"""The demo on top of the embedded default: store a key, activate it, place orders with a
copy and with signatures, the banner of what to try, and ``--tour``'s revocation scenario."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from contextlib import suppress

import httpx

from backpack_vault.config import Secret, VaultSettings
from backpack_vault.core.keys import KeyRecord, KeyRef, Origin, Status, generate_pair
from backpack_vault.dev.env import (
    DEMO_KEY,
    DEMO_ORDER,
    WORKER_POLICY,
    DevEnv,
    _cli_command,
    _now_iso,
)
from backpack_vault.errors import DevError, Interrupted, KeyNotUsable, ServiceError, UnknownKey

__all__ = ["Demo"]

CUTOFF_S = 1.0  # the daemon refuses a revoked key within this, on every replica


class Demo:
    """The numbered steps, run against a started :class:`DevEnv`."""

    def __init__(self, env: DevEnv) -> None:
        self.env = env

    def step(self, number: int, action: Callable[[], str]) -> None:
        """Run one numbered step; print its line, or fail with the step's number."""
        try:
            line = action()
        except Interrupted:
            raise
        except ServiceError as exc:
            raise DevError(f"step {number} failed: {exc.message}") from None
        except httpx.HTTPError as exc:
            raise DevError(f"step {number} failed: {type(exc).__name__}: {exc}") from None
        self.env.say(f"{number}. {line}")

    def store_key(self) -> str:
        if self.env.dev_vault is None:  # a real Vault may hold an older demo key: pick a free name
            for n in range(2, 100):
                try:
                    self.env.vault.read_record(self.env.key)
                except UnknownKey:
                    break
                self.env.key = KeyRef(DEMO_KEY.subaccount, f"{DEMO_KEY.name}-{n}")
        pair = generate_pair()
        record = KeyRecord.new(
            self.env.key,
            pair.api_key,
            origin=Origin.GENERATED,
            now=_now_iso(),
            read_only=False,
            label="demo key of backpack-vault dev",
            exchange=self.env.sandbox_url,  # it belongs to the sandbox, never to Backpack
        )
        stored = self.env.vault.create_key(record, pair.secret)
        if self.env.dev_vault is None:
            self.env.stack.callback(self._delete_quietly, self.env.key)
        self.env.api_key = pair.api_key
        return f"stored {self.env.key} in Vault ({stored.status})"

    def _delete_quietly(self, ref: KeyRef) -> None:
        with suppress(ServiceError):
            self.env.vault.delete_key(ref)

    def activate(self) -> str:
        started = time.monotonic()
        self.env.sandbox.register(self.env.api_key)
        # The next scheduled check may be an interval away; a report asks the daemon to check
        # the key now (the same call a worker makes when Backpack refuses a request).
        self.env.broker.report(
            self.env.key, "backpack-vault dev: public key registered at the sandbox"
        )
        timeout = max(30.0, 3 * self.env.interval)
        if not self.env.poll(lambda: self._status() is Status.ACTIVE, timeout=timeout, every=0.1):
            raise DevError(
                f"{self.env.key} is still {self._status()} {timeout:g} s after its public key was "
                f"registered: the daemon's checks did not see the sandbox accept it (is another "
                f"daemon holding the checks lease?); see {self.env.logs / 'daemon.log'}"
            )
        elapsed = time.monotonic() - started
        return (
            "Backpack accepted the key: active (registered at the sandbox; "
            f"the daemon's check saw it in {elapsed:.1f} s)"
        )

    def _status(self) -> Status:
        return self.env.vault.read_record(self.env.key).status

    def _order(self, client: httpx.Client) -> str:
        response = client.post("/api/v1/order", json=DEMO_ORDER)
        if response.status_code != 200:  # noqa: PLR2004
            raise DevError(f"the sandbox refused the order: {response.status_code} {response.text}")
        return str(response.json()["id"])

    def order_with_copy(self) -> str:
        order = self._order(self.env.copy_client)
        return f"worker got a wrapped copy and placed order #{order} ({self._order_text()})"

    def order_with_signature(self) -> str:
        order = self._order(self.env.sign_client)
        return f"worker had the daemon sign and placed order #{order} ({self._order_text()})"

    @staticmethod
    def _order_text() -> str:
        o = DEMO_ORDER
        return f"{o['orderType']} {o['side']} {o['quantity']} {o['symbol']} @ {o['price']}"

    def demo(self) -> None:
        self.step(1, self.store_key)
        self.step(2, self.activate)
        self.step(3, self.order_with_copy)
        self.step(4, self.order_with_signature)

    # -- the tour, steps 5-7 ----------------------------------------------------------

    def tour(self) -> None:
        unclaimed: list[Secret] = []
        revoked_at: list[float] = []

        def revoke() -> str:
            unclaimed.append(self._unclaimed_copy())
            self.env.sandbox.revoke(self.env.api_key)
            revoked_at.append(time.monotonic())
            return (
                "revoked the key at the sandbox (as in the web UI); "
                "a copy fetched just before is still unclaimed"
            )

        def detect() -> str:
            timeout = max(30.0, 4 * self.env.interval + 10)
            if not self.env.poll(lambda: self._status() is Status.REVOKED, timeout, every=0.1):
                raise DevError(f"{self.env.key} is still {self._status()} after {timeout:g} s")
            return f"daemon detected it: revoked after {time.monotonic() - revoked_at[0]:.1f} s"

        self.step(5, revoke)
        self.step(6, detect)
        self.step(7, lambda: self.cutoff(unclaimed[0]))

    def _unclaimed_copy(self) -> Secret:
        """A wrapping token from the daemon, deliberately not unwrapped."""
        ref = self.env.key
        response = self.env.http.post(
            f"{self.env.daemon_url}/v1/keys/{ref.subaccount}/{ref.name}/copy",
            headers={"X-Vault-Token": self.env.worker_token.reveal()},
        )
        if response.status_code != 200:  # noqa: PLR2004
            raise DevError(f"the daemon answered {response.status_code} to a copy request")
        return Secret(str(response.json()["wrap_token"]))

    def cutoff(self, wrap_token: Secret) -> str:
        refusals: list[str] = []
        for what, attempt in (
            ("copy", lambda: self.env.broker.copy(self.env.key)),
            ("sign", lambda: self._order(self.env.sign_client)),
        ):

            def refused(what: str = what, attempt: Callable[[], object] = attempt) -> bool:
                try:
                    attempt()
                except KeyNotUsable as exc:
                    refusals.append(f"{what} refused ({exc.http_status} {exc.code})")
                    return True
                return False

            # The status is in Vault a moment before the daemon's own cascade has run.
            if not self.env.poll(refused, timeout=CUTOFF_S, every=0.05):
                raise DevError(f"the daemon still allowed a {what} of a revoked key")
        vault = self.env.vault_settings.addr

        def gone() -> bool:  # the daemon revokes unclaimed copies as it marks the key revoked
            answer = self.env.http.post(
                f"{vault}/v1/sys/wrapping/lookup", json={"token": wrap_token.reveal()}
            )
            return answer.status_code != 200  # noqa: PLR2004

        self.env.poll(gone, timeout=10, every=0.1)
        answer = self.env.http.post(
            f"{vault}/v1/sys/wrapping/unwrap", headers={"X-Vault-Token": wrap_token.reveal()}
        )
        if answer.status_code == 200:  # noqa: PLR2004
            raise DevError("an unclaimed copy of the revoked key still unwrapped")
        return (
            f"cutoff: {', '.join(refusals)}, an unclaimed wrapping token no longer unwraps "
            f"({answer.status_code})"
        )

    # -- dev: what runs, what to try ----------------------------------------------------

    def banner(self, seconds: float) -> None:
        cli = _cli_command()
        vault = self.env.vault_settings
        exports = {"VAULT_ADDR": vault.addr}
        if self.env.dev_vault is not None:
            exports["VAULT_TOKEN"] = self.env.dev_vault.root_token.reveal()
        defaults = VaultSettings()
        for name, env in (
            ("kv_mount", "BACKPACK_VAULT_KV_MOUNT"),
            ("kv_prefix", "BACKPACK_VAULT_KV_PREFIX"),
            ("grant_prefix", "BACKPACK_VAULT_GRANT_PREFIX"),
        ):
            if getattr(vault, name) != getattr(defaults, name):
                exports[env] = str(getattr(vault, name))
        export = " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items())
        keys = f"{self.env.daemon_url}/v1/keys/{self.env.key.subaccount}/{self.env.key.name}"
        sign_body = shlex.quote('{"instruction": "balanceQuery", "params": {}}')
        revoke_body = shlex.quote(f'{{"api_key": "{self.env.api_key}"}}')
        json_type = "-H 'Content-Type: application/json'"
        self.env.say()
        self.env.say(
            f"backpack-vault dev is ready ({seconds:.1f} s). Running until Ctrl-C or SIGTERM:"
        )
        if self.env.dev_vault is not None:
            self.env.service("OpenBao dev server", f"pid {self.env.dev_vault.pid}  {vault.addr}")
        for child in self.env.children:
            url = self.env.sandbox_url if child.name.startswith("sandbox") else self.env.daemon_url
            self.env.service(child.name, f"pid {child.pid}  {url}")
        self.env.service("logs", str(self.env.logs))
        self.env.say()
        self.env.say("Dev-only secrets (a throwaway setup: never print real tokens like this):")
        if self.env.dev_vault is not None:
            self.env.service("root token", self.env.dev_vault.root_token.reveal())
        self.env.service(
            "worker token",
            f"{self.env.worker_token.reveal()}  "
            f"(policy {WORKER_POLICY}: copy and sign of {self.env.key})",
        )
        self.env.say()
        self.env.say("Try, in another terminal:")
        self.env.say(f"  export {export}")
        if self.env.dev_vault is None:
            self.env.say("  # and your own VAULT_TOKEN")
        self.env.say(f"  export WORKER_TOKEN={shlex.quote(self.env.worker_token.reveal())}")
        self.env.say(f"  {cli} keys list")
        self.env.say(f'  curl -s -H "X-Vault-Token: $WORKER_TOKEN" {keys}')
        self.env.say(
            f'  curl -s -H "X-Vault-Token: $WORKER_TOKEN" {json_type} -d {sign_body} {keys}/sign'
        )
        self.env.say(
            "  # revoke the key at the sandbox, as in the Backpack web UI; "
            f"within ~{2 * self.env.interval:g} s the daemon marks it revoked:"
        )
        self.env.say(
            f"  curl -s {json_type} -d {revoke_body} {self.env.sandbox_url}/_sandbox/keys/revoke"
        )
        self.env.say(f"  watch -n 1 {cli} keys list")
        self.env.say()
        self.env.say("Press Ctrl-C to stop everything.")

    def wait(self) -> None:
        """Until SIGINT/SIGTERM; a child that dies on its own ends the wait with an error."""
        while not self.env.stop.wait(0.5):
            for child in self.env.children:
                # A terminal's Ctrl-C reaches the children too: give our own flag a moment.
                if child.exit_code() is not None and not self.env.stop.wait(0.5):
                    child.require_running()
