"""``broker serve`` warns about set-ups that work, but badly."""

from __future__ import annotations

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from broker.cli.serve import serve_warnings
from broker.serving import ONE_WRITE_PROTOCOL, http_protocol
from broker.settings import Settings


def test_several_workers_on_sqlite_are_warned_about() -> None:
    settings = Settings(database_url="sqlite+aiosqlite:///./var/broker.db")
    assert serve_warnings(settings, 1) == []
    (warning,) = serve_warnings(settings, 2)
    assert "2 workers on SQLite" in warning and "one worker" in warning


def test_several_workers_on_postgresql_are_fine() -> None:
    settings = Settings(database_url="postgresql+asyncpg://postgres@127.0.0.1:5432/broker")
    assert serve_warnings(settings, 4) == []


def test_the_one_write_protocol_is_served_while_uvicorn_has_what_it_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert http_protocol() == (ONE_WRITE_PROTOCOL, None)
    # A uvicorn release that renamed the hook: its own protocol, with a warning.
    monkeypatch.delattr(HttpToolsProtocol, "on_response_complete")
    protocol, warning = http_protocol()
    assert protocol == "httptools"
    assert warning is not None and "uvicorn's own" in warning
