"""Queries of the disclosure path, shaped to keep round trips few."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ARRAY,
    Boolean,
    Executable,
    Insert,
    Integer,
    String,
    and_,
    any_,
    bindparam,
    exists,
    insert,
    literal_column,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnClause

from broker.auth.roles import Principal
from broker.auth.standing import STANDING, require_standing
from broker.disclosure.decision import GrantView
from broker.hot_sql import HotStatement, session_driver
from broker.models import (
    Agency,
    ConsentGrant,
    ConsentVersion,
    Disclosure,
    HeldRecord,
    LedgerPending,
    Subject,
    SubjectReference,
)


@dataclass(frozen=True, slots=True)
class Resolved:
    subject_id: str | None
    grants: list[GrantView]


# The hot path's statements are built once, with bound parameters, and run as
# ``HotStatement``s: no per-request expression building or ORM hydration, and on
# PostgreSQL straight through the driver.
_V = ConsentVersion
_REFERENCE = (
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
    .subquery("ref")
)
# The caller's standing (one row, or none), each of the reference's rows beside it.
_RESOLVE = HotStatement(
    STANDING.add_columns(*_REFERENCE.c).outerjoin(_REFERENCE, true()),
)


async def resolve(session: AsyncSession, caller: Principal, subject_ref: str) -> Resolved:
    """Subject by the requester's own reference, with every grant's latest version to it.

    One statement, which also reads the caller's standing and refuses a withdrawn
    client or suspended agency (``Unauthenticated``) before anything else is used.
    An unknown reference and a known one without grants cost the same.
    """
    params = {
        "client_id": caller.client_id,
        "agency_id": caller.agency_id,
        "subject_ref": subject_ref,
    }
    rows = await _RESOLVE.rows(session, params)
    require_standing(rows[0] if rows else None)
    if rows[0][2] is None:
        return Resolved(None, [])
    grants = [_view(row[2:]) for row in rows if row[4] is not None]
    return Resolved(rows[0][2], grants)


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


_PARTIES_SELECT = (
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
)
_PARTIES = HotStatement(
    _PARTIES_SELECT.where(Agency.id.in_(bindparam("agency_ids", expanding=True))),
    # One array parameter on PostgreSQL: one prepared statement for any number of ids.
    pg=_PARTIES_SELECT.where(Agency.id == any_(bindparam("agency_ids", type_=ARRAY(String)))),
)


async def parties(
    session: AsyncSession, subject_id: str, category: str, agency_ids: list[str]
) -> tuple[dict[str, Party], bytes | None]:
    """Recipient and sources with their references and held records, in one statement.

    Also returns the survivor's wrapped data key (None once erased).
    """
    params = {"subject_id": subject_id, "category": category, "agency_ids": agency_ids}
    found: dict[str, Party] = {}
    wrapped: bytes | None = None
    for agency_id, status, jwks, endpoint, reference, held, key in await _PARTIES.rows(
        session, params
    ):
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


# --------------------------------------------------------------------------- writes

_TAKE_USE_STMT = (
    update(ConsentGrant)
    .where(
        ConsentGrant.id == bindparam("grant_id"),
        ConsentGrant.latest_version == bindparam("version"),
        # NULL max_uses: no limit.
        (bindparam("max_uses", type_=Integer) == None)  # noqa: E711
        | (ConsentGrant.uses < bindparam("max_uses", type_=Integer)),
    )
    .values(uses=ConsentGrant.uses + 1)
)
_TAKE_USE = HotStatement(_TAKE_USE_STMT, writes=True)
_INSERT_PENDING = insert(LedgerPending)
_INSERT_DISCLOSURE = insert(Disclosure)


def _decision_statement() -> Executable:
    """PostgreSQL: the grant use and a decision's two rows in one statement.

    The same UPDATE as ``_TAKE_USE`` (row-locked) gates both INSERTs, so a lost race
    writes nothing; the caller then records a denial instead. Without ``take`` (a
    denial or failure) the rows are written unconditionally.
    """
    take = bindparam("take", type_=Boolean)
    one: ColumnClause[int] = literal_column("1")
    used = _TAKE_USE_STMT.where(take).returning(one).cte("used")
    go = select(one).where(or_(not_(take), exists(select(one).select_from(used)))).cte("go")

    def copy(table: type[LedgerPending] | type[Disclosure], prefix: str) -> Insert:
        columns = [c for c in table.__table__.columns if c.name != "seq"]
        values = select(*(bindparam(prefix + c.name, type_=c.type) for c in columns))
        return insert(table).from_select([c.name for c in columns], values.select_from(go))

    pending = copy(LedgerPending, "p_").returning(one).cte("pending")
    return copy(Disclosure, "d_").add_cte(used, go, pending)


_DECISION_PG = HotStatement(_decision_statement(), writes=True)


async def store_decision(
    session: AsyncSession,
    pending: dict[str, Any],
    disclosure: dict[str, Any],
    use: GrantView | None = None,
) -> bool:
    """Write a decision's ledger entry and disclosure row; for a permit, count the use.

    With ``use``, nothing is written unless the use is taken: the version decided on
    is still the grant's latest and uses are left. The row lock this takes orders the
    disclosure against a concurrent revocation (which locks the same grant row):
    whichever commits second sees the other's effect. False when the use was lost.
    """
    grant = {
        "grant_id": use.grant_id if use else None,
        "version": use.version if use else None,
        "max_uses": use.max_uses if use else None,
    }
    if await session_driver(session) is not None:  # PostgreSQL: one statement
        params = {"take": use is not None, **grant}
        params.update({f"p_{k}": v for k, v in pending.items()})
        params.update({f"d_{k}": v for k, v in disclosure.items()})
        return await _DECISION_PG.affected(session, params) == 1
    if use is not None and await _TAKE_USE.affected(session, grant) != 1:
        return False
    conn = await session.connection()
    await conn.execute(_INSERT_PENDING, pending)
    await conn.execute(_INSERT_DISCLOSURE, disclosure)
    return True
