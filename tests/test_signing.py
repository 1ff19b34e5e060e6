"""Signing reproduces Backpack's known-answer vectors and refuses what it cannot sign exactly."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backpack_vault import sign_request
from backpack_vault.backpack.instructions import ENDPOINTS, is_state_changing, lookup
from backpack_vault.backpack.signing import Signer, signing_string, verify
from backpack_vault.config import Secret
from backpack_vault.errors import InvalidInput

DATA = Path(__file__).parent / "data"
VECTORS = json.loads((DATA / "vectors.json").read_text())
KEY = VECTORS["key"]


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["id"])
class TestVectors:
    def test_signing_string_matches(self, vector: dict[str, Any]) -> None:
        """The signing string is byte-for-byte the published one."""
        text = signing_string(
            vector["instruction"], vector["params"], vector["timestamp"], vector["window"]
        )
        assert text == vector["signing_string"]

    def test_headers_match(self, vector: dict[str, Any]) -> None:
        """sign_request returns the four headers with the published signature."""
        headers = sign_request(
            vector["api_key"],
            vector["api_secret"],
            vector["instruction"],
            vector["params"],
            vector["timestamp"],
            vector["window"],
        )
        assert headers == {
            "X-API-Key": vector["api_key"],
            "X-Signature": vector["signature"],
            "X-Timestamp": str(vector["timestamp"]),
            "X-Window": str(vector["window"]),
        }

    def test_vector_route_maps_to_its_instruction(self, vector: dict[str, Any]) -> None:
        """The shipped table maps each vector's method and path to its instruction."""
        if vector["instruction"] == "subscribe":
            pytest.skip("WebSocket subscription has no REST route")
        assert lookup(vector["method"], vector["path"]).instruction == vector["instruction"]


class TestSigningString:
    @pytest.mark.parametrize(
        ("value", "text"),
        [(True, "true"), (False, "false"), (0, "0"), (1001, "1001"), ("180.50", "180.50")],
        ids=["true", "false", "zero", "int", "decimal-string"],
    )
    def test_values_are_signed_as_sent(self, value: object, text: str) -> None:
        """Booleans sign lowercase, integers as digits, decimal strings exactly as given."""
        assert signing_string("orderExecute", {"v": value}, 1, 5000) == (
            f"instruction=orderExecute&v={text}&timestamp=1&window=5000"
        )

    @pytest.mark.parametrize(
        "value",
        [1.5, None, {"a": 1}, [1, 2], ""],
        ids=["float", "null", "object", "array", "empty"],
    )
    def test_unstable_or_undocumented_values_are_refused(self, value: object) -> None:
        """Floats, null, nested values and empty strings raise instead of signing a guess."""
        with pytest.raises(InvalidInput, match="parameter 'v'"):
            signing_string("orderExecute", {"v": value}, 1, 5000)

    @pytest.mark.parametrize("window", [0, -1, 60001, 10**9], ids=["0", "neg", "60001", "huge"])
    def test_window_outside_range_is_refused(self, window: int) -> None:
        """The window must be 1..60000 ms."""
        with pytest.raises(InvalidInput, match="window"):
            signing_string("accountQuery", {}, 1, window)

    @pytest.mark.parametrize("window", [1, 5000, 60000], ids=["1", "default", "max"])
    def test_window_inside_range_is_signed(self, window: int) -> None:
        """Every window from 1 to 60000 ms is accepted and signed."""
        assert signing_string("accountQuery", {}, 1, window).endswith(f"&window={window}")

    def test_empty_batch_is_refused(self) -> None:
        """A batch holds at least one order."""
        with pytest.raises(InvalidInput, match="batch"):
            signing_string("orderExecute", [], 1, 5000)

    @pytest.mark.parametrize(
        "instruction",
        ["", "order Execute", "a&b=c", "ordér"],
        ids=["empty", "space", "amp", "non-ascii"],
    )
    def test_bad_instruction_names_are_refused(self, instruction: str) -> None:
        """Instruction names are ASCII letters and digits only."""
        with pytest.raises(InvalidInput, match="instruction"):
            signing_string(instruction, {}, 1, 5000)

    @given(
        params=st.dictionaries(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ", min_size=1, max_size=8),
            st.one_of(
                st.booleans(),
                st.integers(min_value=0, max_value=10**12),
                st.text(alphabet="0123456789._-ABCZabcz", min_size=1, max_size=12),
            ),
            max_size=8,
        )
    )
    def test_pairs_are_sorted_whatever_the_input_order(self, params: dict[str, object]) -> None:
        """The pairs come out sorted by key, whatever order the caller built them in."""
        forward = signing_string("orderExecute", params, 1, 5000)
        backward = signing_string("orderExecute", dict(reversed(list(params.items()))), 1, 5000)
        assert forward == backward
        keys = [pair.split("=", 1)[0] for pair in forward.split("&")[1:-2]]
        assert keys == sorted(keys)


