"""Deposited records: agencies without an endpoint leave records with the broker."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from broker.auth.roles import Principal
from broker.catalog import RecordInvalid
from broker.crypto.datakeys import DataKeyUnavailable
from broker.disclosure import repository
from broker.disclosure.schemas import RecordDeposit, RecordStored
from broker.errors import InvalidRequest, NotFound, ServiceUnavailable
from broker.ledger.entries import append_entry
from broker.models import ConsentGrant, ConsentVersion, HeldRecord, Subject, SubjectReference
from broker.runtime import Runtime
from broker.sources.held import seal_record
from broker.subjects.rekey import lock_data_key

log = logging.getLogger("broker.disclosure")


NOT_LINKED = "No survivor is linked to this reference for your agency."


async def may_deposit(session: AsyncSession, subject: Subject, agency_id: str) -> bool:
    """Whether ``agency_id`` may leave records for ``subject``: it enrolled her, or the
    latest version of one of her grants not revoked names it as a source."""
    if subject.enrolled_by_agency_id == agency_id:
        return True
    sources = await session.execute(
        select(ConsentVersion.source_agency_ids)
        .join(
            ConsentGrant,
            (ConsentGrant.id == ConsentVersion.grant_id)
            & (ConsentGrant.latest_version == ConsentVersion.version),
        )
        .where(ConsentGrant.subject_id == subject.id, ConsentVersion.status != "revoked")
    )
    return any(agency_id in ids for (ids,) in sources)


async def deposit(
    session: AsyncSession, rt: Runtime, caller: Principal, body: RecordDeposit
) -> RecordStored:
    schema = rt.catalog.schemas.get(body.category)
    if schema is None:
        raise InvalidRequest(f"Unknown data category '{body.category}'.")
    try:
        clean, dropped = schema.clean_record(body.record)
    except RecordInvalid as exc:
        raise InvalidRequest(str(exc)) from None
    row = (
        await session.execute(
            select(Subject)
            .join(SubjectReference, SubjectReference.subject_id == Subject.id)
            .where(
                SubjectReference.agency_id == caller.agency_id,
                SubjectReference.reference == body.subject_ref,
            )
        )
    ).scalar_one_or_none()
    # An agency that neither enrolled her nor holds data she agreed to share gets the
    # answer an unknown reference gets: otherwise a deposit would tell any agency
    # whether its own case numbers belong to a survivor the broker knows (invariant 6),
    # and records would gather here that no grant will ever release.
    if row is None or not await may_deposit(session, row, caller.agency_id):
        raise NotFound(NOT_LINKED)
    # Her data key is read under her row's lock, which a re-key also takes: a record
    # is never sealed under a data key that is being replaced (broker.subjects.rekey).
    wrapped = await lock_data_key(session, row.id)
    if wrapped is None:  # erased
        raise NotFound(NOT_LINKED)
    try:
        subject_id, agency_id = row.id, caller.agency_id
        blob = rt.with_records_keys(
            lambda keks: seal_record(keks, wrapped, subject_id, agency_id, body.category, clean)
        )
    except DataKeyUnavailable:
        log.error(
            "deposit refused: no records key of this process opens the survivor's data key "
            "(its key folder lacks it: copy the folder from where the records key was "
            "rotated); agency=%s category=%s",
            caller.agency_id,
            body.category,
        )
        raise ServiceUnavailable(
            "The broker cannot store this record at the moment; nothing was stored. "
            "Try again later."
        ) from None
    held = await repository.held_record(session, row.id, caller.agency_id, body.category)
    if held is None:
        session.add(
            HeldRecord(
                subject_id=row.id,
                agency_id=caller.agency_id,
                category=body.category,
                ciphertext=blob,
            )
        )
    else:
        held.ciphertext = blob
        held.updated_at = datetime.now(UTC)
    entry = await append_entry(
        session,
        hmac_key=rt.keys.subject_hmac,
        entry_type="record.deposited",
        actor=caller,
        agency_id=caller.agency_id,
        subject_id=row.id,
        fields={
            "category": body.category,
            "fields": sorted(clean),
            "dropped_unknown_fields": dropped,
        },
    )
    return RecordStored(
        category=body.category,
        fields_stored=sorted(clean),
        dropped_fields=dropped,
        ledger_entry=entry,
    )
