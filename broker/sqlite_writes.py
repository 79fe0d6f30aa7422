"""SQLite: a process's writing transactions take turns, first come, first served.

SQLite lets one connection write at a time. A connection that finds the database
locked waits in SQLite's busy handler, which naps and retries (naps growing to
100 ms) in no particular order. Under a burst most writers got through in a few
milliseconds and a few lost race after race: at peak in the bench, disclosures on
SQLite had p50 71 ms and p99 990 ms. Here the writers of one process queue in an
``asyncio.Lock`` before their transaction's first write statement and leave it when
the transaction ends (its connection goes back to the pool), so inside a process
nobody naps in the busy handler. Other processes (a shell command, a second server)
still meet SQLite's own lock and its busy timeout, as before.

Python's ``sqlite3`` opens a transaction at the first INSERT, UPDATE, DELETE or
REPLACE (reads before it run outside any transaction), so that is where the turn
is taken. Code that is not running under SQLAlchemy's asyncio layer (no greenlet)
is left to SQLite's lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.util.concurrency import await_, in_greenlet

__all__ = ["WAIT_SECONDS", "take_turns_writing", "writers_waiting"]

#: As long as the connections' ``busy_timeout``: then the statement fails as locked.
WAIT_SECONDS = 30.0
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")
_HELD = "broker.sqlite_writes.turn"


def _writes(statement: str) -> bool:
    return statement.lstrip()[:7].upper().startswith(_WRITES)


class _Turns:
    """One event loop's queue of writers: a fair lock, and how many wait for it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # fair: the longest waiter goes next
        self.waiting = 0

    async def wait(self) -> None:
        self.waiting += 1
        try:
            async with asyncio.timeout(WAIT_SECONDS):
                await self.lock.acquire()
        except TimeoutError:
            # What SQLite itself says once its busy timeout runs out (the caller answers 503).
            raise sqlite3.OperationalError("database is locked") from None
        finally:
            self.waiting -= 1


#: Each engine's queues, one per event loop (a lock is bound to the loop it waited on).
_QUEUES: weakref.WeakKeyDictionary[Engine, weakref.WeakKeyDictionary[Any, _Turns]] = (
    weakref.WeakKeyDictionary()
)


def writers_waiting(engine: AsyncEngine) -> int:
    """How many of this process's writers wait for their turn on the running loop."""
    queues = _QUEUES.get(engine.sync_engine)
    turns = None if queues is None else queues.get(asyncio.get_running_loop())
    return 0 if turns is None else turns.waiting


def take_turns_writing(engine: AsyncEngine) -> None:
    """Make ``engine``'s writing transactions wait for each other in arrival order."""
    queues = _QUEUES.setdefault(engine.sync_engine, weakref.WeakKeyDictionary())

    def before_execute(
        conn: Connection, _cursor: Any, statement: str, *_args: Any, **_kw: Any
    ) -> None:
        if _HELD in conn.info or not _writes(statement) or not in_greenlet():
            return
        loop = asyncio.get_running_loop()
        turns = queues.get(loop)
        if turns is None:
            turns = queues[loop] = _Turns()
        await_(turns.wait())
        conn.info[_HELD] = turns.lock

    def end_turn(info: dict[Any, Any]) -> None:
        lock = info.pop(_HELD, None)
        if lock is not None:
            lock.release()

    def on_connection_end(_dbapi: Any, record: ConnectionPoolEntry, *_args: Any) -> None:
        end_turn(record.info)

    sync_engine = engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", before_execute)
    # Not the engine's "commit" event: it fires before the COMMIT, and the next writer
    # would then meet SQLite's lock. Sessions hand their connection back as a transaction
    # ends (committed or rolled back), or it is dropped: either ends the turn.
    event.listen(sync_engine.pool, "checkin", on_connection_end)
    event.listen(sync_engine.pool, "invalidate", on_connection_end)
