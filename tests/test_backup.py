"""``broker backup`` and ``broker restore``: a consistent copy, put back whole.

On both backends: a backup taken while the broker serves, restored into a fresh
database, serves what was there at the backup (accounting, held records, a ledger
that verifies) and records the restore in the ledger; nothing is ever overwritten;
a refused restore changes nothing.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from broker.backup import RESTORED_ENTRY, BackupError, backup, restore
from broker.crypto.payload import open_payload
from broker.db import make_engine, redacted_url
from broker.disclosure.holds import RESTORED, lift_holds, refresh_holds
from broker.ledger.checkpoint_key import CheckpointKeyStale, rotate_checkpoint_key
from broker.ledger.sequencer import integrate_pending, integrate_until_empty
from broker.ledger.status import ledger_status
from broker.models import Disclosure
from broker.settings import Settings
from tests.conftest import pg_database
from tests.ledger_check import check_ledger
from tests.support import (
    HELD_RECORD,
    POLICE_ASK,
    Story,
    World,
    broker_process,
    count_rows,
    queued_entries,
    revoke_by_phone,
    runtime_of,
    same_client,
    story_with_held_record,
)
from tests.test_ledger import _vkey
from tests.test_records_kek_rotation import shell


@pytest.fixture
async def empty_target(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """Where a restore may go: a free SQLite path, or a new empty PostgreSQL database."""
    if backend == "sqlite":
        folder = tmp_path / "restored"
        folder.mkdir()
        yield f"sqlite+aiosqlite:///{folder / 'broker.db'}"
        return
    async with pg_database("broker_restore") as url:
        yield url


async def _disclose(s: Story) -> dict[str, Any]:
    resp = await s.officer.post("/v1/disclosures", json=POLICE_ASK)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def test_a_restored_backup_serves_what_was_there_at_the_backup(
    world: World, tmp_path: Path, empty_target: str
) -> None:
    s = await story_with_held_record(world)
    auditor = await world.client(world.ops_agency_id, "auditor", "state oversight")
    before = await _disclose(s)
    await integrate_until_empty(world.rt)
    file = tmp_path / "broker.backup"

    done = await asyncio.to_thread(backup, world.rt.settings, file)  # while serving

    assert done.tree_size > 0 and file.stat().st_mode & 0o777 == 0o600
    after = await _disclose(s)  # not in the backup: lost by the restore
    revoked = await revoke_by_phone(world, s)
    target = world.rt.settings.model_copy(update={"database_url": empty_target})
    restored = await asyncio.to_thread(restore, target, file)
    assert restored.tree_size == done.tree_size and not restored.moved_aside
    assert restored.where.endswith(empty_target.rsplit("/", 1)[1])
    # What the restore warns of: the revocation is lost, and it is after the time given.
    assert restored.newest_consent_change is not None
    assert restored.newest_consent_change < datetime.fromisoformat(revoked["created_at"])

    key_dir = world.rt.settings.key_dir
    async with broker_process(world, key_dir, database_url=empty_target) as (app, http):
        rt = runtime_of(app)
        (entry,) = await queued_entries(rt, RESTORED_ENTRY)
        assert entry["tree_size"] == done.tree_size and len(entry["backup_sha256"]) == 64
        advocate = same_client(s.advocate, http)
        accounting = await advocate.get(f"/v1/subjects/{s.subject_id}/disclosures")
        assert accounting.status_code == 200, accounting.text
        ids = {item["disclosure_id"] for item in accounting.json()["items"]}
        assert before["disclosure_id"] in ids and after["disclosure_id"] not in ids
        # Disclosures are held until an operator resumes them: the revocation came after
        # the backup, so the grant is in force again in the restored database.
        officer = same_client(s.officer, http)
        held = await officer.post("/v1/disclosures", json=POLICE_ASK)
        assert held.status_code == 503 and held.json()["type"].endswith("disclosures-held")
        async with rt.sessionmaker() as session, session.begin():
            assert [h.reason for h in await lift_holds(session)] == [RESTORED]
        await refresh_holds(rt)
        # The held record still opens with the same keys.
        again = await officer.post("/v1/disclosures", json=POLICE_ASK)
        assert again.status_code == 200, again.text
        jwks = (await http.get("/.well-known/jwks.json")).json()
        claims = open_payload(again.json()["payload"], s.police.enc_private, jwks)
        assert claims["data"] == HELD_RECORD
        check = await check_ledger(rt, http, same_client(auditor, http))
        assert check.ok, check
        # The restore, the hold, its lifting and the disclosure.
        assert check.entries == done.tree_size + 4


async def test_a_backup_never_overwrites(world: World, tmp_path: Path) -> None:
    file = tmp_path / "broker.backup"
    file.write_bytes(b"last week's backup")
    with pytest.raises(BackupError, match="never overwrites"):
        await asyncio.to_thread(backup, world.rt.settings, file)
    assert file.read_bytes() == b"last week's backup"
    assert not (tmp_path / "broker.backup.partial").exists()


async def test_a_restore_into_a_database_in_use_changes_nothing(
    world: World, tmp_path: Path
) -> None:
    s = await story_with_held_record(world)
    await _disclose(s)
    file = tmp_path / "broker.backup"
    await asyncio.to_thread(backup, world.rt.settings, file)
    await _disclose(s)
    with pytest.raises(BackupError, match="not empty|exists"):
        await asyncio.to_thread(restore, world.rt.settings, file)
    assert await count_rows(world.rt, Disclosure) == 2
    assert await queued_entries(world.rt, RESTORED_ENTRY) == []


async def test_a_file_that_is_no_broker_backup_is_refused(
    world: World, tmp_path: Path, empty_target: str
) -> None:
    file = tmp_path / "notes.db"
    sqlite3.connect(file).execute("CREATE TABLE notes (body TEXT)").connection.commit()
    target = world.rt.settings.model_copy(update={"database_url": empty_target})
    with pytest.raises(BackupError, match="not a backup of a broker database|not a broker"):
        await asyncio.to_thread(restore, target, file)
    assert await _tables(empty_target) == 0


async def _tables(database_url: str) -> int:
    """Tables in the database (SQLite: 0 when its file was never made)."""
    if database_url.startswith("sqlite"):
        folder = Path(database_url.split("///", 1)[1]).parent
        return len(await asyncio.to_thread(lambda: list(folder.iterdir())))
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            query = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            return int(await conn.scalar(text(query)) or 0)
    finally:
        await engine.dispose()


@pytest.mark.sqlite_only
async def test_sqlite_replace_moves_the_database_aside(world: World, tmp_path: Path) -> None:
    """With the broker stopped, --replace renames the database and its log aside, whole."""
    s = await story_with_held_record(world)
    await _disclose(s)
    file = tmp_path / "broker.backup"
    await asyncio.to_thread(backup, world.rt.settings, file)
    await _disclose(s)  # only in the database that is replaced
    copy = _stopped_copy(world, tmp_path / "stopped")
    target = world.rt.settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{copy}"})

    restored = await asyncio.to_thread(restore, target, file, replace=True)

    aside = restored.moved_aside[0]
    assert aside.name.startswith("broker.db.replaced-")
    with sqlite3.connect(aside) as old, sqlite3.connect(copy) as new:
        assert old.execute("SELECT count(*) FROM disclosures").fetchone() == (2,)
        assert new.execute("SELECT count(*) FROM disclosures").fetchone() == (1,)


@pytest.mark.sqlite_only
async def test_sqlite_backup_has_what_only_the_log_held(world: World, tmp_path: Path) -> None:
    """Committed pages still in broker.db-wal are in the backup; a file copy lacks them."""
    s = await story_with_held_record(world)
    await _disclose(s)
    plain = _stopped_copy(world, tmp_path / "cp", with_log=False)  # `cp broker.db`
    file = tmp_path / "broker.backup"
    await asyncio.to_thread(backup, world.rt.settings, file)
    with sqlite3.connect(plain) as copied, sqlite3.connect(file) as backed_up:
        assert copied.execute("SELECT count(*) FROM disclosures").fetchone() == (0,)
        assert backed_up.execute("SELECT count(*) FROM disclosures").fetchone() == (1,)
        assert backed_up.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def _stopped_copy(world: World, folder: Path, *, with_log: bool = True) -> Path:
    """The SQLite files as a stopped broker leaves them (or broker.db alone)."""
    live = Path(world.rt.settings.database_url.split("///", 1)[1])
    assert Path(f"{live}-wal").stat().st_size > 0  # recent commits are in the log
    folder.mkdir()
    copy = folder / "broker.db"
    for suffix in ("", "-wal", "-shm") if with_log else ("",):
        if Path(f"{live}{suffix}").exists():
            shutil.copyfile(f"{live}{suffix}", f"{copy}{suffix}")
    return copy


def test_backup_and_restore_from_the_shell(tmp_path: Path, database_url: str) -> None:
    broker = shell(tmp_path, database_url)
    assert broker("keys", "init").returncode == 0
    file = tmp_path / "broker.backup"
    made = broker("backup", str(file))
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"backed up to {file} (ledger tree size ")
    assert "holds no key" in made.stderr
    again = broker("backup", str(file))
    assert again.returncode == 2 and "never overwrites" in again.stderr
    into_itself = broker("restore", str(file))
    assert into_itself.returncode == 2, into_itself.stdout
    assert "not empty" in into_itself.stderr or "--replace" in into_itself.stderr


def test_pg_connection_keeps_the_password_off_the_command_line() -> None:
    from broker.backup import _pg_connection

    url = "postgresql+asyncpg://broker_app:s3cret@db.internal:6432/broker?ssl=verify-full"
    args, env = _pg_connection(url)
    assert "s3cret" not in " ".join(args)
    assert env["PGPASSWORD"] == "s3cret" and env["PGSSLMODE"] == "verify-full"
    assert args == [
        "--no-password",
        "--host",
        "db.internal",
        "--port",
        "6432",
        "--username",
        "broker_app",
        "--dbname",
        "broker",
    ]


def test_urls_in_messages_show_no_credentials() -> None:
    """What backup, restore and migrate print: never a user or password."""
    pg = "postgresql+asyncpg://broker_app:p@ss@db.internal:6432/broker?ssl=require"
    assert redacted_url(pg) == "postgresql+asyncpg://***@db.internal:6432/broker?ssl=require"
    for plain in ("sqlite+aiosqlite:///./var/broker.db", "postgresql+asyncpg://db/broker"):
        assert redacted_url(plain) == plain


def test_settings_of_an_in_memory_database_are_refused(tmp_path: Path) -> None:
    settings = Settings(environment="dev", database_url="sqlite+aiosqlite:///:memory:")
    with pytest.raises(BackupError, match="in-memory"):
        backup(settings, tmp_path / "x.backup")
    assert not list(tmp_path.iterdir())


def test_pg_dump_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.backup import _pg_tool

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BackupError, match="pg_dump is not on PATH"):
        _pg_tool("pg_dump")


async def test_a_restore_from_before_a_checkpoint_rotation_hands_over_as_for_a_lost_key(
    world: World, tmp_path: Path, empty_target: str, key_copy: Path
) -> None:
    """The restored ledger knows nothing of the rotation: it waits for the old key, which
    the folder no longer holds, until a recovery hands over to a new one."""
    s = await story_with_held_record(world)
    auditor = await world.client(world.ops_agency_id, "auditor", "state oversight")
    await _disclose(s)
    await integrate_until_empty(world.rt)
    old_key = await _vkey(world)
    file = tmp_path / "broker.backup"
    await asyncio.to_thread(backup, world.rt.settings, file)
    origin = world.rt.settings.ledger_origin
    await rotate_checkpoint_key(world.rt.sessionmaker, key_copy, origin)  # after the backup
    target = world.rt.settings.model_copy(update={"database_url": empty_target})
    await asyncio.to_thread(restore, target, file)

    async with broker_process(world, key_copy, database_url=empty_target) as (app, http):
        rt = runtime_of(app)
        with pytest.raises(CheckpointKeyStale):
            await integrate_pending(rt)  # the restored ledger expects the old key
        status = await ledger_status(rt)
        name, key_id = old_key.split("+")[:2]  # a verifier key: name+keyid+key
        assert status.expected_signer == f"{name}+{key_id}" and not status.this_folder_signs
        done = await rotate_checkpoint_key(rt.sessionmaker, key_copy, origin, lost_vkey=old_key)
        assert done.old_verifier_key == old_key
        check = await check_ledger(rt, http, same_client(auditor, http))
        assert check.ok, check


@pytest.mark.sqlite_only
async def test_the_shell_restore_warns_of_lost_consent_changes(
    world: World, tmp_path: Path
) -> None:
    s = await story_with_held_record(world)
    await _disclose(s)
    file = tmp_path / "broker.backup"
    made = await asyncio.to_thread(
        shell(tmp_path, world.rt.settings.database_url), "backup", str(file)
    )
    assert made.returncode == 0, made.stderr
    (tmp_path / "restored").mkdir()
    elsewhere = shell(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'restored' / 'broker.db'}")
    restored = await asyncio.to_thread(elsewhere, "restore", str(file))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith("restored into sqlite+aiosqlite:///")
    assert "CONSENT: the newest consent change in this backup was recorded at 20" in restored.stderr
    assert "ledger.restored" in restored.stderr
