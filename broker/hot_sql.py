"""Hot-path statements: on PostgreSQL, straight through the session's asyncpg connection.

SQLAlchemy Core spends about 120 µs of Python per execution on top of a ~100 µs
loopback round trip, and the disclosure path runs several statements per
request. On PostgreSQL a ``HotStatement`` therefore runs on the session's own
asyncpg connection -- the same transaction, asyncpg's prepared-statement cache
-- as SQL compiled once from the very Core expression that SQLite runs through
SQLAlchemy, so each query still has one definition. Driver errors are re-raised
as SQLAlchemy's, so ``broker.db.get_session`` answers them as for any other
statement (409 for a constraint, 503 for a lost connection). A write in autocommit
that loses its connection in flight is ``OutcomeUnknown``: it may have committed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import orjson
from sqlalchemy import JSON
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine.interfaces import PoolProxiedConnection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util.concurrency import greenlet_spawn

PG_DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


def _json_text(value: Any) -> Any:
    # SQLAlchemy's asyncpg codecs for json/jsonb take the serialised text.
    return None if value is None else orjson.dumps(value).decode()


class PooledDriver:
    """A PostgreSQL autocommit connection from the pool, with no ORM session around it.

    For routes whose every statement is a ``HotStatement`` (the disclosure route). An
    ``AsyncSession`` with its transaction and ``Connection`` objects cost about a tenth
    of a disclosure's CPU. Because those objects refer to each other, only the cycle
    collector frees them, and its pauses grew with them. A connection is taken at the
    first statement; ``commit()`` hands it back (in autocommit there is nothing to
    commit), and the next statement takes one again.
    """

    def __init__(self, engine: AsyncEngine, gate: asyncio.Semaphore | None = None) -> None:
        self._engine = engine
        self._pooled: PoolProxiedConnection | None = None
        self._gate = gate
        self._through_gate = False

    async def driver(self) -> asyncpg.Connection:
        if self._pooled is None:
            await self._pass_gate()
            # The pool's checkout listener (broker.db) replaces a connection found closed.
            # Unlike a session's, a raw checkout raises the driver's own errors (say, the
            # database refusing connections): they become SQLAlchemy's, as for a session.
            try:
                self._pooled = await self._engine.raw_connection()
            except BaseException as exc:
                self._leave_gate()
                if isinstance(exc, Exception):
                    raise _translated("connect", exc) from exc
                raise
        driver: asyncpg.Connection = self._pooled.driver_connection
        return driver

    async def _pass_gate(self) -> None:
        """Wait in line for a connection: first come, first served.

        The pool's own wait is an ``asyncio.Queue``, which lets a newcomer take a
        connection handed back while the longest waiter is being woken. With
        ``release_soon`` the hand-back runs in the same turn as newly arrived requests,
        so under overload some requests lost every race: p99 at peak went from 46 to
        250 ms. ``asyncio.Semaphore`` (3.11.1+) lets nobody past a waiter, and a gate
        as wide as the pool means the pool itself never makes a driver wait.
        """
        if self._gate is None or self._through_gate:
            return
        if not self._gate.locked():
            await self._gate.acquire()  # free and nobody waiting: returns at once
        else:
            try:
                async with asyncio.timeout(GATE_TIMEOUT_SECONDS):
                    await self._gate.acquire()
            except TimeoutError:
                waited = TimeoutError("no database connection came free in time")
                raise _translated("connect", waited) from None
        self._through_gate = True

    def _leave_gate(self) -> None:
        if self._through_gate:
            self._through_gate = False
            assert self._gate is not None
            self._gate.release()

    async def reconnect(self) -> None:
        """Drop the connection (closed, not pooled); the next statement takes a new one."""
        pooled, self._pooled = self._pooled, None
        try:
            if pooled is not None:
                await _drop(pooled)
        finally:
            self._leave_gate()

    async def commit(self) -> None:
        """Hand the connection back to the pool: each statement committed on its own.

        Nothing is left to lose by then, so a connection that cannot be pooled again
        is dropped instead of failing a request whose work is done.
        """
        pooled, self._pooled = self._pooled, None
        try:
            if pooled is not None:
                try:
                    await greenlet_spawn(pooled.close)
                except Exception:
                    await _drop(pooled)
        finally:
            self._leave_gate()

    def release_soon(self) -> None:
        """``commit()`` on the event loop's next turn, for a driver whose work is done.

        Handing a connection back costs a greenlet switch and the pool's bookkeeping.
        Scheduled from the end of a request, it runs after the request's task has
        written the answer, so none of it sits between the last statement and the
        client.
        """
        if self._pooled is None:
            return
        task = asyncio.get_running_loop().create_task(self.commit())
        _RELEASING.add(task)  # the loop holds tasks weakly
        task.add_done_callback(_RELEASING.discard)


_RELEASING: set[asyncio.Task[None]] = set()
#: As long as SQLAlchemy's own pool timeout (its default): then the request gets a 503.
GATE_TIMEOUT_SECONDS = 30.0


async def _drop(pooled: PoolProxiedConnection) -> None:
    """Close a connection and keep it out of the pool; a dead one may fail to close."""
    with contextlib.suppress(Exception):
        await greenlet_spawn(pooled.invalidate)


#: What hot-path statements run on: an ORM session, or (PostgreSQL) a pooled driver.
DbSession = AsyncSession | PooledDriver


class HotStatement:
    """One statement, run through the driver on PostgreSQL and through Core elsewhere.

    ``pg`` is an optional PostgreSQL-only variant of ``stmt`` (say ``= ANY(array)``
    for an expanding ``IN``) that must take the same parameters.
    """

    def __init__(
        self, stmt: Executable, *, pg: Executable | None = None, writes: bool = False
    ) -> None:
        self.stmt = stmt
        self.writes = writes
        compiled = (pg if pg is not None else stmt).compile(dialect=PG_DIALECT)  # type: ignore[attr-defined]
        assert isinstance(compiled, SQLCompiler)
        self.sql = str(compiled)
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        binds = {name: bp for bp, name in compiled.bind_names.items()}
        # Literal values SQLAlchemy bound itself (``uses + 1``) travel as parameters too.
        self.fixed = {n: binds[n].value for n in self.names if n in binds and not binds[n].required}
        self.json = frozenset(n for n in self.names if n in binds and _is_json(binds[n].type))

    def _args(self, params: Mapping[str, Any]) -> list[Any]:
        args = []
        for name in self.names:
            value = self.fixed[name] if name in self.fixed else params[name]
            args.append(_json_text(value) if name in self.json else value)
        return args

    async def rows(self, session: DbSession, params: Mapping[str, Any]) -> Sequence[Any]:
        """All rows, each indexable and unpackable like a tuple."""
        driver = await session_driver(session)
        if driver is None:
            assert isinstance(session, AsyncSession)
            result = await (await session.connection()).execute(self.stmt, params)
            return result.all()
        rows: list[Any] = await self._on_driver(session, driver, "fetch", self._args(params))
        return rows

    async def affected(self, session: DbSession, params: Mapping[str, Any]) -> int:
        """Rows changed by an INSERT, UPDATE or DELETE."""
        driver = await session_driver(session)
        if driver is None:
            assert isinstance(session, AsyncSession)
            result = await (await session.connection()).execute(self.stmt, params)
            return int(getattr(result, "rowcount", 0))
        status: str = await self._on_driver(session, driver, "execute", self._args(params))
        return int(status.rsplit(" ", 1)[-1])

    async def _on_driver(
        self, session: DbSession, driver: asyncpg.Connection, method: str, args: list[Any]
    ) -> Any:
        """Run on the driver; once more on a fresh connection if a stale one refused it.

        An autocommit connection gets no BEGIN at checkout (``broker.db``), so a
        connection whose backend was terminated a moment ago can still be handed out:
        the driver has read the server's goodbye but not yet the closed socket, or not
        even the goodbye. With no transaction to lose, a statement the driver refused
        before sending, or a read whose connection died, runs again on a new connection.
        A write that may have reached the server never does (``_failure``).
        """
        was_open = not driver.is_closed()
        try:
            return await getattr(driver, method)(self.sql, *args)
        except _DRIVER_ERRORS as exc:
            autocommit = _autocommit(session)
            again = autocommit and (
                _refused_locally(was_open, exc) or (not self.writes and _connection_lost(exc))
            )
            if not (again and await _reconnect(session)):
                raise self._failure(autocommit, was_open, exc) from exc
        driver = await session_driver(session)
        assert driver is not None
        was_open = not driver.is_closed()
        try:
            return await getattr(driver, method)(self.sql, *args)
        except _DRIVER_ERRORS as exc:
            raise self._failure(_autocommit(session), was_open, exc) from exc

    def _failure(self, autocommit: bool, was_open: bool, exc: BaseException) -> Exception:
        """The SQLAlchemy error for a failed execution, telling a lost outcome apart.

        A write outside a transaction commits on its own as the server finishes it.
        If the connection dies once the statement may have reached the server, or the
        server ends the session (class 57P: shutdown, termination) instead of
        answering, the write may have committed.
        """
        if self.writes and autocommit and not _never_sent(was_open, exc):
            definite = isinstance(exc, asyncpg.PostgresError) and not _connection_lost(exc)
            if not definite:
                return OutcomeUnknown(self.sql, None, exc)
        return _translated(self.sql, exc)


_DRIVER_KEY = "broker.hot_sql.driver"


async def session_driver(session: DbSession) -> asyncpg.Connection | None:
    """The session's asyncpg connection, inside its transaction; None off PostgreSQL.

    Looked up once per transaction: ``session.connection()`` costs a greenlet switch,
    and a transaction keeps one connection for its whole life.
    """
    if isinstance(session, PooledDriver):
        return await session.driver()
    tx = session.sync_session.get_transaction()
    cached = session.info.get(_DRIVER_KEY)
    if cached is not None and tx is not None and cached[0] is tx and tx.is_active:
        driver: asyncpg.Connection | None = cached[1]
        return driver
    driver, autocommit = await _lookup_driver(session)
    session.info[_DRIVER_KEY] = (session.sync_session.get_transaction(), driver, autocommit)
    return driver


def _autocommit(session: DbSession) -> bool:
    """Whether the session's current connection runs each statement on its own."""
    if isinstance(session, PooledDriver):
        return True
    cached = session.info.get(_DRIVER_KEY)
    return bool(cached and cached[2])


