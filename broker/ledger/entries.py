"""Writing ledger entries into the outbox, in the caller's transaction.

An entry is canonical JSON (RFC 8785) holding ids, agency ids, codes, field
*names*, digests and a keyed commitment to the survivor — never a record value,
a case reference or a plain survivor id. The sequencer later gives it an index.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import rfc8785
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.auth.roles import Principal
from broker.crypto.commitment import subject_commitment
from broker.crypto.randomness import random_id
from broker.models import LedgerPending

ENTRY_VERSION = 1
_INSERT = insert(LedgerPending)


def iso_now(now: datetime | None = None) -> str:
    """UTC to the millisecond (truncated), as ``2026-12-01T03:11:23.197Z``.

    ``isoformat`` rather than ``strftime``: libc's strftime re-reads the time zone
    on every call, and this runs for every ledger entry.
    """
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def actor_of(principal: Principal | None) -> dict[str, str] | None:
    if principal is None:
        return None
    return {
        "client_id": principal.client_id,
        "agency_id": principal.agency_id,
        "role": principal.role,
    }


_MAX_SAFE_INT = 2**53 - 1


def _plain(value: Any) -> bool:
    """Only values whose orjson form is already RFC 8785: no floats, safe ints, str keys."""
    if value is None or isinstance(value, (str, bool)):
        return True
    if isinstance(value, int):
        return -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def canonical_body(body: dict[str, Any]) -> str:
    """RFC 8785 text of an entry; orjson's sorted output where that is identical.

    For ASCII keys and values without floats, orjson with sorted keys writes exactly
    the JCS bytes (same escapes, same order) some fifty times faster than the
    pure-Python ``rfc8785``, which remains the path for everything else.
    """
    if _plain(body):
        out = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        if out.isascii():
            return out.decode("ascii")
    return rfc8785.dumps(body).decode("utf-8")


def pending_row(
    *,
    hmac_key: bytes,
    entry_type: str,
    actor: Principal | None,
    agency_id: str | None,
    subject_id: str | None = None,
    commitment: str | None = None,
    fields: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The outbox row of one entry, for a caller that writes it with other rows at once.

    ``commitment`` overrides the subject commitment.
    """
    entry_id = random_id()
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
    return {
        "entry_id": entry_id,
        "entry_type": entry_type,
        "agency_id": agency_id,
        "subject_commitment": commitment,
        "body": canonical_body(body),
        "created_at": at,
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
    """Queue one entry in the caller's transaction; returns its id."""
    row = pending_row(
        hmac_key=hmac_key,
        entry_type=entry_type,
        actor=actor,
        agency_id=agency_id,
        subject_id=subject_id,
        commitment=commitment,
        fields=fields,
        now=now,
    )
    # A Core insert on the transaction's connection: written now, in the caller's
    # transaction, without the unit of work's bookkeeping.
    await (await session.connection()).execute(_INSERT, row)
    entry_id: str = row["entry_id"]
    return entry_id


async def append_operation(session: AsyncSession, entry_type: str, fields: dict[str, Any]) -> str:
    """Queue an entry for an operator's action from the shell, in the caller's transaction.

    Key operations have no client (``actor`` null) and no survivor, so no commitment
    key is needed; ``fields`` hold public key names and counts only.
    """
    return await append_entry(
        session, hmac_key=b"", entry_type=entry_type, actor=None, agency_id=None, fields=fields
    )


async def record_operation(
    sessionmaker: async_sessionmaker[AsyncSession], entry_type: str, fields: dict[str, Any]
) -> str:
    """``append_operation`` in a transaction of its own (after a run of many)."""
    async with sessionmaker() as session, session.begin():
        return await append_operation(session, entry_type, fields)
