"""deploy/sql/app_role.sql: the service role appends to the ledger but cannot rewrite it."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from broker.app import create_app
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
    assert "disclosure holds could not be read at start" in caplog.text  # what to do next
    assert "deploy/sql/app_role.sql" in caplog.text
