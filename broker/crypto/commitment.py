"""Keyed commitments, so the ledger can name subjects without storing identifiers.

An HMAC under the broker's secret ``subject_hmac`` key is stable (the same subject
maps to the same commitment, so ledger entries can be correlated by those who hold
the key) yet reveals nothing to a reader of the ledger, who cannot even confirm a
guessed identifier. Stable until ``broker keys rotate subject``: entries from then
on commit under the new key, and the broker looks a survivor up under every key it
has held. Each use has its own domain label so commitments of different kinds never
coincide.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

__all__ = ["reference_commitment", "subject_commitment"]

PREFIX = "hmac-sha256:"
_SUBJECT_LABEL = b"consent-broker/subject/v1\x00"
_REFERENCE_LABEL = b"consent-broker/reference/v1\x00"
_MIN_KEY_BYTES = 32


def _mac(key: bytes, message: bytes) -> str:
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"commitment key must be at least {_MIN_KEY_BYTES} bytes")
    return PREFIX + hmac.new(key, message, hashlib.sha256).hexdigest()


def subject_commitment(hmac_key: bytes, subject_id: str) -> str:
    """``hmac-sha256:<hex>`` of the subject id under the subject label."""
    return _mac(hmac_key, _SUBJECT_LABEL + subject_id.encode("utf-8"))


def reference_commitment(hmac_key: bytes, agency_id: str, reference: str) -> str:
    """Commit to a reference an agency asked about but the broker does not know.

    Lets the ledger count probing per agency without recording the guessed value.
    The agency id is length-prefixed so (agency, reference) pairs cannot collide.
    """
    agency = agency_id.encode("utf-8")
    message = _REFERENCE_LABEL + struct.pack(">I", len(agency)) + agency + reference.encode()
    return _mac(hmac_key, message)
