"""What the broker's PostgreSQL role may do, checked against what its code needs.

In production the broker connects as a role granted table by table, by
``broker migrate --grant-to`` (``grant_to``) or ``deploy/sql/app_role.sql``. After
an upgrade whose migration adds a table, the grants must be made again; until they
are, whatever touches the new table fails (disclosure holds that cannot be read
hold every disclosure). Checked at start and
on ``/readyz``, a missing grant keeps the instance out of traffic and is named in
the log, instead of surfacing as failed requests. It recovers by itself once the
grants are made. The reverse is checked too: a role that may rewrite the
append-only tables (the schema owner, a superuser) works, but gives up a layer of
tamper resistance, so production warns about it.
"""

from __future__ import annotations

import logging

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.types import Text

from broker.migrate import MIGRATION_LOCK, MIGRATION_LOCK_KEY
from broker.models import APPEND_ONLY_TABLES, Base

__all__ = [
    "MISSING_HINT",
    "grant_to",
    "missing_privileges",
    "needed_privileges",
    "rewritable_append_only",
]

log = logging.getLogger("broker.db")

#: What an operator should do about a missing grant.
MISSING_HINT = (
    "run `broker migrate --grant-to ROLE` or deploy/sql/app_role.sql again as the schema's owner"
)

#: Privileges a role must not hold on the append-only tables (the ledger, consent versions).
REWRITES = ("UPDATE", "DELETE", "TRUNCATE")


def needed_privileges() -> list[tuple[str, str]]:
    """(table, privilege) pairs the service uses, from the ORM's own tables.

    Derived from the models, so a table a later migration adds is checked without
    anyone remembering to list it here.
    """
    pairs = [("alembic_version", "SELECT")]
    for table in sorted(Base.metadata.tables):
        privileges: tuple[str, ...] = ("SELECT", "INSERT")
        if table not in APPEND_ONLY_TABLES:
            privileges += ("UPDATE", "DELETE")
        pairs.extend((table, privilege) for privilege in privileges)
    return pairs


# Whether the role holds each (table, privilege), in the order asked; NULL for a table
# that does not exist (``has_table_privilege`` would raise): the schema check names what
# is missing there. Sequences are the current schema's.
_TABLE_PRIVILEGES = text(
    """
    SELECT t.name, t.privilege,
           CASE WHEN to_regclass(quote_ident(t.name)) IS NULL THEN NULL
                ELSE has_table_privilege(quote_ident(t.name), t.privilege) END
    FROM unnest(:names, :privileges) WITH ORDINALITY AS t(name, privilege, n)
    ORDER BY t.n
    """
).bindparams(bindparam("names", type_=ARRAY(Text)), bindparam("privileges", type_=ARRAY(Text)))
_SEQUENCES_LACKING = text(
    """
    SELECT c.relname, 'USAGE'
    FROM pg_class c
    WHERE c.relnamespace = current_schema()::regnamespace
      AND CASE WHEN c.relkind = 'S' THEN NOT has_sequence_privilege(c.oid, 'USAGE')
               ELSE false END
    ORDER BY c.relname
    """
)


async def _held(conn: AsyncConnection, pairs: list[tuple[str, str]], held: bool) -> list[str]:
    """Of ``pairs``, those the role holds (``held``) or lacks, on tables that exist."""
    params = {"names": [t for t, _ in pairs], "privileges": [p for _, p in pairs]}
    rows = await conn.execute(_TABLE_PRIVILEGES, params)
    return [f"{privilege} on {name}" for name, privilege, has in rows if has is held]


async def missing_privileges(engine: AsyncEngine) -> list[str]:
    """Grants the connected role lacks, as "SELECT on disclosure_holds"; [] if none.

    SQLite has no roles: always [].
    """
    if engine.dialect.name != "postgresql":
        return []
    async with engine.connect() as conn:
        missing = await _held(conn, needed_privileges(), held=False)
        sequences = await conn.execute(_SEQUENCES_LACKING)
    return missing + [f"{privilege} on {name}" for name, privilege in sequences]


async def rewritable_append_only(engine: AsyncEngine) -> list[str]:
    """Rewrites of the append-only tables the connected role may do; [] on SQLite."""
    if engine.dialect.name != "postgresql":
        return []
    pairs = [(table, p) for table in APPEND_ONLY_TABLES for p in REWRITES]
    async with engine.connect() as conn:
        return await _held(conn, pairs, held=True)


_REPORTED: set[tuple[str, ...]] = set()


def report_missing(missing: list[str]) -> None:
    """Log the missing grants, once per process for each distinct set (probes repeat)."""
    key = tuple(missing)
    if key in _REPORTED:
        return
    _REPORTED.add(key)
    log.error(
        "the database role lacks privileges this broker needs: %s; not ready until it has "
        "them (%s)",
        ", ".join(missing),
        MISSING_HINT,
    )


async def check_role_at_start(engine: AsyncEngine, *, production: bool) -> None:
    """Log what the role lacks and, in production, whether it may rewrite the ledger."""
    missing = await missing_privileges(engine)
    if missing:
        report_missing(missing)
    if production:
        rewrites = await rewritable_append_only(engine)
        if rewrites:
            log.warning(
                "the database role may rewrite append-only tables (%s%s): the migration's "
                "triggers still refuse UPDATE and DELETE, but a role that owns the tables "
                "can drop them. Serve as a role of its own (broker migrate --grant-to ROLE, "
                "or deploy/sql/app_role.sql)",
                ", ".join(rewrites[:3]),
                ", …" if len(rewrites) > 3 else "",
            )


async def grant_to(session: AsyncSession, role: str) -> int:
    """Give ``role`` exactly the grants the service needs on the current schema; their count.

    What ``deploy/sql/app_role.sql`` does, but from the code's own list of tables, so
    ``broker migrate --grant-to`` keeps the serving role in step with every migration.
    Everything else the role held on the schema's tables is revoked. The role must
    already exist (its password or certificate is the database administrator's
    business) and must not be the tables' owner, whose rights this would strip.
    """
    if session.get_bind().dialect.name != "postgresql":
        raise ValueError("--grant-to is for PostgreSQL; SQLite has no roles")
    await session.execute(text(MIGRATION_LOCK), {"key": MIGRATION_LOCK_KEY})
    found = (
        await session.execute(
            text(
                "SELECT quote_ident(r.rolname), r.rolsuper, quote_ident(current_schema()), "
                "(SELECT tableowner FROM pg_tables WHERE schemaname = current_schema() "
                "AND tablename = 'alembic_version') FROM pg_roles r WHERE r.rolname = :role"
            ),
            {"role": role},
        )
    ).one_or_none()
    if found is None:
        raise ValueError(
            f"role {role!r} does not exist: create it first (CREATE ROLE {role} LOGIN, with "
            "a password or certificate), then run this again"
        )
    quoted, superuser, schema, owner = found
    if superuser or role == owner:
        raise ValueError(
            f"role {role!r} is {'a superuser' if superuser else 'the owner of the tables'}: "
            "--grant-to names the separate role the broker serves as"
        )
    statements = [
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {quoted}",
        f"GRANT USAGE ON SCHEMA {schema} TO {quoted}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {quoted}",
    ]
    by_table: dict[str, list[str]] = {}
    for table, privilege in needed_privileges():
        by_table.setdefault(table, []).append(privilege)
    statements += [
        f"GRANT {', '.join(privileges)} ON {table} TO {quoted}"
        for table, privileges in by_table.items()
    ]
    for statement in statements:
        await session.execute(text(statement))
    return sum(len(p) for p in by_table.values())
