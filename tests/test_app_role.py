"""deploy/sql/app_role.sql: the service role appends to the ledger but cannot rewrite it."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from broker.app import create_app
from broker.db_privileges import missing_privileges, needed_privileges, rewritable_append_only
from broker.ledger.entries import append_entry
from broker.ledger.sequencer import integrate_until_empty
from broker.settings import Settings
from tests.conftest import PG_ADMIN_DSN
from tests.support import (
    POLICE_ASK,
    World,
    broker_process,
    runtime_of,
    same_client,
    story_with_held_record,
)
from tests.test_records_kek_rotation import shell

pytestmark = pytest.mark.postgres_only

SQL = Path(__file__).resolve().parent.parent / "deploy" / "sql" / "app_role.sql"


@contextlib.asynccontextmanager
async def _app_role(database_url: str) -> AsyncIterator[tuple[str, str, asyncpg.Connection]]:
    """A role made by app_role.sql: (its name, the broker's URL as it, the owner's
    connection); dropped afterwards."""
    role = f"broker_app_{uuid.uuid4().hex[:8]}"
    owner_dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    owner = await asyncpg.connect(owner_dsn)
    try:
        await owner.execute(SQL.read_text().replace("broker_app", role))
        yield role, database_url.replace("://postgres@", f"://{role}@", 1), owner
    finally:
        await owner.execute(f'REASSIGN OWNED BY "{role}" TO postgres; DROP OWNED BY "{role}"')
        await owner.close()
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            await admin.close()


async def test_app_role_cannot_rewrite_append_only_tables(
    database_url: str, settings: Settings, world: object
) -> None:
    async with _app_role(database_url) as (role, app_url, _):
        app_dsn = app_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        # The whole service works under the role: start-up, requests, the sequencer.
        app = create_app(settings.model_copy(update={"database_url": app_url}))
        async with app.router.lifespan_context(app):
            rt = app.state.runtime
            async with rt.sessionmaker() as session, session.begin():
                await append_entry(
                    session,
                    hmac_key=rt.keys.subject_hmac,
                    entry_type="test.probe",
                    actor=None,
                    agency_id=None,
                )
            assert await integrate_until_empty(rt) >= 1
        conn = await asyncpg.connect(app_dsn)
        try:
            for table in (
                "ledger_entries",
                "ledger_nodes",
                "ledger_checkpoints",
                "ledger_key_rotations",
                "consent_versions",
            ):
                for sql in (
                    f"UPDATE {table} SET created_at = created_at"
                    if table != "ledger_nodes"
                    else f"UPDATE {table} SET idx = idx",
                    f"DELETE FROM {table}",
                    f"TRUNCATE {table}",
                ):
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.execute(sql)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DROP TABLE ledger_entries")
            assert await conn.fetchval("SELECT count(*) FROM ledger_entries") >= 1
        finally:
            await conn.close()


async def test_a_role_that_cannot_read_the_holds_holds_every_disclosure(
    world: World, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgraded without re-running app_role.sql: the holds cannot be read, so the broker
    holds (fails closed) instead of taking "unread" for "no hold"."""
    s = await story_with_held_record(world)
    async with _app_role(database_url) as (role, app_url, owner):
        await owner.execute(f'REVOKE SELECT ON disclosure_holds FROM "{role}"')
        key_dir = world.rt.settings.key_dir
        async with broker_process(world, key_dir, database_url=app_url) as (app, http):
            assert runtime_of(app).disclosure_holds is None  # its start could not read them
            held = await same_client(s.officer, http).post("/v1/disclosures", json=POLICE_ASK)
            assert held.status_code == 503 and held.json()["type"].endswith("disclosures-held")
            assert runtime_of(app).disclosure_holds is None
            assert (await http.get("/readyz")).status_code == 503  # out of traffic
    assert "disclosure holds could not be read at start" in caplog.text  # what to do next
    assert "deploy/sql/app_role.sql" in caplog.text
    assert "SELECT on disclosure_holds" in caplog.text


