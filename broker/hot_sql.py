"""Hot-path statements: on PostgreSQL, straight through the session's asyncpg connection.

SQLAlchemy Core spends about 120 µs of Python per execution on top of a ~100 µs
loopback round trip, and the disclosure path runs several statements per
request. On PostgreSQL a ``HotStatement`` therefore runs on the session's own
asyncpg connection -- the same transaction, asyncpg's prepared-statement cache
-- as SQL compiled once from the very Core expression that SQLite runs through
SQLAlchemy, so each query still has one definition. Driver errors are re-raised
as SQLAlchemy's, so ``broker.db.get_session`` answers them as for any other
statement (409 for a constraint, 503 for a lost connection).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import orjson
from sqlalchemy import JSON
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import SQLCompiler

PG_DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


def _json_text(value: Any) -> Any:
    # SQLAlchemy's asyncpg codecs for json/jsonb take the serialised text.
    return None if value is None else orjson.dumps(value).decode()


class HotStatement:
    """One statement, run through the driver on PostgreSQL and through Core elsewhere.

    ``pg`` is an optional PostgreSQL-only variant of ``stmt`` (say ``= ANY(array)``
    for an expanding ``IN``) that must take the same parameters.
    """

    def __init__(self, stmt: Executable, *, pg: Executable | None = None) -> None:
        self.stmt = stmt
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

    async def rows(self, session: AsyncSession, params: Mapping[str, Any]) -> Sequence[Any]:
        """All rows, each indexable and unpackable like a tuple."""
        driver = await session_driver(session)
        if driver is None:
            result = await (await session.connection()).execute(self.stmt, params)
            return result.all()
        try:
            rows: list[Any] = await driver.fetch(self.sql, *self._args(params))
        except _DRIVER_ERRORS as exc:
            raise _translated(self.sql, exc) from exc
        return rows

    async def affected(self, session: AsyncSession, params: Mapping[str, Any]) -> int:
        """Rows changed by an INSERT, UPDATE or DELETE."""
        driver = await session_driver(session)
        if driver is None:
            result = await (await session.connection()).execute(self.stmt, params)
            return int(getattr(result, "rowcount", 0))
        try:
            status: str = await driver.execute(self.sql, *self._args(params))
        except _DRIVER_ERRORS as exc:
            raise _translated(self.sql, exc) from exc
        return int(status.rsplit(" ", 1)[-1])


_DRIVER_KEY = "broker.hot_sql.driver"


async def session_driver(session: AsyncSession) -> asyncpg.Connection | None:
    """The session's asyncpg connection, inside its transaction; None off PostgreSQL.

    Looked up once per transaction: ``session.connection()`` costs a greenlet switch,
    and a transaction keeps one connection for its whole life.
    """
    tx = session.sync_session.get_transaction()
    cached = session.info.get(_DRIVER_KEY)
    if cached is not None and tx is not None and cached[0] is tx and tx.is_active:
        driver: asyncpg.Connection | None = cached[1]
        return driver
    driver = await _lookup_driver(session)
    session.info[_DRIVER_KEY] = (session.sync_session.get_transaction(), driver)
    return driver


async def _lookup_driver(session: AsyncSession) -> asyncpg.Connection | None:
    conn = await session.connection()
    if conn.dialect.name != "postgresql":
        return None
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
        return None  # an adapter this module does not know: stay on Core
    driver: asyncpg.Connection = raw.driver_connection
    return driver


def _is_json(type_: Any) -> bool:
    return isinstance(type_, JSON) or any(
        isinstance(v, JSON) for v in getattr(type_, "_variant_mapping", {}).values()
    )


_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def _translated(sql: str, exc: BaseException) -> DBAPIError:
    """The SQLAlchemy error ``get_session`` would have seen had Core run the statement."""
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return IntegrityError(sql, None, exc)
    return DBAPIError(sql, None, exc)