class TestSigner:
    def test_signature_verifies_with_the_public_key(self) -> None:
        """A signature from Signer verifies with nacl and with verify()."""
        signer = Signer(KEY["api_key"], Secret(KEY["api_secret"]))
        headers = signer.headers("balanceQuery", {}, 1700000000000)
        message = "instruction=balanceQuery&timestamp=1700000000000&window=5000"
        assert verify(KEY["api_key"], message, headers["X-Signature"])
        verify_key = nacl.signing.VerifyKey(base64.b64decode(KEY["api_key"]))
        verify_key.verify(message.encode(), base64.b64decode(headers["X-Signature"]))

    def test_a_secret_of_another_key_is_refused(self) -> None:
        """The secret must derive the API key it is used with."""
        other = base64.b64encode(bytes(nacl.signing.SigningKey.generate())).decode()
        with pytest.raises(InvalidInput, match="does not belong"):
            Signer(KEY["api_key"], other)

    def test_repr_never_shows_the_secret(self) -> None:
        """repr(Signer) names the API key only."""
        signer = Signer(KEY["api_key"], KEY["api_secret"])
        assert KEY["api_secret"] not in repr(signer)
        assert KEY["api_key"] in repr(signer)

    def test_verify_rejects_a_tampered_message(self) -> None:
        """verify() is False for a message other than the one signed."""
        signer = Signer(KEY["api_key"], KEY["api_secret"])
        signature = signer.sign("instruction=balanceQuery&timestamp=1&window=5000")
        assert not verify(
            KEY["api_key"], "instruction=balanceQuery&timestamp=2&window=5000", signature
        )


class TestInstructionTable:
    def test_table_matches_the_spec_file(self) -> None:
        """The shipped table holds exactly the spec's operations and flags."""
        spec = json.loads((DATA / "instructions.json").read_text())["endpoints"]
        shipped = {(e.method, e.path, e.instruction, e.state_changing, e.batch) for e in ENDPOINTS}
        expected = {
            (e["method"], e["path"], e["instruction"], e["state_changing"], e["batch"])
            for e in spec
        }
        assert shipped == expected

    @pytest.mark.parametrize(
        ("instruction", "changing"),
        [("orderExecute", True), ("accountQuery", False), ("subscribe", False), ("nope", True)],
        ids=["execute", "query", "subscribe", "unknown-counts-as-changing"],
    )
    def test_state_changing_flag(self, instruction: str, changing: bool) -> None:
        """Mutations are flagged; an unknown instruction is treated as changing state."""
        assert is_state_changing(instruction) is changing

    def test_query_string_and_trailing_slash_are_ignored(self) -> None:
        """lookup() matches on the path alone."""
        assert lookup("get", "/api/v1/capital/?x=1").instruction == "balanceQuery"

    def test_unknown_route_is_a_clear_error(self) -> None:
        """An unsigned or unknown route says so."""
        with pytest.raises(InvalidInput, match="not a signed Backpack endpoint"):
            lookup("GET", "/api/v1/nothing")