async def _lookup_driver(session: AsyncSession) -> tuple[asyncpg.Connection | None, bool]:
    conn = await session.connection()
    if conn.dialect.name != "postgresql":
        return None, False
    raw = await conn.get_raw_connection()
    adapter = raw.dbapi_connection
    # SQLAlchemy's adapter issues BEGIN lazily, at its own first statement (unless
    # broker.db began at checkout). A statement sent straight to the driver before
    # that would run in autocommit and survive a rollback: open the transaction first.
    if getattr(adapter, "_transaction", False) is None:
        if getattr(adapter, "isolation_level", None) != "autocommit":
            try:
                await adapter._start_transaction()  # type: ignore[union-attr]
            except Exception as exc:  # the adapter's own PEP 249 error classes
                raise _translated("BEGIN", exc) from exc
    elif not hasattr(adapter, "_transaction"):
        return None, False  # an adapter this module does not know: stay on Core
    driver: asyncpg.Connection = raw.driver_connection
    return driver, getattr(adapter, "isolation_level", None) == "autocommit"


def _is_json(type_: Any) -> bool:
    return isinstance(type_, JSON) or any(
        isinstance(v, JSON) for v in getattr(type_, "_variant_mapping", {}).values()
    )


_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)


def _never_sent(was_open: bool, exc: BaseException) -> bool:
    """The driver raised before writing a byte of the statement.

    ``InterfaceError`` and its subclasses (closed, another operation in progress, a
    value it cannot encode) and the protocol's "cannot switch to state" are raised
    before anything is written.
    """
    if not was_open or isinstance(exc, asyncpg.InterfaceError):
        return True
    return isinstance(exc, asyncpg.InternalClientError) and str(exc).startswith(
        "cannot switch to state"
    )


def _refused_locally(was_open: bool, exc: BaseException) -> bool:
    """Never sent, because of the connection's state: a fresh connection may succeed.

    A value the driver cannot encode (its ``ValueError`` subclasses) would fail on
    any connection.
    """
    return _never_sent(was_open, exc) and not isinstance(exc, ValueError)


def _connection_lost(exc: BaseException) -> bool:
    """The connection died (class 08, or the server ended the session: 57P)."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "").startswith(("08", "57P"))
    return True


async def _reconnect(session: DbSession) -> bool:
    """Give an autocommit session a fresh connection, if it holds nothing to lose."""
    if isinstance(session, PooledDriver):
        await session.reconnect()
        return True
    if session.identity_map or session.new or session.dirty or session.deleted:
        return False
    await session.invalidate()
    return True


class OutcomeUnknown(DBAPIError):
    """A single-statement write lost its connection in flight: it may have committed."""


def _translated(sql: str, exc: BaseException) -> DBAPIError:
    """The SQLAlchemy error ``get_session`` would have seen had Core run the statement."""
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return IntegrityError(sql, None, exc)
    return DBAPIError(sql, None, exc)
