"""One verdict table for the daemon's probe and for a bot's ordinary requests."""

from __future__ import annotations

import json

import httpx
import pytest

from backpack_vault.client.broker import is_rejection
from backpack_vault.core.verdicts import Verdict, classify, is_key_rejection, parse_answer

ANSWERS = [
    # (id, status, body, rejected for the probe, rejected for any request)
    ("accepted", 200, {"id": 1}, False, False),
    ("revoked key", 401, {"code": "UNAUTHORIZED", "message": "API key revoked"}, True, True),
    ("bad signature", 400, {"code": "INVALID_CLIENT_REQUEST", "message": "Invalid signature"},
     True, True),
    ("order invalid", 400, {"code": "INVALID_CLIENT_REQUEST", "message": "Quantity too low"},
     True, False),
    ("expired", 400, {"code": "INVALID_CLIENT_REQUEST", "message": "Request has expired"},
     False, False),
    ("plain 403", 403, "Forbidden", True, True),
    ("rate limited", 429, {"code": "TOO_MANY_REQUESTS", "message": "slow down"}, False, False),
    ("server error", 502, "Bad Gateway", False, False),
    ("unknown route", 404, {"code": "NOT_FOUND", "message": "no such route"}, False, False),
]  # fmt: skip


def _text(body: object) -> str:
    return body if isinstance(body, str) else json.dumps(body)


class TestOneTable:
    @pytest.mark.parametrize(
        ("status", "body", "probe", "other"),
        [a[1:] for a in ANSWERS],
        ids=[a[0] for a in ANSWERS],
    )
    def test_probe_and_ordinary_requests_read_the_same_rows(
        self, status: int, body: object, probe: bool, other: bool
    ) -> None:
        """A REJECTED row means the key was refused; outside the probe an
        INVALID_CLIENT_REQUEST counts only when it names the signature."""
        answer = parse_answer(status, _text(body))
        assert (classify(answer).verdict is Verdict.REJECTED) is probe
        assert is_key_rejection(answer) is other

    @pytest.mark.parametrize(
        ("status", "body", "other"),
        [(a[1], a[2], a[4]) for a in ANSWERS],
        ids=[a[0] for a in ANSWERS],
    )
    def test_the_client_asks_the_same_table(self, status: int, body: object, other: bool) -> None:
        """The worker client's rejection test is the table's, not a second copy of it."""
        response = httpx.Response(status, text=_text(body))
        assert is_rejection(response) is other


class TestParseAnswer:
    def test_a_json_error_keeps_code_and_message(self) -> None:
        """Backpack's JSON error shape gives the code and the message."""
        answer = parse_answer(401, '{"code": "UNAUTHORIZED", "message": "nope"}')
        assert (answer.code, answer.message, answer.is_object) == ("UNAUTHORIZED", "nope", True)

    def test_a_plain_text_error_is_the_message(self) -> None:
        """Older plain-text error bodies become the message."""
        answer = parse_answer(400, "  Request has expired \n")
        assert (answer.code, answer.message, answer.is_object) == ("", "Request has expired", False)

    def test_long_fields_are_cut_and_retry_after_is_read(self) -> None:
        """Code and message are bounded; a numeric Retry-After is kept, garbage is not."""
        answer = parse_answer(
            429, json.dumps({"code": "X" * 500, "message": "m" * 500}), retry_after="3"
        )
        assert (len(answer.code), len(answer.message), answer.retry_after_s) == (200, 200, 3.0)
        assert parse_answer(429, "", retry_after="soon").retry_after_s is None
