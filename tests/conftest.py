"""Test fixtures: every database test runs on SQLite and on PostgreSQL.

Each backend gets one database migrated by ``alembic upgrade head`` per session;
each test gets its own copy of it (a file copy for SQLite, ``CREATE DATABASE …
TEMPLATE`` for PostgreSQL), so tests commit for real and never see each other.
Set TEST_REQUIRE_POSTGRES=1 (CI does) to turn "PostgreSQL unreachable"
from a visible skip into a failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import asyncpg
import httpx
import pytest

from broker.app import create_app
from broker.crypto.keystore import BrokerKeys
from broker.migrate import upgrade
from broker.settings import Settings
from tests.support import World

PG_ADMIN_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_PG = os.environ.get("TEST_REQUIRE_POSTGRES") == "1"
BASE_URL = "http://broker.test"

T = TypeVar("T")
_pg_state: dict[str, object] = {"passed": 0}


def _pg_url(dbname: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{dbname}"


async def _pg_exec(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _in_thread(fn: Callable[[], T]) -> T:
    """Run blocking set-up (which may call asyncio.run) away from the test event loop."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def _pg_available() -> str | None:
    try:
        _in_thread(lambda: asyncio.run(_pg_exec("SELECT 1")))
    except Exception as exc:  # any failure means "not reachable"
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "broker"
    BrokerKeys.generate(path)
    return path


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("db") / "template.db"
    _in_thread(lambda: upgrade(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    problem = _pg_available()
    if problem is not None:
        message = f"PostgreSQL not reachable at {PG_ADMIN_DSN}: {problem}"
        if REQUIRE_PG:
            pytest.fail(message + " (TEST_REQUIRE_POSTGRES=1)")
        pytest.skip(message)
    name = f"broker_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _in_thread(lambda: asyncio.run(_pg_exec(f'CREATE DATABASE "{name}"')))
    _in_thread(lambda: upgrade(_pg_url(name)))
    yield name
    _in_thread(lambda: asyncio.run(_pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def database_url(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[str]:
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "broker.db"
        shutil.copyfile(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    template_name: str = request.getfixturevalue("pg_template")
    async with pg_database("broker_t", template_name) as url:
        yield url


@contextlib.asynccontextmanager
async def pg_database(prefix: str, template: str | None = None) -> AsyncIterator[str]:
    """A new PostgreSQL database (a copy of ``template``, or empty), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    copy_of = f' TEMPLATE "{template}"' if template else ""
    await _pg_exec(f'CREATE DATABASE "{name}"{copy_of}')
    try:
        yield _pg_url(name)
    finally:
        await _pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(database_url: str, key_dir: Path) -> Settings:
    return Settings(
        environment="dev",
        database_url=database_url,
        key_dir=key_dir,
        public_url=BASE_URL,
        run_background_workers=False,
        denial_quantum_ms=1,  # the grid's path, without 25 ms per denial across the suite
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[object]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(app: object) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


@pytest.fixture
async def world(app: object, http: httpx.AsyncClient, tmp_path: Path) -> World:
    w = World(app, http, tmp_path)  # type: ignore[arg-type]
    await w.bootstrap()
    return w


@pytest.fixture
def key_copy(world: World, tmp_path: Path) -> Path:
    """A copy of the session's key folder, for broker processes whose keys a test rotates."""
    folder = tmp_path / "keys"
    shutil.copytree(world.rt.settings.key_dir, folder)
    return folder


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed and "[postgresql" in report.nodeid:
        _pg_state["passed"] = int(_pg_state["passed"]) + 1  # type: ignore[call-overload]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REQUIRE_PG and session.testscollected and int(_pg_state["passed"]) == 0:  # type: ignore[call-overload]
        session.exitstatus = 1
        print("\nFAIL: TEST_REQUIRE_POSTGRES=1 but no PostgreSQL test passed")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"PostgreSQL-backed tests passed: {_pg_state['passed']}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``postgres_only`` tests are not collected for SQLite at all, nor ``sqlite_only`` ones
    for PostgreSQL (deselected, not skipped)."""
    keep, drop = [], []
    for item in items:
        if (item.get_closest_marker("postgres_only") and "[sqlite" in item.nodeid) or (
            item.get_closest_marker("sqlite_only") and "[postgresql" in item.nodeid
        ):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
