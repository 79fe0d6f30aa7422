"""Queries of the disclosure path, shaped to keep round trips few."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from broker.disclosure.decision import GrantView
from broker.models import (
    Agency,
    ConsentGrant,
    ConsentVersion,
    HeldRecord,
    Subject,
    SubjectReference,
)


@dataclass(frozen=True, slots=True)
class Resolved:
    subject_id: str | None
    grants: list[GrantView]


async def resolve(session: AsyncSession, agency_id: str, subject_ref: str) -> Resolved:
    """Subject by the requester's own reference, with every grant's latest version to it.

    One statement: an unknown reference and a known one without grants cost the same.
    """
    stmt = (
        select(SubjectReference.subject_id, ConsentGrant.uses, ConsentVersion)
        .select_from(SubjectReference)
        .outerjoin(
            ConsentGrant,
            and_(
                ConsentGrant.subject_id == SubjectReference.subject_id,
                ConsentGrant.recipient_agency_id == agency_id,
            ),
        )
        .outerjoin(
            ConsentVersion,
            and_(
                ConsentVersion.grant_id == ConsentGrant.id,
                ConsentVersion.version == ConsentGrant.latest_version,
            ),
        )
        .where(SubjectReference.agency_id == agency_id, SubjectReference.reference == subject_ref)
    )
    rows = (await session.execute(stmt)).all()
    if not rows:
        return Resolved(None, [])
    grants = [_view(v, uses) for _, uses, v in rows if v is not None]
    return Resolved(rows[0][0], grants)


def _view(v: ConsentVersion, uses: int) -> GrantView:
    return GrantView(
        grant_id=v.grant_id,
        version=v.version,
        status=v.status,
        recipient_agency_id=v.recipient_agency_id,
        source_agency_ids=tuple(v.source_agency_ids),
        fields={k: frozenset(names) for k, names in v.fields.items()},
        purposes=frozenset(v.purposes),
        valid_from=v.valid_from,
        expires_at=v.expires_at,
        max_uses=v.max_uses,
        uses=uses,
        excluded_client_ids=frozenset(v.excluded_client_ids),
        data_life_days=v.data_life_days,
    )


@dataclass(frozen=True, slots=True)
class Party:
    """An agency taking part in one disclosure, with what the broker holds for it."""

    id: str
    status: str
    encryption_jwks: dict[str, Any]
    records_endpoint: str | None
    reference: str | None  # this agency's own reference for the survivor
    held: bytes | None  # deposited record of the requested category, encrypted


async def parties(
    session: AsyncSession, subject_id: str, category: str, agency_ids: list[str]
) -> tuple[dict[str, Party], bytes | None]:
    """Recipient and sources with their references and held records, in one statement.

    Also returns the survivor's wrapped data key (None once erased).
    """
    stmt = (
        select(
            Agency.id,
            Agency.status,
            Agency.encryption_jwks,
            Agency.records_endpoint,
            SubjectReference.reference,
            HeldRecord.ciphertext,
            Subject.wrapped_data_key,
        )
        .select_from(Agency)
        .join(Subject, Subject.id == subject_id)
        .outerjoin(
            SubjectReference,
            and_(
                SubjectReference.agency_id == Agency.id, SubjectReference.subject_id == subject_id
            ),
        )
        .outerjoin(
            HeldRecord,
            and_(
                HeldRecord.agency_id == Agency.id,
                HeldRecord.subject_id == subject_id,
                HeldRecord.category == category,
            ),
        )
        .where(Agency.id.in_(agency_ids))
    )
    found: dict[str, Party] = {}
    wrapped: bytes | None = None
    for agency_id, status, jwks, endpoint, reference, held, key in (
        await session.execute(stmt)
    ).all():
        found[agency_id] = Party(agency_id, status, jwks, endpoint, reference, held)
        wrapped = key
    return found, wrapped


async def held_record(
    session: AsyncSession, subject_id: str, agency_id: str, category: str
) -> HeldRecord | None:
    stmt = select(HeldRecord).where(
        HeldRecord.subject_id == subject_id,
        HeldRecord.agency_id == agency_id,
        HeldRecord.category == category,
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def take_use(session: AsyncSession, grant: GrantView) -> bool:
    """Count one use, atomically, only if the version decided on is still the latest.

    The row lock taken here orders this disclosure against a concurrent revocation
    (which locks the same row): whichever commits second sees the other's effect.
    """
    stmt = (
        update(ConsentGrant)
        .where(ConsentGrant.id == grant.grant_id, ConsentGrant.latest_version == grant.version)
        .values(uses=ConsentGrant.uses + 1)
    )
    if grant.max_uses is not None:
        stmt = stmt.where(ConsentGrant.uses < grant.max_uses)
    result = await session.execute(stmt)
    return bool(getattr(result, "rowcount", 0) == 1)
