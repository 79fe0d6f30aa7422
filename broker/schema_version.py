"""Refuse to serve a database whose schema is behind this code.

Code started on a database that ``broker migrate`` has not brought up to date
would fail later and less clearly: a new table missing makes the sequencer retry
for ever while requests still succeed, so the ledger silently stops growing.
A schema *newer* than this code (another release migrated it, as in a rolling
upgrade) is allowed with a warning: migrations only add what older code ignores.
"""

from __future__ import annotations

import functools
import logging

from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.migrate import alembic_config

__all__ = ["SchemaBehind", "check_schema", "code_revisions"]

log = logging.getLogger("broker.schema")


class SchemaBehind(RuntimeError):
    """The database lacks migrations this code needs."""


@functools.cache
def code_revisions() -> tuple[str, frozenset[str]] | None:
    """This code's head revision and every revision it knows (read once per process).

    None, with a warning, where the migrations are not installed beside the code
    (``broker migrate`` could not run from there either): the schema goes unchecked.
    """
    try:
        script = ScriptDirectory.from_config(alembic_config("sqlite://"))
        (head,) = script.get_heads()  # one line of migrations: a branch is a packaging error
        return head, frozenset(s.revision for s in script.walk_revisions())
    except (CommandError, ValueError) as exc:
        log.warning("migrations not found (%s); the database schema is not checked", exc)
        return None


async def database_revision(engine: AsyncEngine) -> str | None:
    """The revision ``broker migrate`` left in the database, None if it never ran."""
    async with engine.connect() as conn:
        try:
            value = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        except DBAPIError:
            if not await _has_version_table(conn):
                return None
            raise
    return None if value is None else str(value)


async def _has_version_table(conn: AsyncConnection) -> bool:
    await conn.rollback()  # PostgreSQL: the failed statement aborted the transaction
    return await conn.run_sync(lambda sync: inspect(sync).has_table("alembic_version"))


async def check_schema(engine: AsyncEngine) -> None:
    """Raise ``SchemaBehind`` unless the database is at this code's head (or newer)."""
    found = await database_revision(engine)  # also proves the database answers
    revisions = code_revisions()
    if revisions is None:
        return
    head, known = revisions
    if found == head:
        return
    if found is None or found in known:
        raise SchemaBehind(
            f"the database schema is at {found or 'no revision (never migrated)'}; this "
            f"broker needs {head}. Run `broker migrate` with the same BROKER_DATABASE_URL, "
            "then start it again"
        )
    if found not in _WARNED:  # once per process, not on every readiness probe
        _WARNED.add(found)
        log.warning(
            "database schema %s is newer than this broker's %s (a newer release migrated "
            "it); serving anyway",
            found,
            head,
        )


_WARNED: set[str] = set()
