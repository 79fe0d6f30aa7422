"""deploy/: what runs without a Docker engine, run for real.

The image and compose file cannot be built here (no Docker engine); their parts that
are plain programs are: the secrets script, the database's first-start script
against a real PostgreSQL, and the migrate job's ``broker migrate --grant-to``,
after which a broker serves as the role those made.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tomllib
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
import yaml

from broker.app import create_app
from broker.db_privileges import needed_privileges
from broker.settings import Settings
from tests.conftest import PG_ADMIN_DSN, pg_database
from tests.test_app_role import _grants
from tests.test_records_kek_rotation import BIN, shell

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _run(script: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [str(script)], env={**os.environ, **env}, capture_output=True, text=True, check=False
    )


def _make_secrets(folder: Path) -> subprocess.CompletedProcess[str]:
    return _run(DEPLOY / "make-secrets.sh", SECRETS_DIR=str(folder))


def test_make_secrets_writes_owner_only_files_once(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    made = _make_secrets(folder)
    assert made.returncode == 0, made.stderr
    files = {p.name: p for p in folder.iterdir()}
    assert set(files) == {"db_owner_password", "db_app_password", "migrate.env", "broker.env"}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in files.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    owner, app = files["db_owner_password"].read_text(), files["db_app_password"].read_text()
    assert re.fullmatch("[0-9a-f]{48}", owner) and re.fullmatch("[0-9a-f]{48}", app)
    assert owner != app
    assert files["migrate.env"].read_text() == (
        f"BROKER_DATABASE_URL=postgresql+asyncpg://broker_owner:{owner}@db:5432/broker\n"
    )
    assert files["broker.env"].read_text() == (
        f"BROKER_DATABASE_URL=postgresql+asyncpg://broker_app:{app}@db:5432/broker\n"
    )
    again = _make_secrets(folder)
    assert again.returncode == 1 and "nothing was written" in again.stderr
    assert files["db_owner_password"].read_text() == owner  # never overwritten


def test_compose_and_image_name_only_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists() or source in {"./tls"}, (name, source)
    # Grants come after the tables: the first-start scripts may not grant on them.
    init = [v for v in services["db"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert init == ["./db-init:/docker-entrypoint-initdb.d:ro"]
    assert not any("GRANT" in p.read_text() for p in (DEPLOY / "db-init").iterdir())
    assert services["migrate"]["command"] == ["broker", "migrate", "--grant-to", "broker_app"]
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("./secrets/")  # what make-secrets.sh writes
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = set()
    for names in re.findall(r"^COPY (?!--)([^\n]+) \./?\S*$", dockerfile, re.MULTILINE):
        copied.update(names.split())
    assert all((DEPLOY.parent / name).exists() for name in copied), copied
    # The image builds the package from what it copied: every file pyproject names.
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    assert {project["readme"], *project["license-files"], "broker"} <= copied


def test_kubernetes_migrates_with_grants_and_serves_one_worker_per_pod() -> None:
    """One worker per pod keeps uvicorn in one process (no supervisor beside it), which
    is what the pod's memory limit is sized for; the init container keeps grants in step."""
    documents = list(yaml.safe_load_all((DEPLOY / "k8s" / "broker.yaml").read_text()))
    pod = documents[0]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["broker", "migrate", "--grant-to", "broker_app"]
    (broker,) = pod["containers"]
    args = broker["args"]
    assert args[:2] == ["broker", "serve"] and args[args.index("--workers") + 1] == "1"
    assert broker["readinessProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.postgres_only
async def test_first_start_script_and_migrate_job_give_a_role_a_broker_serves_as(
    backend: str, pg_template: str, tmp_path: Path
) -> None:
    """db-init makes the login role on an empty database; the migrate job makes the
    tables and its grants; a broker connected as it is ready and may not rewrite."""
    role = f"broker_app_{uuid.uuid4().hex[:8]}"
    secrets = tmp_path / "secrets"
    assert _make_secrets(secrets).returncode == 0
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        async with pg_database("broker_deploy") as owner_url:  # empty, as on a new volume
            dbname = owner_url.rsplit("/", 1)[1]
            init = _run(
                DEPLOY / "db-init" / "10-app-role.sh",
                POSTGRES_USER="postgres",
                POSTGRES_DB=dbname,
                PGHOST="127.0.0.1",
                APP_ROLE=role,
                APP_PASSWORD_FILE=str(secrets / "db_app_password"),
            )
            assert init.returncode == 0, init.stderr
            row = await admin.fetchrow(
                "SELECT rolcanlogin, rolsuper, rolpassword IS NOT NULL AS has_password "
                "FROM pg_authid WHERE rolname = $1",
                role,
            )
            assert row is not None and dict(row) == {
                "rolcanlogin": True,
                "rolsuper": False,
                "has_password": True,
            }

            migrated = shell(tmp_path, owner_url)("migrate", "--grant-to", role)
            assert migrated.returncode == 0, migrated.stderr
            owner = await asyncpg.connect(owner_url.replace("+asyncpg", "", 1))
            try:
                assert await _grants(owner, role) == set(needed_privileges())
            finally:
                await owner.close()

            app_url = owner_url.replace("://postgres@", f"://{role}@", 1)
            settings = Settings(
                environment="dev",
                database_url=app_url,
                key_dir=tmp_path / "keys",
                run_background_workers=False,
            )
            app = create_app(settings)
            async with (
                app.router.lifespan_context(app),
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://broker.test"
                ) as http,
            ):
                assert (await http.get("/readyz")).status_code == 200
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


def _migrate_together(url: str, role: str, count: int) -> list[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "BROKER_DATABASE_URL": url, "BROKER_ENVIRONMENT": "production"}
    argv = [str(BIN / "broker"), "migrate", "--grant-to", role]
    running = [
        subprocess.Popen(  # noqa: S603
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    done = []
    for process in running:
        out, err = process.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(argv, process.returncode, out, err))
    return done


@pytest.mark.postgres_only
async def test_replicas_migrating_at_once_take_turns(
    backend: str, pg_template: str, tmp_path: Path
) -> None:
    """Three init containers on a new database: one makes the schema, the others find it
    at head; the grants, made three times over, come out the same."""
    role = f"broker_app_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        async with pg_database("broker_deploy") as url:
            runs = _migrate_together(url, role, 3)
            assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr[-500:] for r in runs]
            owner = await asyncpg.connect(url.replace("+asyncpg", "", 1))
            try:
                assert await owner.fetchval("SELECT count(*) FROM alembic_version") == 1
                assert await _grants(owner, role) == set(needed_privileges())
            finally:
                await owner.close()
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()
