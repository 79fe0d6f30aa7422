"""``broker backup`` and ``broker restore``: a consistent copy of the database, and back.

Why a command and not ``cp``: on SQLite (the default) the database is a file *and* its
write-ahead log. Copied while the broker runs, ``broker.db`` can lack transactions
still in ``broker.db-wal`` -- disclosures already answered, with their ledger entries
-- or be caught mid-checkpoint. SQLite's online backup API copies one consistent
snapshot, and the copy is checked before it is given its name. On PostgreSQL the
command runs ``pg_dump`` (custom format), with the password in the environment, not on
a command line other users can read.

Nothing is ever overwritten: a backup's file must not exist; a restore goes into an
empty PostgreSQL database (in one transaction: all or nothing) or, on SQLite, to a
path that is free, or with ``--replace`` after the files there were renamed aside.

A backup holds no key: back the key folder up apart (together they open held
records). After a restore the ledger is what it was at the backup: entries integrated
since are gone, and an auditor holding a later checkpoint will find the tree
inconsistent with it -- the tamper evidence working as meant. ``restore`` therefore
queues a ``ledger.restored`` entry with the tree size restored to, so the next signed
checkpoint says so. Consent changes made after the backup are lost too, so a grant
revoked since is in force again: ``restore`` places a disclosure hold
(``broker.disclosure.holds``), lifted by ``broker disclosures resume`` once advocates
have recorded those changes again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.request import pathname2url

from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from broker.db import make_engine, make_sessionmaker, redacted_url
from broker.disclosure.holds import RESTORED, place_hold
from broker.ledger.entries import append_operation
from broker.ledger.sequencer import tree_size
from broker.models import ConsentVersion
from broker.schema_version import SchemaBehind, check_schema
from broker.settings import Settings

__all__ = ["BackupError", "Copied", "backup", "restore"]

#: What ``restore`` adds to the ledger, naming the tree size the ledger went back to.
RESTORED_ENTRY = "ledger.restored"
_FILE_MODE = 0o600  # survivors' references and sealed records are in there


class BackupError(RuntimeError):
    """The backup or restore did not happen; nothing was changed."""


@dataclass(frozen=True)
class Copied:
    #: The backup file written, or the database restored into (its URL, credentials hidden).
    where: str
    #: Entries in the ledger's tree: in the copy (SQLite), as the dump began (PostgreSQL),
    #: or as restored.
    tree_size: int
    #: Restore only: files moved aside by ``--replace``, and whether ``broker migrate`` ran.
    moved_aside: tuple[Path, ...] = ()
    migrated: bool = False
    #: Restore only: when the newest consent change the backup holds was recorded.
    #: Revocations and pauses recorded after it are not in the restored database.
    newest_consent_change: datetime | None = None


def backup(settings: Settings, dest: Path) -> Copied:
    """Copy the database at ``settings.database_url`` to ``dest`` (which must not exist)."""
    if dest.exists():
        raise BackupError(f"{dest} exists; a backup never overwrites a file")
    if not dest.parent.is_dir():
        raise BackupError(f"no folder {dest.parent} to write the backup in")
    partial = dest.with_name(dest.name + ".partial")
    _claim(partial)
    try:
        if settings.is_sqlite:
            tree = _sqlite_copy(_sqlite_path(settings), partial, what="database")
        else:
            tree = asyncio.run(_tree_size(settings.database_url))  # the dump has these
            _pg_dump(settings.database_url, partial)
        _publish(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return Copied(str(dest), tree)


def restore(settings: Settings, source: Path, *, replace: bool = False) -> Copied:
    """Put the backup ``source`` where ``settings.database_url`` points, bring its schema
    to this release's if it is behind, and queue the ``ledger.restored`` entry."""
    if not source.is_file():
        raise BackupError(f"no backup file at {source}")
    digest = _sha256(source)
    moved: tuple[Path, ...] = ()
    if settings.is_sqlite:
        target = _sqlite_path(settings)
        if not target.parent.is_dir():
            raise BackupError(f"no folder {target.parent} to restore the database in")
        partial = target.with_name(target.name + ".restoring")
        _claim(partial)
        try:
            _sqlite_copy(source, partial, what="backup")
            moved = _make_room(target, replace)
            _publish(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    else:
        _pg_check_dump(source)
        asyncio.run(_require_empty(settings.database_url))
        _pg_restore(settings.database_url, source)
    try:
        migrated, tree, newest = asyncio.run(_after_restore(settings.database_url, digest))
    except Exception as exc:  # the data is back; say what is left to do
        raise BackupError(
            f"the backup was restored, but bringing it up to date failed ({exc}); run "
            f"`broker migrate`, and tell auditors of the restore: no {RESTORED_ENTRY} "
            "entry was written"
        ) from exc
    return Copied(redacted_url(settings.database_url), tree, moved, migrated, newest)


def _sha256(path: Path) -> str:
    """Names the backup in the ledger entry (an operator's file name is free text)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- files


def _claim(path: Path) -> None:
    """Create ``path`` empty with owner-only access; fail if something is there."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE))
    except FileExistsError:
        raise BackupError(
            f"{path} exists: another backup or restore is running, or one was cut short "
            "(remove the file if none is running)"
        ) from None


def _publish(partial: Path, final: Path) -> None:
    """Give the finished copy its name; a link, so a file that appeared meanwhile stays."""
    try:
        os.link(partial, final)
    except FileExistsError:
        raise BackupError(f"{final} appeared meanwhile; nothing was overwritten") from None


# --------------------------------------------------------------------------- SQLite


def _sqlite_path(settings: Settings) -> Path:
    database = make_url(settings.database_url).database
    if not database or database == ":memory:":
        raise BackupError("an in-memory SQLite database has nothing to back up or restore")
    return Path(database)


def _sqlite_copy(source: Path, dest: Path, *, what: str) -> int:
    """Online backup of ``source`` into the empty file ``dest``, checked; its tree size."""
    if not source.is_file():
        raise BackupError(f"no {what} at {source}")
    uri = f"file:{pathname2url(str(source.resolve()))}?mode=ro"
    try:
        src = sqlite3.connect(uri, uri=True)
        try:
            copy = sqlite3.connect(dest)
            try:
                src.backup(copy)
                # One self-contained file: the copy has no write-ahead log of its own.
                copy.execute("PRAGMA journal_mode=DELETE")
                return _checked(copy, what)
            finally:
                copy.close()
        finally:
            src.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"copying the {what} at {source} failed: {exc}") from None


