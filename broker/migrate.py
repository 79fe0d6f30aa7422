"""Run Alembic migrations programmatically (CLI, tests, bench)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from broker.db import advisory_lock_key
from broker.settings import REPO_ROOT

#: PostgreSQL ``pg_advisory_xact_lock`` key taken by every migration run and every
#: ``--grant-to``.
#: Replicas starting together (Kubernetes init containers) migrate one at a time;
#: the others then find the schema at head. Concurrent GRANTs on one table can
#: fail ("tuple concurrently updated"), so those take turns too.
MIGRATION_LOCK_KEY = advisory_lock_key("consent-broker/schema-migrations")
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(:key)"


def _project_root() -> Path:
    """The checkout when run from source; the working directory in an installed image."""
    return REPO_ROOT if (REPO_ROOT / "alembic.ini").exists() else Path.cwd()


def alembic_config(database_url: str) -> Config:
    root = _project_root()
    cfg = Config(str(root / "alembic.ini"))
    cfg.set_main_option("script_location", str(root / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Blocking: call from synchronous code or a worker thread."""
    command.upgrade(alembic_config(database_url), revision)
