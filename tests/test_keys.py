"""Key names and key material are validated strictly, with messages a person can act on."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backpack_vault.config import Secret
from backpack_vault.core.keys import (
    KeyRecord,
    KeyRef,
    Origin,
    Status,
    can_transition,
    generate_pair,
    parse_api_key,
    parse_key_pair,
)
from backpack_vault.errors import InvalidInput, KeyNotUsable

VECTORS = json.loads((Path(__file__).parent / "data" / "vectors.json").read_text())
CHECKS = {c["id"]: c for c in VECTORS["key_format_checks"]}
KEY = VECTORS["key"]


class TestKeyRef:
    @pytest.mark.parametrize("text", ["main/bot-a", "scalper/b.1_x", "0/0"], ids=str)
    def test_valid_names_parse(self, text: str) -> None:
        """SUBACCOUNT/NAME of lowercase letters, digits, '.', '_' and '-' parse and print back."""
        assert str(KeyRef.parse(text)) == text

    @pytest.mark.parametrize(
        "text",
        ["main", "main/", "/a", "Main/a", "main/A", "a/b/c", "-a/b", "main/" + "x" * 64, "ma in/a"],
        ids=[
            "no-slash",
            "no-name",
            "no-sub",
            "upper-sub",
            "upper-name",
            "three",
            "dash-first",
            "too-long",
            "space",
        ],
    )
    def test_invalid_names_are_refused(self, text: str) -> None:
        """Anything else is refused with the expected form in the message."""
        with pytest.raises(InvalidInput):
            KeyRef.parse(text)


class TestKeyMaterial:
    @pytest.mark.parametrize("check_id", ["K2", "K3"])
    def test_published_pairs_are_accepted(self, check_id: str) -> None:
        """Backpack's published example pairs validate."""
        check = CHECKS[check_id]
        pair = parse_key_pair(check["api_key"], Secret(check["api_secret"]))
        assert pair.api_key == check["api_key"]

    def test_surrounding_whitespace_is_stripped(self) -> None:
        """Only surrounding whitespace is forgiven."""
        pair = parse_key_pair(f"  {KEY['api_key']}\n", Secret(f"\n{KEY['api_secret']}  \n"))
        assert pair.secret.reveal() == KEY["api_secret"]

    def test_a_64_byte_secret_says_what_to_paste(self) -> None:
        """A libsodium-style 64-byte secret is refused with an explanation."""
        check = CHECKS["K1"]
        with pytest.raises(InvalidInput, match=r"64 bytes .seed \+ public key.*44-character"):
            parse_key_pair(check["api_key"], Secret(check["api_secret"]))

    def test_a_mismatched_pair_is_refused(self) -> None:
        """A secret of another key is refused."""
        check = CHECKS["K4"]
        with pytest.raises(InvalidInput, match="does not belong to this API key"):
            parse_key_pair(check["api_key"], Secret(check["api_secret"]))

    @pytest.mark.parametrize(
        ("api_key", "match"),
        [
            ("A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=", "not standard padded base64"),
            ("A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg", "not standard padded base64"),
            (base64.b64encode(b"x" * 31).decode(), "31 bytes"),
            (base64.b64encode(b"x" * 33).decode(), "33 bytes"),
            ("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8", "bytes|base64"),
            ("", "base64|bytes"),
        ],
        ids=["urlsafe", "unpadded", "short", "long", "hex", "empty"],
    )
    def test_malformed_api_keys_name_the_field(self, api_key: str, match: str) -> None:
        """Each malformed API key gets a message naming the API key and what was found."""
        with pytest.raises(InvalidInput, match=match) as info:
            parse_api_key(api_key)
        assert "API key" in info.value.message

    @given(st.binary(min_size=0, max_size=80).filter(lambda b: len(b) != 32))
    def test_secrets_of_the_wrong_length_are_refused(self, raw: bytes) -> None:
        """Any secret that is not 32 bytes is refused, and the message never echoes it."""
        text = base64.b64encode(raw).decode()
        with pytest.raises(InvalidInput) as info:
            parse_key_pair(KEY["api_key"], Secret(text))
        if len(text) >= 8:
            assert text not in info.value.message

    @given(st.text(min_size=1, max_size=60))
    def test_arbitrary_text_never_passes_for_a_secret(self, text: str) -> None:
        """Random text is refused (or, vanishingly unlikely, is the real secret)."""
        if text.strip() == KEY["api_secret"]:
            return
        with pytest.raises(InvalidInput) as info:
            parse_key_pair(KEY["api_key"], Secret(text))
        assert "API secret" in info.value.message

    def test_generated_pairs_validate(self) -> None:
        """A generated pair passes the same strict intake."""
        pair = generate_pair()
        assert parse_key_pair(pair.api_key, pair.secret).api_key == pair.api_key
        assert len(pair.api_key) == 44

    def test_secret_repr_hides_the_value(self) -> None:
        """Secret shows *** in repr, str and f-strings."""
        secret = Secret(KEY["api_secret"])
        assert KEY["api_secret"] not in f"{secret} {secret!r} {[secret]}"