def _checked(db: sqlite3.Connection, what: str) -> int:
    (integrity,) = db.execute("PRAGMA integrity_check").fetchone()
    if integrity != "ok":
        raise BackupError(f"the {what} fails SQLite's integrity check: {integrity}")
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"alembic_version", "ledger_entries"} <= tables:
        raise BackupError(f"the {what} is not a broker database (no ledger or schema version)")
    (tree,) = db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM ledger_entries").fetchone()
    return int(tree)


def _make_room(target: Path, replace: bool) -> tuple[Path, ...]:
    """Free ``target`` (and its -wal and -shm files) for the restored database."""
    present = [p for p in _with_sidecars(target) if p.exists()]
    if not present:
        return ()
    if not replace:
        raise BackupError(
            f"{target} exists. Stop the broker, then restore with --replace: the database "
            "there (and its -wal and -shm files) is renamed aside, never deleted"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = target.with_name(f"{target.name}.replaced-{stamp}")
    if any(p.exists() for p in _with_sidecars(aside)):
        raise BackupError(f"{aside} exists; try again in a second")
    moved = []
    # SQLite finds a database's log by its name plus -wal: renamed together, the old
    # database still opens whole under its new name.
    for path, new in zip(_with_sidecars(target), _with_sidecars(aside), strict=True):
        if path.exists():
            path.rename(new)
            moved.append(new)
    return tuple(moved)


def _with_sidecars(db: Path) -> tuple[Path, Path, Path]:
    return db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")


# --------------------------------------------------------------------------- PostgreSQL


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(
            f"{name} is not on PATH: install PostgreSQL's client tools, of the server's "
            "major version or newer"
        )
    return found


def _pg_connection(database_url: str) -> tuple[list[str], dict[str, str]]:
    """libpq options and environment for the broker's URL; the password stays off argv."""
    url = make_url(database_url)
    args = ["--no-password"]
    if url.host:
        args += ["--host", url.host]
    if url.port:
        args += ["--port", str(url.port)]
    if url.username:
        args += ["--username", url.username]
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    ssl = url.query.get("ssl") or url.query.get("sslmode")
    if isinstance(ssl, str):
        env["PGSSLMODE"] = ssl  # asyncpg's ssl= takes libpq's sslmode names
    args += ["--dbname", url.database or ""]
    return args, env


def _run(command: list[str], env: dict[str, str], what: str) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        detail = " ".join(done.stderr.strip().splitlines()[-3:]) or f"exit {done.returncode}"
        raise BackupError(f"{what} failed: {detail}")
    return done.stdout


def _pg_dump(database_url: str, dest: Path) -> None:
    args, env = _pg_connection(database_url)
    command = [_pg_tool("pg_dump"), "--format=custom", "--file", str(dest), *args]
    _run(command, env, "pg_dump")
    _pg_check_dump(dest)


def _pg_check_dump(path: Path) -> None:
    """A custom-format dump of a broker database: pg_restore can list it."""
    command = [_pg_tool("pg_restore"), "--list", str(path)]
    try:
        listing = _run(command, dict(os.environ), "pg_restore --list")
    except BackupError as exc:
        raise BackupError(f"{path} is not a backup of a broker database ({exc})") from None
    if "TABLE DATA public ledger_entries" not in listing:
        raise BackupError(f"{path} is not a backup of a broker database")


async def _require_empty(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            count = await conn.scalar(
                text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            )
    except Exception as exc:
        raise BackupError(f"the database to restore into is not reachable: {exc}") from None
    finally:
        await engine.dispose()
    if count:
        raise BackupError(
            "the database to restore into is not empty: create a new one (createdb), point "
            "BROKER_DATABASE_URL at it and restore again"
        )


def _pg_restore(database_url: str, source: Path) -> None:
    args, env = _pg_connection(database_url)
    # One transaction: a failure leaves the database as empty as it was. Owners and
    # grants are the restoring role's; deploy/sql/app_role.sql grants the service's.
    command = [
        _pg_tool("pg_restore"),
        "--single-transaction",
        "--exit-on-error",
        "--no-owner",
        "--no-privileges",
        *args,
        str(source),
    ]
    _run(command, env, "pg_restore")


# --------------------------------------------------------------------------- both


async def _tree_size(database_url: str) -> int:
    engine = make_engine(database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            return await tree_size(session)
    finally:
        await engine.dispose()


async def _after_restore(
    database_url: str, backup_sha256: str
) -> tuple[bool, int, datetime | None]:
    """Bring the schema up if the backup is older than this release, then queue the
    ``ledger.restored`` entry; (whether ``broker migrate`` ran, the tree size, the time
    of the newest consent change restored)."""
    from broker.migrate import upgrade

    engine = make_engine(database_url)
    migrated = False
    try:
        try:
            await check_schema(engine)
        except SchemaBehind:
            await asyncio.to_thread(upgrade, database_url)
            migrated = True
        async with make_sessionmaker(engine)() as session, session.begin():
            tree = await tree_size(session)
            newest = await session.scalar(select(func.max(ConsentVersion.created_at)))
            fields = {"tree_size": tree, "backup_sha256": backup_sha256}
            await append_operation(session, RESTORED_ENTRY, fields)
            await place_hold(session, RESTORED)
    finally:
        await engine.dispose()
    return migrated, tree, newest
