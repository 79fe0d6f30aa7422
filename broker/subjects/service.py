"""Enrolling survivors, linking references, erasure by crypto-shredding."""

from __future__ import annotations

import logging

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from broker.agencies.service import get_agency
from broker.auth.roles import Principal
from broker.common.validation import printable
from broker.consent.schemas import ConsentLifecycle
from broker.consent.service import revoke_all_for_subject
from broker.crypto.commitment import reference_commitment
from broker.crypto.datakeys import new_wrapped_data_key
from broker.crypto.keystore import RecordsKeyRotated
from broker.errors import Conflict, ServiceUnavailable
from broker.ledger.entries import append_entry
from broker.models import ConsentGrant, Disclosure, HeldRecord, Subject, SubjectReference
from broker.runtime import Runtime
from broker.subjects.repository import get_readable_subject
from broker.subjects.schemas import ReferenceCreate

log = logging.getLogger("broker.subjects")


async def enrol(session: AsyncSession, rt: Runtime, actor: Principal) -> Subject:
    try:
        kek = rt.wrapping_kek()
    except (RecordsKeyRotated, OSError, ValueError):
        # Logged by name only: the messages name key files, never key material.
        log.error("enrolment refused: the records key file changed or cannot be read")
        raise ServiceUnavailable(
            "The broker's records key file cannot be read, or changed while it was read; "
            "nothing was stored. Try again; if it persists, the operator must check the "
            "key folder."
        ) from None
    subject = Subject(
        enrolled_by_agency_id=actor.agency_id, wrapped_data_key=new_wrapped_data_key(kek)
    )
    session.add(subject)
    await session.flush()
    await append_entry(
        session,
        hmac_key=rt.keys.subject_hmac,
        entry_type="subject.enrolled",
        actor=actor,
        agency_id=actor.agency_id,
        subject_id=subject.id,
    )
    return subject


REFERENCE_TAKEN = "This agency already uses this reference for a survivor."


async def link_reference(
    session: AsyncSession, rt: Runtime, actor: Principal, subject_id: str, data: ReferenceCreate
) -> SubjectReference | Conflict:
    """Link an agency's case reference to a survivor; a ``Conflict`` if it is taken.

    References are unique per agency, so a refusal tells the caller the reference
    exists there (never whose it is). That answer is an oracle an insider could
    probe with, so it is recorded in the ledger -- actor, agency and a keyed
    commitment to the reference -- and committed: the caller returns the Conflict
    as the answer instead of raising it, which would roll the entry back.
    """
    subject = await get_readable_subject(session, actor, subject_id)
    agency = await get_agency(session, data.agency_id)
    reference = printable(data.reference, what="reference", max_len=128)
    taken = await session.scalar(
        select(SubjectReference.id).where(
            SubjectReference.agency_id == agency.id, SubjectReference.reference == reference
        )
    )
    commitment = reference_commitment(rt.keys.subject_hmac, agency.id, reference)
    if taken is not None:
        await append_entry(
            session,
            hmac_key=rt.keys.subject_hmac,
            entry_type="subject.reference_refused",
            actor=actor,
            agency_id=agency.id,
            subject_id=subject.id,
            fields={"reference": commitment, "reason": "reference_taken"},
        )
        return Conflict(REFERENCE_TAKEN)
    ref = SubjectReference(subject_id=subject.id, agency_id=agency.id, reference=reference)
    session.add(ref)
    await session.flush()
    await append_entry(
        session,
        hmac_key=rt.keys.subject_hmac,
        entry_type="subject.reference_linked",
        actor=actor,
        agency_id=agency.id,
        subject_id=subject.id,
        fields={"reference": commitment},
    )
    return ref


async def references_of(session: AsyncSession, subject_id: str) -> list[SubjectReference]:
    stmt = select(SubjectReference).where(SubjectReference.subject_id == subject_id)
    return list((await session.execute(stmt.order_by(SubjectReference.created_at))).scalars())


async def erase(
    session: AsyncSession, rt: Runtime, actor: Principal, subject_id: str, data: ConsentLifecycle
) -> int:
    """Crypto-shred a survivor: revoke her grants, destroy her data key, forget her id.

    The ledger keeps its entries (it must still verify) but the only link to her was
    the subject id inside an HMAC; with every row holding that id gone, nothing
    joins those commitments to her any more.
    """
    subject = await get_readable_subject(session, actor, subject_id, for_update=True)
    revoked = await revoke_all_for_subject(session, rt, actor, subject.id, data)
    await append_entry(
        session,
        hmac_key=rt.keys.subject_hmac,
        entry_type="subject.erased",
        actor=actor,
        agency_id=actor.agency_id,
        subject_id=subject.id,
        fields={"grants_revoked": revoked},
    )
    subject.wrapped_data_key = None
    await session.flush()
    await session.execute(delete(HeldRecord).where(HeldRecord.subject_id == subject.id))
    await session.execute(delete(SubjectReference).where(SubjectReference.subject_id == subject.id))
    await session.execute(delete(Disclosure).where(Disclosure.subject_id == subject.id))
    await session.execute(
        update(ConsentGrant).where(ConsentGrant.subject_id == subject.id).values(subject_id=None)
    )
    await session.delete(subject)
    await session.flush()
    return revoked
