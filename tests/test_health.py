"""Probes and the schema check at start: a broker never serves a database behind its code."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from broker import schema_version
from broker.app import create_app
from broker.migrate import alembic_config
from broker.schema_version import SchemaBehind, code_revisions
from broker.settings import Settings
from tests.support import BASE_URL
from tests.test_faults import (
    _allow_connections_restored,
    _dbname,
    _set_allow_connections,
    _terminate_backends,
)


async def _sql(database_url: str, statement: str) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def _probe(app: object, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        return await http.get(path)


async def test_probes_answer(http: httpx.AsyncClient) -> None:
    live = await http.get("/livez")
    assert (live.status_code, live.json()) == (200, {"status": "alive"})
    ready = await http.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


async def test_a_database_behind_this_code_is_refused_at_start(
    settings: Settings, database_url: str
) -> None:
    revisions = code_revisions()
    assert revisions is not None
    head, _ = revisions
    await asyncio.to_thread(command.downgrade, alembic_config(database_url), "0001")
    app = create_app(settings)
    with pytest.raises(SchemaBehind, match="broker migrate") as refused:
        async with app.router.lifespan_context(app):
            pass
    assert "at 0001" in str(refused.value) and head in str(refused.value)
    await asyncio.to_thread(command.upgrade, alembic_config(database_url), "head")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        assert (await _probe(app, "/readyz")).status_code == 200


async def test_a_database_never_migrated_is_refused_at_start(
    settings: Settings, database_url: str
) -> None:
    await _sql(database_url, "DROP TABLE alembic_version")
    app = create_app(settings)
    with pytest.raises(SchemaBehind, match="never migrated"):
        async with app.router.lifespan_context(app):
            pass


async def test_a_schema_migrated_by_a_newer_release_is_served_with_a_warning(
    settings: Settings, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    future = f"9999_{uuid.uuid4().hex[:8]}"  # a revision this process has not warned of
    await _sql(database_url, f"UPDATE alembic_version SET version_num = '{future}'")
    app = create_app(settings)
    with caplog.at_level(logging.WARNING, logger="broker.schema"):
        async with app.router.lifespan_context(app):
            assert (await _probe(app, "/readyz")).status_code == 200
            assert (await _probe(app, "/readyz")).status_code == 200
    warnings = [r for r in caplog.records if future in r.getMessage()]
    assert len(warnings) == 1  # once, not on every probe


async def test_readyz_turns_not_ready_when_the_schema_falls_behind(
    settings: Settings, database_url: str
) -> None:
    """Say the database was restored from a backup taken before the last migration."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await _sql(database_url, "UPDATE alembic_version SET version_num = '0001'")
        resp = await _probe(app, "/readyz")
        assert resp.status_code == 503
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert "broker migrate" in resp.json()["detail"]


@pytest.mark.postgres_only
async def test_readyz_follows_the_database_going_away_and_coming_back(
    settings: Settings, database_url: str
) -> None:
    app = create_app(settings)
    db = _dbname(database_url)
    async with app.router.lifespan_context(app), _allow_connections_restored(db):
        assert (await _probe(app, "/readyz")).status_code == 200
        await _set_allow_connections(db, False)
        await _terminate_backends(db)
        gone = await _probe(app, "/readyz")
        assert gone.status_code == 503, gone.text
        assert gone.json()["detail"].startswith("The database cannot be reached")
        assert (await _probe(app, "/livez")).status_code == 200  # alive all the same
        await _set_allow_connections(db, True)
        assert (await _probe(app, "/readyz")).status_code == 200


@pytest.mark.postgres_only
async def test_a_database_down_at_start_is_not_fatal(settings: Settings) -> None:
    """A process must not crash-loop while the database restarts: it starts, answers
    /readyz with 503, and serves once the database is back."""
    unreachable = "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"
    app = create_app(settings.model_copy(update={"database_url": unreachable}))
    async with app.router.lifespan_context(app):
        resp = await _probe(app, "/readyz")
        assert resp.status_code == 503
        assert "cannot be reached" in resp.json()["detail"]


async def test_without_migrations_installed_the_schema_goes_unchecked(
    settings: Settings, database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An install whose migrations are not beside it still serves (with a warning) rather
    than never becoming ready; the database is still reached."""
    monkeypatch.setattr(schema_version, "alembic_config", lambda _: _missing_config(tmp_path))
    schema_version.code_revisions.cache_clear()
    try:
        assert schema_version.code_revisions() is None
        await _sql(database_url, "UPDATE alembic_version SET version_num = '0001'")
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            assert (await _probe(app, "/readyz")).status_code == 200
    finally:
        monkeypatch.undo()
        schema_version.code_revisions.cache_clear()


def _missing_config(folder: Path) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(folder / "no-migrations-here"))
    return cfg
