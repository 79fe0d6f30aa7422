"""HotStatement: the driver path (PostgreSQL) and the Core path (SQLite) agree.

Both backends run every test; on PostgreSQL the statements go through asyncpg
directly, so these check what SQLAlchemy would otherwise have done for us:
parameter order, literal binds, JSON encoding and decoding, aware datetimes,
the session's transaction, and errors re-raised as SQLAlchemy's.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError

from broker.hot_sql import HotStatement
from broker.models import Disclosure
from broker.runtime import Runtime

_ROW = HotStatement(
    select(Disclosure.fields_disclosed, Disclosure.created_at, Disclosure.grant_version).where(
        Disclosure.id == bindparam("id")
    )
)
_INSERT = HotStatement(insert(Disclosure))
_BUMP = HotStatement(
    update(Disclosure)
    .where(Disclosure.id == bindparam("key"))
    .values(grant_version=Disclosure.grant_version + 1)
)


def _disclosure(**over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": str(uuid.uuid4()),
        "subject_id": None,
        "requester_agency_id": str(uuid.uuid4()),
        "requester_client_id": str(uuid.uuid4()),
        "source_agency_id": None,
        "category": "shelter",
        "purpose": "safety_planning",
        "outcome": "denied",
        "reason": "no_grant",
        "fields_disclosed": ["intake_date", "bed_status"],
        "fields_withheld": [],
        "grant_id": None,
        "grant_version": 3,
        "policy_version": "test",
        "payload_digest": None,
        "ledger_entry_id": str(uuid.uuid4()),
        "subject_ref": None,
        "created_at": datetime(2026, 11, 30, 12, 0, 0, 123000, tzinfo=UTC),
    }
    row.update(over)
    return row


def _rt(world: object) -> Runtime:
    rt: Runtime = world.rt  # type: ignore[attr-defined]
    return rt


async def test_round_trip_in_the_session_transaction(world: object) -> None:
    rt = _rt(world)
    row = _disclosure()
    async with rt.sessionmaker() as session, session.begin():
        assert await _INSERT.affected(session, row) == 1
        # A literal bind (``+ 1``) and the row written by the same transaction.
        assert await _BUMP.affected(session, {"key": row["id"]}) == 1
        assert await _BUMP.affected(session, {"key": "no-such-id"}) == 0
        (fields, created, version), *rest = await _ROW.rows(session, {"id": row["id"]})
    assert rest == []
    assert fields == ["intake_date", "bed_status"]  # JSON in and out, not text
    assert created == row["created_at"] and created.tzinfo is not None
    assert version == 4


async def test_rollback_takes_driver_writes_with_it(world: object) -> None:
    rt = _rt(world)
    row = _disclosure()
    async with rt.sessionmaker() as session:
        tx = await session.begin()
        assert await _INSERT.affected(session, row) == 1
        await tx.rollback()
    async with rt.sessionmaker() as session, session.begin():
        assert await _ROW.rows(session, {"id": row["id"]}) == []


async def test_constraint_violation_is_sqlalchemys_integrity_error(world: object) -> None:
    rt = _rt(world)
    row = _disclosure()
    async with rt.sessionmaker() as session:
        with pytest.raises(IntegrityError):
            async with session.begin():
                await _INSERT.affected(session, row)
                await _INSERT.affected(session, row)  # same primary key


async def test_missing_parameter_is_refused_before_the_database(world: object) -> None:
    rt = _rt(world)
    async with rt.sessionmaker() as session, session.begin():
        with pytest.raises((KeyError, StatementError)):
            await _ROW.rows(session, {})


@pytest.mark.postgres_only  # SQLite stores any value in any column: nothing to refuse
async def test_bad_value_is_a_dbapi_error_not_a_crash(world: object) -> None:
    rt = _rt(world)
    async with rt.sessionmaker() as session:
        with pytest.raises(DBAPIError):
            async with session.begin():
                await _INSERT.affected(session, _disclosure(grant_version="not a number"))


async def test_one_session_two_transactions(world: object) -> None:
    """The driver is cached per transaction: a second transaction of the same session
    gets its own (a stale one could be a connection back in the pool, or autocommit)."""
    rt = _rt(world)
    kept, dropped = _disclosure(), _disclosure()
    async with rt.sessionmaker() as session:
        async with session.begin():
            assert await _INSERT.affected(session, kept) == 1
        tx = await session.begin()
        assert await _INSERT.affected(session, dropped) == 1
        assert len(await _ROW.rows(session, {"id": dropped["id"]})) == 1
        await tx.rollback()
        async with session.begin():
            assert len(await _ROW.rows(session, {"id": kept["id"]})) == 1
            assert await _ROW.rows(session, {"id": dropped["id"]}) == []
