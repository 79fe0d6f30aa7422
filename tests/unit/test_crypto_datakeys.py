"""Per-survivor data keys (crypto-shredding) and subject/reference commitments."""

from __future__ import annotations

import secrets

import pytest

from broker.crypto.commitment import reference_commitment, subject_commitment
from broker.crypto.datakeys import (
    RecordUnreadable,
    decrypt_record,
    encrypt_record,
    new_wrapped_data_key,
    record_aad,
    unwrap_data_key,
)

KEK = bytes(range(32))
AAD = record_aad("subject-1", "agency-a", "safe-contact")


@pytest.fixture
def data_key() -> bytes:
    return unwrap_data_key(KEK, new_wrapped_data_key(KEK))


def test_wrapped_key_shape() -> None:
    wrapped = new_wrapped_data_key(KEK)
    assert len(wrapped) == 40
    assert new_wrapped_data_key(KEK) != wrapped
    assert len(unwrap_data_key(KEK, wrapped)) == 32


def test_roundtrip(data_key: bytes) -> None:
    blob = encrypt_record(data_key, b"shelter address", AAD)
    assert b"shelter address" not in blob
    assert len(blob) == 12 + len(b"shelter address") + 16
    assert decrypt_record(data_key, blob, AAD) == b"shelter address"
    assert encrypt_record(data_key, b"shelter address", AAD) != blob  # random nonce


def test_empty_plaintext_roundtrip(data_key: bytes) -> None:
    assert decrypt_record(data_key, encrypt_record(data_key, b"", AAD), AAD) == b""


@pytest.mark.parametrize(
    "other",
    [
        record_aad("subject-2", "agency-a", "safe-contact"),
        record_aad("subject-1", "agency-b", "safe-contact"),
        record_aad("subject-1", "agency-a", "address"),
        b"",
    ],
)
def test_wrong_aad_fails(data_key: bytes, other: bytes) -> None:
    blob = encrypt_record(data_key, b"secret", AAD)
    with pytest.raises(RecordUnreadable):
        decrypt_record(data_key, blob, other)


def test_aad_is_unambiguous() -> None:
    assert record_aad("a", "bc", "d") != record_aad("ab", "c", "d")
    assert record_aad("a", "b", "c") == record_aad("a", "b", "c")


def test_wrong_data_key_fails(data_key: bytes) -> None:
    blob = encrypt_record(data_key, b"secret", AAD)
    other = unwrap_data_key(KEK, new_wrapped_data_key(KEK))
    with pytest.raises(RecordUnreadable):
        decrypt_record(other, blob, AAD)


@pytest.mark.parametrize("position", [0, 12, -1])
def test_tampered_blob_fails(data_key: bytes, position: int) -> None:
    blob = bytearray(encrypt_record(data_key, b"secret", AAD))
    blob[position] ^= 0x80
    with pytest.raises(RecordUnreadable):
        decrypt_record(data_key, bytes(blob), AAD)


def test_truncated_blob_fails(data_key: bytes) -> None:
    with pytest.raises(RecordUnreadable):
        decrypt_record(data_key, b"short", AAD)


def test_unwrap_with_wrong_kek_fails() -> None:
    wrapped = new_wrapped_data_key(KEK)
    with pytest.raises(RecordUnreadable):
        unwrap_data_key(secrets.token_bytes(32), wrapped)


def test_unwrap_tampered_fails() -> None:
    wrapped = bytearray(new_wrapped_data_key(KEK))
    wrapped[5] ^= 1
    with pytest.raises(RecordUnreadable):
        unwrap_data_key(KEK, bytes(wrapped))


@pytest.mark.parametrize("bad", [b"", b"x" * 16, b"x" * 31])
def test_key_length_enforced(bad: bytes) -> None:
    with pytest.raises(ValueError):
        new_wrapped_data_key(bad)
    with pytest.raises(ValueError):
        encrypt_record(bad, b"x", AAD)


# ----------------------------------------------------------------------------- commitments

HMAC_KEY = b"k" * 32


def test_subject_commitment_known_value() -> None:
    import hashlib
    import hmac

    expected = hmac.new(
        HMAC_KEY, b"consent-broker/subject/v1\x00subject-1", hashlib.sha256
    ).hexdigest()
    assert subject_commitment(HMAC_KEY, "subject-1") == "hmac-sha256:" + expected


def test_subject_commitment_deterministic_and_distinct() -> None:
    value = subject_commitment(HMAC_KEY, "subject-1")
    assert value == subject_commitment(HMAC_KEY, "subject-1")
    assert value != subject_commitment(HMAC_KEY, "subject-2")
    assert value != subject_commitment(b"j" * 32, "subject-1")
    assert value.startswith("hmac-sha256:") and len(value) == len("hmac-sha256:") + 64
    assert "subject-1" not in value


def test_reference_commitment_known_value() -> None:
    import hashlib
    import hmac

    message = b"consent-broker/reference/v1\x00" + (8).to_bytes(4, "big") + b"agency-aREF-123"
    expected = hmac.new(HMAC_KEY, message, hashlib.sha256).hexdigest()
    assert reference_commitment(HMAC_KEY, "agency-a", "REF-123") == "hmac-sha256:" + expected


def test_reference_commitment() -> None:
    value = reference_commitment(HMAC_KEY, "agency-a", "REF-123")
    assert value == reference_commitment(HMAC_KEY, "agency-a", "REF-123")
    assert value != reference_commitment(HMAC_KEY, "agency-b", "REF-123")
    assert value != reference_commitment(HMAC_KEY, "agency-a", "REF-124")
    assert value != reference_commitment(b"j" * 32, "agency-a", "REF-123")
    assert reference_commitment(HMAC_KEY, "a", "bc") != reference_commitment(HMAC_KEY, "ab", "c")
    assert "REF-123" not in value and "agency-a" not in value
    # Domain separation: a reference never collides with a subject commitment.
    assert value != subject_commitment(HMAC_KEY, "REF-123")


def test_commitment_rejects_short_key() -> None:
    with pytest.raises(ValueError):
        subject_commitment(b"short", "subject-1")
