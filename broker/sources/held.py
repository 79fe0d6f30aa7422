"""Records deposited by agencies without an endpoint, encrypted per survivor.

Each record is AES-GCM under the survivor's own data key, bound by AAD to
(subject, agency, category); the data key is stored only wrapped by the broker's
KEK (the current one or, until ``broker keys rewrap-records`` has run, a retired
one). Erasing the survivor drops the wrapped key: the ciphertexts become noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from broker.crypto.datakeys import (
    RecordUnreadable,
    decrypt_record,
    encrypt_record,
    record_aad,
    unwrap_with_any,
)


def seal_record(
    keks: Sequence[bytes],
    wrapped_key: bytes,
    subject_id: str,
    agency_id: str,
    category: str,
    record: dict[str, Any],
) -> bytes:
    data_key = unwrap_with_any(keks, wrapped_key)
    return encrypt_record(
        data_key, orjson.dumps(record), record_aad(subject_id, agency_id, category)
    )


def open_record(
    keks: Sequence[bytes],
    wrapped_key: bytes | None,
    subject_id: str,
    agency_id: str,
    category: str,
    blob: bytes,
) -> dict[str, Any]:
    if wrapped_key is None:
        raise RecordUnreadable("the survivor's data key was destroyed")
    data_key = unwrap_with_any(keks, wrapped_key)
    value = orjson.loads(
        decrypt_record(data_key, blob, record_aad(subject_id, agency_id, category))
    )
    if not isinstance(value, dict):
        raise RecordUnreadable("stored record is not an object")
    return value