class TestLifecycle:
    @pytest.mark.parametrize(
        ("old", "new", "allowed"),
        [
            (Status.PENDING, Status.ACTIVE, True),
            (Status.ACTIVE, Status.REVOKED, True),
            (Status.ACTIVE, Status.RETIRED, True),
            (Status.ACTIVE, Status.PENDING, False),
            (Status.REVOKED, Status.ACTIVE, True),  # keys reinstate, after a VALID probe
            (Status.REVOKED, Status.RETIRED, False),
            (Status.REVOKED, Status.PENDING, False),
            (Status.RETIRED, Status.ACTIVE, False),
            (Status.RETIRED, Status.REVOKED, False),
            (Status.INCOMPLETE, Status.RETIRED, True),
        ],
        ids=str,
    )
    def test_transitions(self, old: Status, new: Status, allowed: bool) -> None:
        """Retired is final; revoked comes back only by reinstatement; pending becomes active;
        active can end."""
        assert can_transition(old, new) is allowed

    @pytest.mark.parametrize("status", [Status.PENDING, Status.REVOKED, Status.RETIRED], ids=str)
    def test_only_active_keys_are_usable(self, status: Status) -> None:
        """A key that is not active raises KeyNotUsable naming its status."""
        record = KeyRecord(
            ref=KeyRef("main", "a"),
            api_key=KEY["api_key"],
            read_only=False,
            status=status,
            origin=Origin.GENERATED,
            created_at="t",
            status_since="t",
        )
        with pytest.raises(KeyNotUsable, match=status.value):
            record.require_usable()

    def test_metadata_round_trips(self) -> None:
        """A record survives custom_metadata (strings only) unchanged."""
        record = KeyRecord(
            ref=KeyRef("main", "a"),
            api_key=KEY["api_key"],
            read_only=True,
            status=Status.ACTIVE,
            origin=Origin.BACKPACK_UI,
            created_at="2026-01-01T00:00:00+00:00",
            status_since="2026-01-01T00:00:00+00:00",
            label="desk 1",
            version=3,
        )
        meta = record.to_metadata()
        assert all(isinstance(v, str) and v for v in meta.values())
        assert KeyRecord.from_metadata(record.ref, meta, 3) == record

    @pytest.mark.parametrize(
        ("origin", "status"),
        [(Origin.BACKPACK_UI, Status.ACTIVE), (Origin.GENERATED, Status.PENDING)],
        ids=["added", "generated"],
    )
    def test_new_keys_start_where_the_lifecycle_says(self, origin: Origin, status: Status) -> None:
        """A key copied from the web UI starts active; one generated here starts pending."""
        record = KeyRecord.new(
            KeyRef("main", "a"), KEY["api_key"], origin=origin, now="t0", read_only=True
        )
        assert (record.status, record.created_at, record.status_since) == (status, "t0", "t0")

    def test_incomplete_metadata_is_not_a_record(self) -> None:
        """Metadata without status or api_key does not pass for a usable key."""
        assert KeyRecord.from_metadata(KeyRef("main", "a"), {"api_key": "x"}, 1) is None
