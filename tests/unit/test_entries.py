"""The ledger's fast canonical JSON is byte-identical to RFC 8785; its timestamps are UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.ledger.entries import canonical_body, iso_now

MAX = 2**53 - 1
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=8), values, max_size=8))
def test_canonical_body_is_rfc8785(body: dict[str, Any]) -> None:
    try:
        expected = rfc8785.dumps(body).decode("utf-8")
    except (rfc8785.CanonicalizationError, ValueError, OverflowError):
        return  # not representable in JCS at all (e.g. integers beyond 2**53 in some forms)
    assert canonical_body(body) == expected


def test_typical_entry_takes_the_fast_path_and_matches() -> None:
    body: dict[str, Any] = {
        "v": 1,
        "type": "disclosure.permitted",
        "fields_disclosed": ["bed_status", "intake_date"],
        "actor": {"role": "agency", "client_id": "c-1"},
        "grant_version": 3,
        "subject_known": True,
        "payload_sha256": None,
    }
    assert canonical_body(body) == rfc8785.dumps(body).decode()


# From year 1000: glibc's %Y does not pad, and strftime is only the reference here.
@given(st.datetimes(min_value=datetime(1000, 1, 1), timezones=st.timezones()))
def test_iso_now_is_utc_to_the_truncated_millisecond(at: datetime) -> None:
    text = iso_now(at)
    utc = at.astimezone(UTC)
    assert text == utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
