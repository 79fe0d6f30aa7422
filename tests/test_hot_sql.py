"""HotStatement: the driver path (PostgreSQL) and the Core path (SQLite) agree.

Both backends run every test; on PostgreSQL the statements go through asyncpg
directly, so these check what SQLAlchemy would otherwise have done for us:
parameter order, literal binds, JSON encoding and decoding, aware datetimes,
the session's transaction, and errors re-raised as SQLAlchemy's.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest
from sqlalchemy import Text, bindparam, cast, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError
from sqlalchemy.pool import QueuePool
from sqlalchemy.util.concurrency import greenlet_spawn
from starlette.requests import Request

from broker.consent.endpoints import revoke_consent
from broker.db import _wants_autocommit, make_engine
from broker.disclosure.endpoints import disclose
from broker.hot_sql import HotStatement, OutcomeUnknown, PooledDriver, session_driver
from broker.models import Disclosure
from broker.runtime import Runtime, build_runtime
from tests.conftest import PG_ADMIN_DSN
from tests.support import checked_out
from tests.test_faults import _terminate_backends

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


# --------------------------------------------------------------------------- autocommit

_INSERT_WRITE = HotStatement(insert(Disclosure), writes=True)
# A write that holds its statement open long enough to kill its backend mid-flight.
_SLOW_BUMP = HotStatement(
    update(Disclosure)
    .where(Disclosure.id == bindparam("key"), cast(func.pg_sleep(30), Text).is_not(None))
    .values(grant_version=Disclosure.grant_version + 1),
    writes=True,
)


@pytest.mark.postgres_only
async def test_autocommit_write_stands_without_commit(world: object) -> None:
    """The autocommit pool runs each statement as its own transaction: no rollback
    takes a write back (which is why only single-statement routes may use it)."""
    rt = _rt(world)
    row = _disclosure()
    async with rt.autocommit_sessionmaker() as session:
        tx = await session.begin()
        assert await _INSERT_WRITE.affected(session, row) == 1
        await tx.rollback()
    async with rt.sessionmaker() as session, session.begin():
        assert len(await _ROW.rows(session, {"id": row["id"]})) == 1


@pytest.mark.postgres_only
async def test_autocommit_write_refused_by_the_server_is_definite(world: object) -> None:
    """A constraint violation is the server's answer: nothing was written, and the
    error says so (IntegrityError, a 409), not 'outcome unknown'."""
    rt = _rt(world)
    row = _disclosure()
    async with rt.autocommit_sessionmaker() as session, session.begin():
        assert await _INSERT_WRITE.affected(session, row) == 1
        with pytest.raises(IntegrityError) as caught:
            await _INSERT_WRITE.affected(session, row)
        assert not isinstance(caught.value, OutcomeUnknown)


async def _kill_when_sleeping(dbname: str) -> int:
    """Terminate the backend once it is inside pg_sleep (``wait_event`` PgSleep), not
    while it still parses the statement: a kill then would be a refusal before execution."""
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        for _ in range(200):
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND wait_event = 'PgSleep' AND pid <> pg_backend_pid()",
                dbname,
            )
            if killed:
                return int(killed)
            await asyncio.sleep(0.02)
        return 0
    finally:
        await admin.close()


@pytest.mark.postgres_only
@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transaction"])
async def test_write_lost_in_flight(world: object, autocommit: bool) -> None:
    """The connection dies while a write runs. In autocommit the write may have
    committed: OutcomeUnknown (answered 503 commit-unconfirmed). In a transaction the
    server rolls it back for certain: a plain DBAPIError (503 'nothing was changed')."""
    rt = _rt(world)
    row = _disclosure()
    async with rt.sessionmaker() as session, session.begin():
        await _INSERT.affected(session, row)
    maker = rt.autocommit_sessionmaker if autocommit else rt.sessionmaker
    dbname = rt.engine.url.database
    assert dbname is not None
    async with maker() as session:
        with pytest.raises(DBAPIError) as caught:
            async with session.begin():
                killer = asyncio.create_task(_kill_when_sleeping(dbname))
                try:
                    await _SLOW_BUMP.affected(session, {"key": row["id"]})
                finally:
                    assert await killer == 1
    assert isinstance(caught.value, OutcomeUnknown) is autocommit


@pytest.mark.postgres_only
async def test_dead_autocommit_connection_is_not_handed_out(world: object) -> None:
    """Autocommit checkouts get no BEGIN: a pooled connection whose backend was just
    terminated is replaced, either at checkout (the driver saw the socket close) or when
    the driver refuses the first statement before sending it."""
    rt = _rt(world)
    async with rt.autocommit_sessionmaker() as session:
        assert await _ROW.rows(session, {"id": "none"}) == []
    dbname = rt.engine.url.database
    assert dbname is not None
    assert await _terminate_backends(dbname) >= 1
    async with rt.autocommit_sessionmaker() as session:
        assert await _ROW.rows(session, {"id": "none"}) == []


@pytest.mark.postgres_only
@pytest.mark.parametrize("statement", ["read", "write"])
async def test_statement_refused_locally_runs_again_on_a_fresh_connection(
    world: object, statement: str
) -> None:
    """The driver finds its connection closed before sending: in autocommit nothing is
    lost, so the statement runs on a new connection, once (a write is not doubled)."""
    rt = _rt(world)
    row = _disclosure()
    async with rt.autocommit_sessionmaker() as session:
        first = await session_driver(session)
        assert first is not None
        assert await _ROW.rows(session, {"id": row["id"]}) == []
        first.terminate()
        if statement == "read":
            assert await _ROW.rows(session, {"id": row["id"]}) == []
        else:
            assert await _INSERT_WRITE.affected(session, row) == 1
        again = await session_driver(session)
        assert again is not None and again is not first and not again.is_closed()
    async with rt.sessionmaker() as session, session.begin():
        found = await _ROW.rows(session, {"id": row["id"]})
    assert len(found) == (1 if statement == "write" else 0)


@pytest.mark.postgres_only
async def test_statement_refused_in_a_transaction_is_not_run_again(world: object) -> None:
    """Inside a transaction a lost connection loses the transaction's earlier work: the
    statement must fail (503 "nothing was changed"), never continue on a new one."""
    rt = _rt(world)
    row = _disclosure()
    async with rt.sessionmaker() as session:
        with pytest.raises(DBAPIError) as caught:
            async with session.begin():
                assert await _INSERT.affected(session, row) == 1
                driver = await session_driver(session)
                assert driver is not None
                driver.terminate()
                await _ROW.rows(session, {"id": row["id"]})
    assert not isinstance(caught.value, OutcomeUnknown)
    async with rt.sessionmaker() as session, session.begin():
        assert await _ROW.rows(session, {"id": row["id"]}) == []


def test_reads_and_marked_routes_choose_the_autocommit_pool() -> None:
    """GET/HEAD and ``@single_statement_writes`` routes; every other write keeps its
    transaction."""

    def wants(method: str, endpoint: object) -> bool:
        scope = {"type": "http", "method": method, "headers": [], "endpoint": endpoint}
        return _wants_autocommit(Request(scope))

    assert getattr(disclose, "__broker_single_statement_writes__", False)
    assert wants("GET", revoke_consent) and wants("HEAD", None)
    assert wants("POST", disclose)
    assert not wants("POST", revoke_consent)
    assert not wants("POST", None)


@pytest.mark.postgres_only
async def test_autocommit_write_of_a_bad_value_is_definite_and_keeps_the_connection(
    world: object,
) -> None:
    """A value the driver cannot encode is never sent: a plain DBAPIError (503 "nothing
    was changed"), not an unknown outcome, and no reconnect (it would fail anywhere)."""
    rt = _rt(world)
    async with rt.autocommit_sessionmaker() as session:
        driver = await session_driver(session)
        with pytest.raises(DBAPIError) as caught:
            await _INSERT_WRITE.affected(session, _disclosure(grant_version="not a number"))
        assert not isinstance(caught.value, OutcomeUnknown)
        assert await session_driver(session) is driver


async def test_pool_sizes_come_from_settings(world: object) -> None:
    """Both PostgreSQL pools take BROKER_DB_POOL_SIZE / BROKER_DB_MAX_OVERFLOW; SQLite has
    one engine for both roles."""
    settings = _rt(world).settings.model_copy(update={"db_pool_size": 3, "db_max_overflow": 2})
    rt = build_runtime(settings)
    try:
        if settings.is_sqlite:
            assert rt.autocommit_engine is rt.engine
            assert rt.autocommit_sessionmaker is rt.sessionmaker
        else:
            assert rt.autocommit_engine is not rt.engine
            for engine in (rt.engine, rt.autocommit_engine):
                pool = engine.sync_engine.pool
                assert isinstance(pool, QueuePool)
                assert pool.size() == 3 and pool._max_overflow == 2
    finally:
        await rt.aclose()


# --------------------------------------------------------------------------- PooledDriver


@pytest.mark.postgres_only
async def test_a_pooled_driver_hands_its_connection_back(world: object) -> None:
    """A connection is taken at the first statement and returned by ``commit()``."""
    rt = _rt(world)
    engine = rt.autocommit_engine
    before = checked_out(engine)
    db = PooledDriver(rt.autocommit_engine)
    assert await _ROW.rows(db, {"id": "none"}) == []
    assert checked_out(engine) == before + 1
    await db.commit()
    assert checked_out(engine) == before
    assert await _ROW.rows(db, {"id": "none"}) == []  # the next statement takes one again
    await db.reconnect()  # dropped, not pooled
    assert checked_out(engine) == before


@pytest.mark.postgres_only
async def test_release_soon_hands_the_connection_back_after_this_turn(world: object) -> None:
    """The end of a request schedules the hand-back, so the answer is written first."""
    rt = _rt(world)
    engine = rt.autocommit_engine
    before = checked_out(engine)
    PooledDriver(rt.autocommit_engine).release_soon()  # never connected: nothing to do
    db = PooledDriver(rt.autocommit_engine)
    assert await _ROW.rows(db, {"id": "none"}) == []
    db.release_soon()
    assert checked_out(engine) == before + 1  # still out during the request's own turn
    for _ in range(50):
        if checked_out(engine) == before:
            break
        await asyncio.sleep(0)
    assert checked_out(engine) == before
    assert await _ROW.rows(db, {"id": "none"}) == []  # the driver can take one again
    await db.commit()
    assert checked_out(engine) == before


@pytest.mark.postgres_only
async def test_connections_go_to_drivers_in_the_order_they_asked(world: object) -> None:
    """A connection handed back by ``release_soon`` goes to the longest waiter, not to
    a request that arrived in the same turn. The pool's own queue lets the newcomer
    take it (SQLAlchemy 2.0; without the gate this test sees ["later", "first"])."""
    rt = _rt(world)
    engine = make_engine(rt.settings.database_url, autocommit=True, pool_size=1, max_overflow=0)
    gate = asyncio.Semaphore(1)
    served: list[str] = []

    async def request(name: str, db: PooledDriver) -> None:
        await db.driver()
        served.append(name)
        db.release_soon()

    try:
        holder = PooledDriver(engine, gate)
        await holder.driver()
        first = asyncio.create_task(request("first", PooledDriver(engine, gate)))
        for _ in range(20):  # let it reach the wait for a connection
            await asyncio.sleep(0)
        assert served == []
        holder.release_soon()  # the hand-back runs next turn...
        later = asyncio.create_task(request("later", PooledDriver(engine, gate)))  # ...as this
        async with asyncio.timeout(10):
            await asyncio.gather(first, later)
        assert served == ["first", "later"]
        for _ in range(20):
            await asyncio.sleep(0)
        assert not gate.locked()  # every permit came back
    finally:
        await engine.dispose()


@pytest.mark.postgres_only
async def test_a_driver_that_waits_too_long_for_the_gate_gets_a_database_error(
    world: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _rt(world)
    monkeypatch.setattr("broker.hot_sql.GATE_TIMEOUT_SECONDS", 0.05)
    gate = asyncio.Semaphore(1)
    holder = PooledDriver(rt.autocommit_engine, gate)
    await holder.driver()
    try:
        with pytest.raises(DBAPIError, match="no database connection came free"):
            await PooledDriver(rt.autocommit_engine, gate).driver()
    finally:
        await holder.commit()
    assert not gate.locked()
    again = PooledDriver(rt.autocommit_engine, gate)
    await again.driver()
    await again.reconnect()
    assert not gate.locked()


@pytest.mark.postgres_only
@pytest.mark.parametrize("statement", ["read", "write"])
async def test_a_pooled_driver_runs_a_locally_refused_statement_again(
    world: object, statement: str
) -> None:
    """As for an autocommit session: nothing is lost, so a statement the driver refused
    before sending runs once more on a new connection."""
    rt = _rt(world)
    row = _disclosure()
    db = PooledDriver(rt.autocommit_engine)
    first = await db.driver()
    first.terminate()
    if statement == "read":
        assert await _ROW.rows(db, {"id": row["id"]}) == []
    else:
        assert await _INSERT_WRITE.affected(db, row) == 1
    again = await db.driver()
    assert again is not first and not again.is_closed()
    await db.commit()
    async with rt.sessionmaker() as session, session.begin():
        found = await _ROW.rows(session, {"id": row["id"]})
    assert len(found) == (1 if statement == "write" else 0)


@pytest.mark.postgres_only
async def test_a_pooled_driver_write_lost_in_flight_is_an_unknown_outcome(world: object) -> None:
    rt = _rt(world)
    row = _disclosure()
    async with rt.sessionmaker() as session, session.begin():
        await _INSERT.affected(session, row)
    dbname = rt.engine.url.database
    assert dbname is not None
    db = PooledDriver(rt.autocommit_engine)
    killer = asyncio.create_task(_kill_when_sleeping(dbname))
    try:
        with pytest.raises(OutcomeUnknown):
            await _SLOW_BUMP.affected(db, {"key": row["id"]})
    finally:
        assert await killer == 1
        await db.reconnect()


@pytest.mark.postgres_only
async def test_a_pooled_driver_that_cannot_connect_raises_sqlalchemys_error(
    world: object,
) -> None:
    """A raw checkout raises the driver's own errors; they must reach ``broker.db`` as
    SQLAlchemy's, which answers 503 (not 500)."""
    rt = _rt(world)
    url = rt.autocommit_engine.url.set(database="broker_no_such_database")
    engine = make_engine(url.render_as_string(hide_password=False), autocommit=True)
    try:
        with pytest.raises(DBAPIError):
            await PooledDriver(engine).driver()
    finally:
        await engine.dispose()


@pytest.mark.postgres_only
@pytest.mark.parametrize("autocommit", [True, False])
async def test_the_pool_hands_out_the_connection_used_last(world: object, autocommit: bool) -> None:
    """LIFO: at low load one backend stays warm (caches, prepared statements) instead of
    every request going to the connection idle longest. In the bench's sequential
    phase, after a burst had opened 20 connections, p50 went from 1.77 to 1.49 ms."""
    rt = _rt(world)
    engine = make_engine(
        rt.settings.database_url, autocommit=autocommit, pool_size=3, max_overflow=0
    )
    try:
        taken = [await engine.raw_connection() for _ in range(3)]
        drivers = [c.driver_connection for c in taken]
        for conn in taken:  # back in the order a, b, c
            await greenlet_spawn(conn.close)
        again = await engine.raw_connection()
        assert again.driver_connection is drivers[-1]
        await greenlet_spawn(again.close)
    finally:
        await engine.dispose()
