"""``broker serve`` warns about set-ups that work, but badly."""

from __future__ import annotations

from broker.cli import serve_warnings
from broker.settings import Settings


def test_several_workers_on_sqlite_are_warned_about() -> None:
    settings = Settings(database_url="sqlite+aiosqlite:///./var/broker.db")
    assert serve_warnings(settings, 1) == []
    (warning,) = serve_warnings(settings, 2)
    assert "2 workers on SQLite" in warning and "one worker" in warning


def test_several_workers_on_postgresql_are_fine() -> None:
    settings = Settings(database_url="postgresql+asyncpg://postgres@127.0.0.1:5432/broker")
    assert serve_warnings(settings, 4) == []
