"""Run Alembic migrations programmatically (CLI, tests, bench)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from broker.settings import REPO_ROOT


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Blocking: call from synchronous code or a worker thread."""
    command.upgrade(alembic_config(database_url), revision)
