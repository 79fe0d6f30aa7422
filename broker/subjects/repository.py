"""Every read of a subject starts from the caller's scope: its own agency's enrolments."""

from __future__ import annotations

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from broker.auth.roles import Principal
from broker.errors import NotFound
from broker.models import Subject


def readable_subjects(principal: Principal) -> Select[Subject]:
    return select(Subject).where(
        Subject.enrolled_by_agency_id == principal.agency_id, Subject.erased_at.is_(None)
    )


async def get_readable_subject(
    session: AsyncSession, principal: Principal, subject_id: str, *, for_update: bool = False
) -> Subject:
    """404 for both "no such subject" and "another agency's subject": no cross-agency oracle."""
    stmt = readable_subjects(principal).where(Subject.id == subject_id)
    if for_update:
        stmt = stmt.with_for_update()
    subject = (await session.execute(stmt)).scalar_one_or_none()
    if subject is None:
        raise NotFound("No subject with this id is managed by your agency.")
    return subject
