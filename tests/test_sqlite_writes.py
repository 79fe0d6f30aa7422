"""SQLite writers of one process take turns in arrival order (``broker.sqlite_writes``).

The connections here get ``busy_timeout=0``: a writer that met SQLite's lock would
fail at once with "database is locked" instead of napping in the busy handler, so
these tests fail if two writers of the process ever overlap inside SQLite.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from broker import sqlite_writes
from broker.db import make_engine, make_sessionmaker
from broker.sqlite_writes import writers_waiting

WRITERS = 12


def _no_busy_wait(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=0")
    cur.close()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'turns.db'}", pool_size=WRITERS)
    event.listen(engine.sync_engine, "connect", _no_busy_wait)  # after broker.db's own
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (n INTEGER NOT NULL)"))
    yield engine
    await engine.dispose()


async def _write(session: AsyncSession, n: int, hold: float) -> None:
    await session.execute(text("INSERT INTO t (n) VALUES (:n)"), {"n": n})
    await asyncio.sleep(hold)  # keep the write transaction open while others arrive
    await session.commit()


async def _numbers(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        return [row[0] for row in await conn.execute(text("SELECT n FROM t ORDER BY rowid"))]


async def test_concurrent_writers_never_meet_in_sqlite(engine: AsyncEngine) -> None:
    maker = make_sessionmaker(engine)

    async def writer(n: int) -> None:
        async with maker() as session:
            await _write(session, n, hold=0.005)

    await asyncio.wait_for(asyncio.gather(*(writer(n) for n in range(WRITERS))), timeout=10)
    assert sorted(await _numbers(engine)) == list(range(WRITERS))


async def test_writers_go_in_the_order_they_arrived(engine: AsyncEngine) -> None:
    maker = make_sessionmaker(engine)
    holder = maker()
    await holder.execute(text("INSERT INTO t (n) VALUES (-1)"))  # holds the turn
    tasks = []
    for n in range(WRITERS):

        async def writer(n: int = n) -> None:
            async with maker() as session:
                await _write(session, n, hold=0)

        tasks.append(asyncio.create_task(writer()))
        # Let this writer reach the queue before the next one sets off.
        async with asyncio.timeout(10):
            while writers_waiting(engine) < n + 1:  # noqa: ASYNC110 (a count, no event)
                await asyncio.sleep(0.001)
    await holder.commit()
    await holder.close()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    assert await _numbers(engine) == [-1, *range(WRITERS)]


async def test_a_rolled_back_or_failed_writer_hands_on_its_turn(engine: AsyncEngine) -> None:
    maker = make_sessionmaker(engine)

    async def rolls_back() -> None:
        async with maker() as session:
            await session.execute(text("INSERT INTO t (n) VALUES (1)"))
            await asyncio.sleep(0.01)
            await session.rollback()

    async def fails() -> None:
        async with maker() as session:
            await session.execute(text("INSERT INTO t (n) VALUES (2)"))
            raise RuntimeError("the handler failed mid-transaction")

    async def commits() -> None:
        await asyncio.sleep(0.005)
        async with maker() as session:
            await _write(session, 3, hold=0)

    results = await asyncio.wait_for(
        asyncio.gather(rolls_back(), fails(), commits(), return_exceptions=True), timeout=10
    )
    assert isinstance(results[1], RuntimeError)
    assert await _numbers(engine) == [3]
    async with maker() as session:  # and the turn is free again afterwards
        await _write(session, 4, hold=0)
    assert await _numbers(engine) == [3, 4]


async def test_reads_do_not_wait_for_a_writer(engine: AsyncEngine) -> None:
    maker = make_sessionmaker(engine)
    async with maker() as writer, maker() as reader:
        await writer.execute(text("INSERT INTO t (n) VALUES (1)"))
        count = await asyncio.wait_for(reader.scalar(text("SELECT count(*) FROM t")), 2)
        assert count == 0  # the writer has not committed
        await writer.commit()
    assert await _numbers(engine) == [1]


async def test_a_writer_that_waits_too_long_fails_as_locked(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_writes, "WAIT_SECONDS", 0.05)
    maker = make_sessionmaker(engine)
    async with maker() as holder, maker() as late:
        await holder.execute(text("INSERT INTO t (n) VALUES (1)"))
        with pytest.raises(OperationalError, match="database is locked"):
            await late.execute(text("INSERT INTO t (n) VALUES (2)"))
        await holder.commit()
    assert await _numbers(engine) == [1]
