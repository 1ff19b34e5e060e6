"""One key as a third-party client uses it: the daemon signs, or a kept copy does.

``sign`` mode asks the daemon for the four headers of each request (the secret
never reaches the bot); ``copy`` mode keeps a copy (the client's
:class:`~backpack_vault.client.copies.CopyKeeper`, as ``BrokerAuth`` does). Either
way an answer in which Backpack refuses the key itself is reported to the daemon,
which checks the key at once: at most once per ``report_every_s``, and in copy
mode the copy is dropped then, so the next request fetches a new one (which the
daemon refuses as KeyRevoked once it has confirmed). Errors are ours
(:mod:`backpack_vault.errors`); each integration maps them to its client's own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Final, Literal

from backpack_vault.backpack.signing import Params
from backpack_vault.client.broker import BrokerClient, Copy
from backpack_vault.client.copies import CopyKeeper
from backpack_vault.client.protocol import REPORT_EVERY_S, Reports
from backpack_vault.core.keys import KeyRef
from backpack_vault.core.verdicts import is_key_rejection, parse_answer
from backpack_vault.errors import ConfigError, ServiceError

__all__ = ["REPORT_EVERY_S", "KeyHandle", "Mode"]

Mode = Literal["sign", "copy"]
_REASON_CHARS: Final = 200


class KeyHandle:
    """Signatures for ``key`` through ``broker``, in ``mode``; thread-safe."""

    def __init__(
        self,
        broker: BrokerClient,
        key: str | KeyRef,
        mode: Mode = "sign",
        *,
        watch: bool = True,
        clock: Callable[[], float] = time.time,
        report_every_s: float = REPORT_EVERY_S,
    ) -> None:
        """``watch=False``: copy mode does not watch the key (it learns only by asking)."""
        if mode not in ("sign", "copy"):
            raise ConfigError(f"mode must be 'sign' or 'copy', not {mode!r}")
        self.broker = broker
        self.key = key if isinstance(key, KeyRef) else KeyRef.parse(key)
        self.mode: Mode = mode
        self.copies = (
            CopyKeeper(broker, self.key, watch=watch, clock=clock) if mode == "copy" else None
        )
        self._reports = Reports(report_every_s, clock)

    def __repr__(self) -> str:
        return f"KeyHandle({str(self.key)!r}, mode={self.mode!r})"

    def api_key(self) -> str:
        """The key's public API key, as the daemon stores it (no secret involved)."""
        return str(self.broker.info(self.key)["api_key"])

    def headers(
        self, instruction: str, params: Params | None, timestamp_ms: int, window_ms: int
    ) -> dict[str, str]:
        """``X-API-Key``, ``X-Signature``, ``X-Timestamp`` and ``X-Window`` for one request."""
        if self.copies is None:
            return self.broker.sign(
                self.key, instruction, params, timestamp=timestamp_ms, window=window_ms
            )
        return self.copies.current().headers(instruction, params, timestamp_ms, window_ms)

    def copy(self) -> Copy:
        """Copy mode: the copy to sign with (fetched or refreshed when due)."""
        if self.copies is None:
            raise ConfigError("a sign-mode key holds no copy")
        return self.copies.current()

    def copy_due(self) -> bool:
        """Whether the next request asks the daemon for a copy first."""
        return self.copies is not None and self.copies.due()

    def rejection(self, status: int, text: str) -> str | None:
        """What Backpack's answer to a signed request says, if it refused the key itself
        (the daemon's verdict table; not a clock, order or rate-limit problem)."""
        answer = parse_answer(status, text)
        if not is_key_rejection(answer):
            return None
        return f"Backpack answered {answer.describe()}"[:_REASON_CHARS]

    def rejected(self) -> bool:
        """Backpack refused the key: True when it is time to report it (then, in copy
        mode, the copy is dropped too); False when it was reported moments ago."""
        if not self._reports.due():
            return False
        if self.copies is not None:
            self.copies.drop()
        return True

    def report(self, reason: str) -> None:
        """Tell the daemon; never raises (the daemon also checks the key on schedule)."""
        with contextlib.suppress(ServiceError):
            self.broker.report(self.key, reason)

    def close(self) -> None:
        """Stop watching the key; the broker client stays open (the caller owns it)."""
        if self.copies is not None:
            self.copies.close()
