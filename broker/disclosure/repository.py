"""Queries of the disclosure path, shaped to keep round trips few."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, select, update
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


# The hot path's statements are built once, with bound parameters, and run on the
# session's connection: no per-request expression building or ORM hydration, and
# SQLAlchemy's compiled cache always hits.
_V = ConsentVersion
_RESOLVE = (
    select(
        SubjectReference.subject_id,
        ConsentGrant.uses,
        _V.grant_id,
        _V.version,
        _V.status,
        _V.recipient_agency_id,
        _V.source_agency_ids,
        _V.fields,
        _V.purposes,
        _V.valid_from,
        _V.expires_at,
        _V.max_uses,
        _V.excluded_client_ids,
        _V.data_life_days,
    )
    .select_from(SubjectReference)
    .outerjoin(
        ConsentGrant,
        and_(
            ConsentGrant.subject_id == SubjectReference.subject_id,
            ConsentGrant.recipient_agency_id == bindparam("agency_id"),
        ),
    )
    .outerjoin(
        _V,
        and_(_V.grant_id == ConsentGrant.id, _V.version == ConsentGrant.latest_version),
    )
    .where(
        SubjectReference.agency_id == bindparam("agency_id"),
        SubjectReference.reference == bindparam("subject_ref"),
    )
)


async def resolve(session: AsyncSession, agency_id: str, subject_ref: str) -> Resolved:
    """Subject by the requester's own reference, with every grant's latest version to it.

    One statement: an unknown reference and a known one without grants cost the same.
    """
    conn = await session.connection()
    rows = (
        await conn.execute(_RESOLVE, {"agency_id": agency_id, "subject_ref": subject_ref})
    ).all()
    if not rows:
        return Resolved(None, [])
    grants = [_view(row) for row in rows if row[2] is not None]
    return Resolved(rows[0][0], grants)


def _view(row: Any) -> GrantView:
    (_, uses, grant_id, version, status, recipient, sources, fields, purposes, valid_from,
     expires_at, max_uses, excluded, data_life_days) = row  # fmt: skip
    return GrantView(
        grant_id=grant_id,
        version=version,
        status=status,
        recipient_agency_id=recipient,
        source_agency_ids=tuple(sources),
        fields={k: frozenset(names) for k, names in fields.items()},
        purposes=frozenset(purposes),
        valid_from=valid_from,
        expires_at=expires_at,
        max_uses=max_uses,
        uses=uses,
        excluded_client_ids=frozenset(excluded),
        data_life_days=data_life_days,
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


_PARTIES = (
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
    .join(Subject, Subject.id == bindparam("subject_id"))
    .outerjoin(
        SubjectReference,
        and_(
            SubjectReference.agency_id == Agency.id,
            SubjectReference.subject_id == bindparam("subject_id"),
        ),
    )
    .outerjoin(
        HeldRecord,
        and_(
            HeldRecord.agency_id == Agency.id,
            HeldRecord.subject_id == bindparam("subject_id"),
            HeldRecord.category == bindparam("category"),
        ),
    )
    .where(Agency.id.in_(bindparam("agency_ids", expanding=True)))
)


async def parties(
    session: AsyncSession, subject_id: str, category: str, agency_ids: list[str]
) -> tuple[dict[str, Party], bytes | None]:
    """Recipient and sources with their references and held records, in one statement.

    Also returns the survivor's wrapped data key (None once erased).
    """
    conn = await session.connection()
    params = {"subject_id": subject_id, "category": category, "agency_ids": agency_ids}
    found: dict[str, Party] = {}
    wrapped: bytes | None = None
    for agency_id, status, jwks, endpoint, reference, held, key in (
        await conn.execute(_PARTIES, params)
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


_TAKE_USE = (
    update(ConsentGrant)
    .where(
        ConsentGrant.id == bindparam("grant_id"),
        ConsentGrant.latest_version == bindparam("version"),
    )
    .values(uses=ConsentGrant.uses + 1)
)
_TAKE_LIMITED_USE = _TAKE_USE.where(ConsentGrant.uses < bindparam("max_uses"))


async def take_use(session: AsyncSession, grant: GrantView) -> bool:
    """Count one use, atomically, only if the version decided on is still the latest.

    The row lock taken here orders this disclosure against a concurrent revocation
    (which locks the same row): whichever commits second sees the other's effect.
    """
    params: dict[str, Any] = {"grant_id": grant.grant_id, "version": grant.version}
    stmt = _TAKE_USE
    if grant.max_uses is not None:
        stmt, params["max_uses"] = _TAKE_LIMITED_USE, grant.max_uses
    result = await (await session.connection()).execute(stmt, params)
    return bool(getattr(result, "rowcount", 0) == 1)