async def test_readiness_names_a_grant_the_role_lacks_and_recovers_once_granted(
    world: World, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A grant missing (an upgrade without app_role.sql) keeps the instance out of
    traffic and is named in the log; granting it makes the instance ready, no restart."""
    async with _app_role(database_url) as (role, app_url, owner):
        key_dir = world.rt.settings.key_dir
        async with broker_process(world, key_dir, database_url=app_url) as (app, http):
            assert await missing_privileges(runtime_of(app).engine) == []
            assert (await http.get("/readyz")).status_code == 200

            await owner.execute(f'REVOKE INSERT ON ledger_entries FROM "{role}"')
            await owner.execute(f'REVOKE USAGE ON ALL SEQUENCES IN SCHEMA public FROM "{role}"')
            missing = await missing_privileges(runtime_of(app).engine)
            assert "INSERT on ledger_entries" in missing
            assert any(m.startswith("USAGE on ") for m in missing)
            assert all("ledger_entries" in m or m.startswith("USAGE") for m in missing), missing
            not_ready = await http.get("/readyz")
            assert not_ready.status_code == 503
            assert not_ready.headers["content-type"] == "application/problem+json"
            assert "deploy/sql/app_role.sql" in not_ready.json()["detail"]
            assert "ledger_entries" not in not_ready.text  # a public probe: names go to the log
            assert "INSERT on ledger_entries" in caplog.text

            await owner.execute(SQL.read_text().replace("broker_app", role))
            assert (await http.get("/readyz")).status_code == 200


async def test_production_warns_when_the_role_may_rewrite_the_ledger(
    world: World, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Serving as the owner works but loses a layer against tampering: production says so;
    the role app_role.sql makes is not warned about."""
    key_dir = world.rt.settings.key_dir
    warning = "may rewrite append-only tables"
    async with broker_process(world, key_dir, environment="production") as (app, http):
        assert (await http.get("/readyz")).status_code == 200
    assert warning in caplog.text
    assert "UPDATE on consent_versions" in caplog.text
    caplog.clear()
    async with (
        _app_role(database_url) as (_, app_url, _owner),
        broker_process(world, key_dir, database_url=app_url, environment="production") as (app, _),
    ):
        assert await rewritable_append_only(runtime_of(app).engine) == []
    assert warning not in caplog.text


async def _grants(owner: asyncpg.Connection, role: str) -> set[tuple[str, str]]:
    """(table, privilege) the role holds on the schema's tables, read off their ACLs."""
    rows = await owner.fetch(
        "SELECT c.relname, a.privilege_type FROM pg_class c, aclexplode(c.relacl) a "
        "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r' "
        "AND a.grantee = $1::regrole",
        role,
    )
    return {(r[0], r[1]) for r in rows}


async def test_migrate_grant_to_gives_what_app_role_sql_gives_and_nothing_else(
    database_url: str, tmp_path: Path
) -> None:
    """`broker migrate --grant-to` and app_role.sql agree with the code's own list, and the
    command takes back a grant the role should not have (say UPDATE on the ledger)."""
    other = f"broker_srv_{uuid.uuid4().hex[:8]}"
    broker = shell(tmp_path, database_url)
    async with _app_role(database_url) as (role, _, owner):
        await owner.execute(f'CREATE ROLE "{other}" LOGIN')
        try:
            await owner.execute(f'GRANT UPDATE, DELETE ON ledger_entries TO "{other}"')
            done = broker("migrate", "--grant-to", other)
            assert done.returncode == 0, done.stderr
            assert f"{other} may now do what this release needs" in done.stdout
            needed = set(needed_privileges())
            assert await _grants(owner, other) == needed
            assert await _grants(owner, role) == needed  # app_role.sql's
            again = broker("migrate", "--grant-to", other)  # every upgrade runs it again
            assert again.returncode == 0, again.stderr
            assert await _grants(owner, other) == needed
        finally:
            await owner.execute(f'DROP OWNED BY "{other}"; DROP ROLE "{other}"')


async def test_migrate_grant_to_refuses_an_unknown_role_a_superuser_and_the_owner(
    database_url: str, tmp_path: Path
) -> None:
    broker = shell(tmp_path, database_url)
    unknown = broker("migrate", "--grant-to", "no_such_role_here")
    assert unknown.returncode == 2 and "does not exist: create it first" in unknown.stderr
    superuser = broker("migrate", "--grant-to", "postgres")
    assert superuser.returncode == 2 and "is a superuser" in superuser.stderr
    async with _app_role(database_url) as (role, _, owner):
        await owner.execute(f'ALTER TABLE alembic_version OWNER TO "{role}"')
        try:
            owning = broker("migrate", "--grant-to", role)
            assert owning.returncode == 2 and "is the owner of the tables" in owning.stderr
        finally:
            await owner.execute("ALTER TABLE alembic_version OWNER TO postgres")


async def test_a_role_that_cannot_read_the_schema_version_is_told_so(
    world: World, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without SELECT on alembic_version the schema check fails too; the grant is what the
    log and the probe name, not an unreachable database."""
    async with _app_role(database_url) as (role, app_url, owner):
        await owner.execute(f'REVOKE SELECT ON alembic_version FROM "{role}"')
        key_dir = world.rt.settings.key_dir
        async with broker_process(world, key_dir, database_url=app_url) as (_, http):
            not_ready = await http.get("/readyz")
            assert not_ready.status_code == 503
            assert "lacks privileges" in not_ready.json()["detail"]
    assert "SELECT on alembic_version" in caplog.text
