"""Engine construction and the request-scoped session.

The request owns the transaction: ``get_session`` opens it and commits when the
handler returns (before the response is sent, see ``scope="function"`` in
``SessionDep``) or rolls back on any exception. Services only ``flush()``.

On PostgreSQL, reads (GET, HEAD) and routes marked ``@single_statement_writes`` run
on a second pool in autocommit instead: at READ COMMITTED a transaction gives a
sequence of reads no common snapshot anyway, and a write that is one statement is
atomic by itself, so BEGIN and COMMIT would only add two round trips.
The disclosure route goes one step further (``driver_session``): its statements run on
a connection taken straight from that pool, with no ORM session around it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request
from sqlalchemy import event
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, IntegrityError, InvalidatePoolError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.util.concurrency import await_

from broker.errors import (
    BrokerError,
    CommitUnconfirmed,
    Conflict,
    InvalidRequest,
    ServiceUnavailable,
)
from broker.hot_sql import DbSession, OutcomeUnknown, PooledDriver
from broker.sqlite_writes import take_turns_writing

log = logging.getLogger("broker.db")


def redacted_url(url: str) -> str:
    """``url`` for a message: its user and password shown as ``***``."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    return f"{scheme}://***@{netloc.rsplit('@', 1)[1]}{slash}{path}"


def _sqlite_on_connect(dbapi_conn: DBAPIConnection, _: ConnectionPoolEntry) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def advisory_lock_key(label: str) -> int:
    """A PostgreSQL advisory-lock key: the first 8 bytes of SHA-256(``label``), signed,
    so each lock the broker takes has a key of its own."""
    return int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "big", signed=True)


