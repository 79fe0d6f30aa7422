"""Per-survivor data keys, so held records can be crypto-shredded.

Each survivor's held records are encrypted under their own AES-256-GCM data key,
stored only wrapped (RFC 3394) by the broker's ``records_kek``. Deleting the wrapped
key makes every copy of those records -- including backups -- unreadable. The AAD
binds each blob to its (subject, agency, category) row, so a blob copied into
another row fails to decrypt instead of disclosing the wrong survivor's data.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

__all__ = [
    "DATA_KEY_BYTES",
    "NONCE_BYTES",
    "DataKeyUnavailable",
    "RecordUnreadable",
    "decrypt_record",
    "encrypt_record",
    "new_wrapped_data_key",
    "record_aad",
    "rewrap_data_key",
    "unwrap_data_key",
    "unwrap_with_any",
]

DATA_KEY_BYTES = 32
NONCE_BYTES = 12
_TAG_BYTES = 16
_AAD_LABEL = b"consent-broker/record/v1\x00"


class RecordUnreadable(ValueError):
    """A wrapped key or record blob failed authentication (wrong key, row or tampering)."""


class DataKeyUnavailable(RecordUnreadable):
    """A survivor's data key is stored, but no records key this process holds opens it.

    Not "no record": a process still running with a records key rotated out and then
    forgotten, or a key folder restored from the wrong backup. The operator must act.
    """


def _check_key(name: str, key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != DATA_KEY_BYTES:
        raise ValueError(f"{name} must be {DATA_KEY_BYTES} bytes")


def new_wrapped_data_key(kek: bytes) -> bytes:
    """Generate a fresh data key and return it wrapped under ``kek`` (40 bytes)."""
    _check_key("kek", kek)
    return aes_key_wrap(kek, secrets.token_bytes(DATA_KEY_BYTES))


def unwrap_data_key(kek: bytes, wrapped: bytes) -> bytes:
    """Unwrap a data key; ``RecordUnreadable`` if ``kek`` is wrong or the blob altered."""
    _check_key("kek", kek)
    try:
        key = aes_key_unwrap(kek, wrapped)
    except (InvalidUnwrap, ValueError):
        raise RecordUnreadable("data key cannot be unwrapped with this key") from None
    if len(key) != DATA_KEY_BYTES:
        raise RecordUnreadable("wrapped data key has the wrong length")
    return key


def unwrap_with_any(keks: Sequence[bytes], wrapped: bytes) -> bytes:
    """Unwrap with the first of ``keks`` that opens ``wrapped`` (current key first).

    Between ``broker keys rotate records`` and the rewrap of every stored key, data
    keys are wrapped by either the new or a retired key. AES key wrap authenticates
    (RFC 3394 §2.2.3), so a wrong key is detected, never used.
    """
    for kek in keks:
        try:
            return unwrap_data_key(kek, wrapped)
        except RecordUnreadable:
            continue
    raise DataKeyUnavailable("data key cannot be unwrapped with any records key")


def rewrap_data_key(keks: Sequence[bytes], wrapped: bytes) -> bytes | None:
    """``wrapped`` rewrapped under ``keks[0]``; None if it already is.

    ``RecordUnreadable`` if no key in ``keks`` opens it.
    """
    try:
        unwrap_data_key(keks[0], wrapped)  # also refuses a malformed key (ValueError)
    except RecordUnreadable:
        return aes_key_wrap(keks[0], unwrap_with_any(keks[1:], wrapped))
    return None


def record_aad(subject_id: str, agency_id: str, category: str) -> bytes:
    """Canonical AAD for a held record: length-prefixed, so no two tuples collide."""
    out = bytearray(_AAD_LABEL)
    for part in (subject_id, agency_id, category):
        raw = part.encode("utf-8")
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def encrypt_record(data_key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt with AES-256-GCM under a random 96-bit nonce: ``nonce || ciphertext+tag``."""
    _check_key("data_key", data_key)
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, aad)


def decrypt_record(data_key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Decrypt ``encrypt_record`` output; ``RecordUnreadable`` on any mismatch."""
    _check_key("data_key", data_key)
    if len(blob) < NONCE_BYTES + _TAG_BYTES:
        raise RecordUnreadable("record blob is truncated")
    try:
        return AESGCM(data_key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise RecordUnreadable("record cannot be decrypted for this key and row") from None
