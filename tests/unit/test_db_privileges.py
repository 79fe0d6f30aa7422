"""The grants the broker checks for are read off its own tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.cli import main
from broker.db_privileges import needed_privileges
from broker.models import APPEND_ONLY_TABLES, Base


def test_every_table_is_checked_and_the_append_only_ones_only_for_reading_and_appending() -> None:
    needed = needed_privileges()
    assert len(needed) == len(set(needed))
    tables = {table for table, _ in needed}
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    assert "disclosure_holds" in tables  # the table migration 0003 added
    for table in APPEND_ONLY_TABLES:
        assert {p for t, p in needed if t == table} == {"SELECT", "INSERT"}
    assert {p for t, p in needed if t == "disclosure_holds"} == {
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
    }
    assert {p for t, p in needed if t == "alembic_version"} == {"SELECT"}


def test_grant_to_on_sqlite_is_refused_before_anything_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "broker.db"
    monkeypatch.setenv("BROKER_DATABASE_URL", f"sqlite+aiosqlite:///{db}")
    assert main(["migrate", "--grant-to", "broker_app"]) == 2
    assert "SQLite has no roles" in capsys.readouterr().err
    assert not db.exists()  # not even migrated
