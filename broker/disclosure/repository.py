"""Queries of the disclosure path, shaped to keep round trips few."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    CompoundSelect,
    Executable,
    Insert,
    Integer,
    String,
    and_,
    any_,
    bindparam,
    cast,
    exists,
    func,
    insert,
    literal_column,
    not_,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.selectable import TableValuedAlias

from broker.auth.roles import Principal
from broker.auth.standing import STANDING, require_standing
from broker.disclosure.decision import GrantView
from broker.hot_sql import DbSession, HotStatement, session_driver
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
class Party:
    """An agency taking part in one disclosure, with what the broker holds for it."""

    id: str
    status: str
    encryption_jwks: dict[str, Any]
    records_endpoint: str | None
    reference: str | None  # this agency's own reference for the survivor
    held: bytes | None  # deposited record of the requested category, encrypted


@dataclass(frozen=True, slots=True)
class Resolved:
    """The survivor, the grants to the caller, and every agency a decision may need."""

    subject_id: str | None
    grants: list[GrantView]
    #: The caller's agency and each agency a grant names as a source (for a known survivor).
    parties: dict[str, Party]
    wrapped_key: bytes | None  # the survivor's data key, wrapped (None once erased)


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
_GRANTS = STANDING.add_columns(*_REFERENCE.c).outerjoin(_REFERENCE, true())

_PARTY_COLUMNS = (
    Agency.id,
    Agency.status,
    Agency.encryption_jwks,
    Agency.records_endpoint,
    SubjectReference.reference,
    HeldRecord.ciphertext,
    Subject.wrapped_data_key,
)
_SR = aliased(SubjectReference)
_SUBJECT_ID = (
    select(_SR.subject_id)
    .where(_SR.agency_id == bindparam("agency_id"), _SR.reference == bindparam("subject_ref"))
    .scalar_subquery()
)
# A table-valued function of a JSON array of strings, with its one column named "value".
ArrayElements = Callable[[Any], TableValuedAlias]


def _party_ids(elements: ArrayElements) -> CompoundSelect[Any]:
    """The caller's agency id, and the sources named by the survivor's grants to it."""
    names = elements(_V.source_agency_ids)
    sources = (
        select(names.c.value)
        .select_from(ConsentGrant)
        .join(_V, and_(_V.grant_id == ConsentGrant.id, _V.version == ConsentGrant.latest_version))
        .join(names, true())  # a function of the row beside it: implicitly lateral
        .where(
            ConsentGrant.subject_id == _SUBJECT_ID,
            ConsentGrant.recipient_agency_id == bindparam("agency_id"),
        )
    )
    return union_all(select(bindparam("agency_id", type_=String)), sources)


def _resolve_statement(
    elements: ArrayElements, among: Callable[[CompoundSelect[Any]], ColumnElement[bool]]
) -> Executable:
    """Grants and parties in one result: each row is one or the other, NULLs elsewhere."""
    grant_columns = list(_GRANTS.selected_columns)
    grants = _GRANTS.add_columns(*(cast(null(), c.type) for c in _PARTY_COLUMNS))
    parties = (
        select(*(cast(null(), c.type) for c in grant_columns), *_PARTY_COLUMNS)
        .select_from(Agency)
        .join(Subject, Subject.id == _SUBJECT_ID)
        .outerjoin(
            SubjectReference,
            and_(
                SubjectReference.agency_id == Agency.id, SubjectReference.subject_id == Subject.id
            ),
        )
        .outerjoin(
            HeldRecord,
            and_(
                HeldRecord.agency_id == Agency.id,
                HeldRecord.subject_id == Subject.id,
                HeldRecord.category == bindparam("category"),
            ),
        )
        .where(among(_party_ids(elements)))
    )
    return union_all(grants, parties)


_GRANT_WIDTH = len(STANDING.selected_columns) + len(_REFERENCE.c)
_RESOLVE = HotStatement(
    _resolve_statement(
        lambda array: func.json_each(array).table_valued("value"),
        lambda ids: Agency.id.in_(ids),
    ),
    # ``= ANY(ARRAY(...))``: the ids are collected first, then each agency is found by its
    # key; an ``IN`` would let the planner guess a hundred ids and scan every agency.
    pg=_resolve_statement(
        lambda array: func.jsonb_array_elements_text(array).table_valued("value"),
        lambda ids: Agency.id == any_(func.array(ids.scalar_subquery())),
    ),
)


async def resolve(
    session: DbSession, caller: Principal, subject_ref: str, category: str
) -> Resolved:
    """Subject by the requester's own reference, with every grant's latest version to it
    and the agencies a disclosure under any of them would involve.

    One statement, which also reads the caller's standing and refuses a withdrawn
    client or suspended agency (``Unauthenticated``) before anything else is used.
    An unknown reference and a known one without grants cost the same.
    """
    params = {
        "client_id": caller.client_id,
        "agency_id": caller.agency_id,
        "subject_ref": subject_ref,
        "category": category,
    }
    grant_rows: list[Any] = []
    parties: dict[str, Party] = {}
    wrapped: bytes | None = None
    for row in await _RESOLVE.rows(session, params):
        if row[_GRANT_WIDTH] is None:
            grant_rows.append(row)
            continue
        agency_id, status, jwks, endpoint, reference, held, key = row[_GRANT_WIDTH:]
        parties[agency_id] = Party(agency_id, status, jwks, endpoint, reference, held)
        wrapped = key
    require_standing(grant_rows[0] if grant_rows else None)
    subject_id = grant_rows[0][2]
    if subject_id is None:
        return Resolved(None, [], {}, None)
    grants = [_view(row[2:_GRANT_WIDTH]) for row in grant_rows if row[4] is not None]
    return Resolved(subject_id, grants, parties, wrapped)


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
    session: DbSession,
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
    assert isinstance(session, AsyncSession)  # a PooledDriver is PostgreSQL's
    conn = await session.connection()
    await conn.execute(_INSERT_PENDING, pending)
    await conn.execute(_INSERT_DISCLOSURE, disclosure)
    return True
