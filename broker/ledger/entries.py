"""Writing ledger entries into the outbox, in the caller's transaction.

An entry is canonical JSON (RFC 8785) holding ids, agency ids, codes, field
*names*, digests and a keyed commitment to the survivor — never a record value,
a case reference or a plain survivor id. The sequencer later gives it an index.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import rfc8785
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from broker.auth.roles import Principal
from broker.crypto.commitment import subject_commitment
from broker.models import LedgerPending

ENTRY_VERSION = 1
_INSERT = insert(LedgerPending)


def iso_now(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def actor_of(principal: Principal | None) -> dict[str, str] | None:
    if principal is None:
        return None
    return {
        "client_id": principal.client_id,
        "agency_id": principal.agency_id,
        "role": principal.role,
    }


async def append_entry(
    session: AsyncSession,
    *,
    hmac_key: bytes,
    entry_type: str,
    actor: Principal | None,
    agency_id: str | None,
    subject_id: str | None = None,
    commitment: str | None = None,
    fields: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> str:
    """Queue one entry; returns its id. ``commitment`` overrides the subject commitment."""
    entry_id = str(uuid.uuid4())
    at = now or datetime.now(UTC)
    if commitment is None and subject_id is not None:
        commitment = subject_commitment(hmac_key, subject_id)
    body: dict[str, Any] = {
        "v": ENTRY_VERSION,
        "id": entry_id,
        "type": entry_type,
        "at": iso_now(at),
        "actor": actor_of(actor),
        "agency_id": agency_id,
        "subject": commitment,
    }
    if fields:
        overlap = body.keys() & fields.keys()
        if overlap:
            raise ValueError(f"ledger fields collide with the envelope: {sorted(overlap)}")
        body.update(fields)
    params = {
        "entry_id": entry_id,
        "entry_type": entry_type,
        "agency_id": agency_id,
        "subject_commitment": commitment,
        "body": rfc8785.dumps(body).decode("utf-8"),
        "created_at": at,
    }
    # A Core insert on the transaction's connection: written now, in the caller's
    # transaction, without the unit of work's bookkeeping on the hot path.
    await (await session.connection()).execute(_INSERT, params)
    return entry_id