def make_engine(database_url: str, *, autocommit: bool = False, **kwargs: Any) -> AsyncEngine:
    """An engine; ``autocommit`` (PostgreSQL only) runs every statement on its own.

    JSON columns are read with orjson: grants and key sets are read on every disclosure.
    PostgreSQL pools are LIFO: below peak, requests keep to the few connections used
    last, whose backends are warm, instead of cycling through every connection a
    burst opened (unloaded p50 1.77 -> 1.49 ms in the bench). A connection left idle
    at the bottom that the server has closed is found at checkout and replaced.
    """
    kwargs.setdefault("json_deserializer", orjson.loads)
    if database_url.startswith("sqlite"):
        if autocommit:
            raise ValueError("autocommit engines are for PostgreSQL; SQLite has no round trips")
        engine = create_async_engine(database_url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        take_turns_writing(engine)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    kwargs.setdefault("pool_use_lifo", True)
    if autocommit:
        kwargs["isolation_level"] = "AUTOCOMMIT"
    engine = create_async_engine(database_url, **kwargs)
    if not kwargs.get("pool_pre_ping") and engine.dialect.driver == "asyncpg":
        event.listen(engine.sync_engine, "checkout", _begin_on_checkout)
    return engine


def _begin_on_checkout(dbapi_conn: Any, _record: ConnectionPoolEntry, _proxy: Any) -> None:
    """Open the transaction as the pool hands a connection out: BEGIN is the liveness check.

    ``pool_pre_ping`` spends three round trips per request on the asyncpg driver
    (BEGIN, ping, ROLLBACK) before the request's own BEGIN. Every checkout here is
    followed by a transaction anyway, so starting it now proves the connection is
    alive for free. A connection the server closed or left mid-protocol (a
    terminated backend, a restart) fails this BEGIN; the pool then drops every
    connection older than now and opens a fresh one, as pre-ping would. An autocommit
    connection gets no BEGIN: only the driver's own record of a closed socket (the
    server's goodbye on termination or shutdown) is checked, which costs nothing.
    """
    try:
        if dbapi_conn._connection.is_closed():
            raise ConnectionError("closed by the server")
        if dbapi_conn.isolation_level == "autocommit" or dbapi_conn._transaction is not None:
            return
        await_(dbapi_conn._start_transaction())
    except Exception as exc:
        raise InvalidatePoolError(f"pooled connection is dead: {type(exc).__name__}") from exc


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


_SINGLE_STATEMENT = "__broker_single_statement_writes__"
_READS = frozenset({"GET", "HEAD"})
E = TypeVar("E", bound=Callable[..., Any])


def single_statement_writes(endpoint: E) -> E:
    """Mark a route whose every write on PostgreSQL is a single statement.

    Its session then runs in autocommit (no BEGIN, no COMMIT round trip). The mark is
    a promise about the whole route: two writes would no longer be atomic together.
    Write statements go through ``HotStatement(..., writes=True)``, so a connection
    lost while one is in flight is answered as an unknown outcome, never as "nothing
    was changed".
    """
    setattr(endpoint, _SINGLE_STATEMENT, True)
    return endpoint


def _wants_autocommit(request: Request) -> bool:
    if request.method in _READS:
        return True
    return bool(getattr(request.scope.get("endpoint"), _SINGLE_STATEMENT, False))


@contextlib.asynccontextmanager
async def request_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's session: committed when the block ends, rolled back on any error.

    Database errors leave it as problem responses: 409 for a conflict, 503 for the
    rest, and 503 commit-unconfirmed when a commit's outcome cannot be known.
    """
    rt = request.app.state.runtime
    maker: async_sessionmaker[AsyncSession] = (
        rt.autocommit_sessionmaker if _wants_autocommit(request) else rt.sessionmaker
    )
    committing = False
    try:
        # Not ``session.begin()``: hot_sql may swap a stale autocommit connection for a
        # fresh one mid-request (``session.invalidate()``), which that block forbids.
        # Any exception leaves the block, and closing the session rolls back.
        async with maker() as session:
            yield session
            committing = True  # the handler returned
            await session.commit()
    except DBAPIError as exc:
        raise _problem(exc, committing) from None


@contextlib.asynccontextmanager
async def driver_session(request: Request) -> AsyncIterator[DbSession]:
    """For a ``@single_statement_writes`` route: a ``PooledDriver`` on PostgreSQL.

    Every statement of such a route must be a ``HotStatement``. SQLite has no
    round trips to save, so there the route gets ``request_session``. Errors become
    problem responses as there. A connection that saw anything but a clean finish or
    a refusal of the broker's own (``BrokerError``) is dropped, not pooled: a
    statement may still be in flight on it.
    """
    rt = request.app.state.runtime
    if rt.autocommit_engine is rt.engine:
        async with request_session(request) as session:
            yield session
        return
    driver = PooledDriver(rt.autocommit_engine, rt.driver_gate)
    try:
        yield driver
    except DBAPIError as exc:
        await driver.reconnect()
        raise _problem(exc, committing=False) from None
    except BrokerError:
        driver.release_soon()
        raise
    except BaseException:
        await driver.reconnect()
        raise
    driver.release_soon()  # after the answer is written: off the response's path


def _problem(exc: DBAPIError, committing: bool) -> BrokerError:
    """The problem response for a database error that ended a request."""
    if isinstance(exc, IntegrityError):
        return Conflict("The change conflicts with data already stored; nothing was changed.")
    sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
    if sqlstate.startswith("22"):
        # A data exception: a value in the request PostgreSQL cannot hold (a NUL
        # character, a number or date out of range). The statement failed whole.
        log.warning("database refused a value: SQLSTATE %s", sqlstate)
        return InvalidRequest("A value in the request cannot be stored; nothing was changed.")
    if isinstance(exc, OutcomeUnknown) or (committing and exc.connection_invalidated):
        # COMMIT was sent and the connection died before its answer: the server may
        # have committed. Saying "nothing was changed" could be false, so say so;
        # no payload is sent either way (an unconfirmed disclosure over-reports in
        # the ledger, it never under-reports).
        log.warning("commit unconfirmed: connection lost: %s", type(exc.orig).__name__)
        return CommitUnconfirmed(
            "The database connection was lost while committing: the change may or may "
            "not have been stored. Check before retrying (for a disclosure, nothing "
            "was sent; the survivor's accounting shows whether it was recorded)."
        )
    # Connection loss, a refused write, a failed commit: the transaction is gone
    # whole, so the honest answer is "not done, try again" and never a payload.
    log.warning("database error, transaction rolled back: %s", type(exc.orig).__name__)
    return ServiceUnavailable("The database could not record the request; nothing was changed.")


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request_session(request) as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
