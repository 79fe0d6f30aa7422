"""Dialect-neutral "insert unless present", used for single-use values."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession


async def insert_if_absent(session: AsyncSession, table: Table, values: dict[str, Any]) -> bool:
    """Insert a row unless its primary key exists; True when this call inserted it.

    ``ON CONFLICT DO NOTHING`` lets two processes race on the same key without a
    savepoint: exactly one of them sees a row count of one.
    """
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    builder = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = builder(table).values(**values).on_conflict_do_nothing()
    result = await session.execute(stmt)
    return bool(getattr(result, "rowcount", 0) == 1)
