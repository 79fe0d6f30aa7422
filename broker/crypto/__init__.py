"""Broker cryptography: key handling, sealed disclosures, record keys, commitments.

Everything here wraps joserfc and ``cryptography``; no primitive is implemented
locally. Import from the submodules; this package only re-exports the main names.
"""

from broker.crypto.agency_keys import generate_agency_keys
from broker.crypto.commitment import reference_commitment, subject_commitment
from broker.crypto.datakeys import (
    RecordUnreadable,
    decrypt_record,
    encrypt_record,
    new_wrapped_data_key,
    record_aad,
    unwrap_data_key,
)
from broker.crypto.jwks import (
    JWKSInvalid,
    KeyUse,
    load_keyset,
    select_encryption_key,
    validate_public_jwks,
)
from broker.crypto.keystore import BrokerKeys, KeysMissing
from broker.crypto.payload import (
    PayloadInvalid,
    open_payload,
    seal_payload,
    sign_claims,
    verify_signed,
)

__all__ = [
    "BrokerKeys",
    "JWKSInvalid",
    "KeyUse",
    "KeysMissing",
    "PayloadInvalid",
    "RecordUnreadable",
    "decrypt_record",
    "encrypt_record",
    "generate_agency_keys",
    "load_keyset",
    "new_wrapped_data_key",
    "open_payload",
    "record_aad",
    "reference_commitment",
    "seal_payload",
    "select_encryption_key",
    "sign_claims",
    "subject_commitment",
    "unwrap_data_key",
    "validate_public_jwks",
    "verify_signed",
]
