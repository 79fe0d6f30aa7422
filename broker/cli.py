"""The ``broker`` command: serve, migrate, backup, restore, disclosures, keys, clients, token,
demo, ledger."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from broker.settings import Settings

if TYPE_CHECKING:  # imported where used: the command starts without the whole broker
    from sqlalchemy.ext.asyncio import AsyncSession

    from broker.runtime import Runtime
    from broker.subjects.rewrap import RewrapReport

T = TypeVar("T")


def _settings() -> Settings:
    return Settings()


async def _on_runtime(
    work: Callable[[Runtime], Awaitable[T]], settings: Settings | None = None
) -> T:
    """``work`` on a runtime built for one shell command, closed whatever happens."""
    from broker.runtime import build_runtime

    rt = build_runtime(settings or _settings())
    try:
        return await work(rt)
    finally:
        await rt.aclose()


def serve_warnings(settings: Settings, workers: int) -> list[str]:
    """What to tell an operator before serving: set-ups that work, but badly."""
    if settings.is_sqlite and workers > 1:
        return [
            f"warning: {workers} workers on SQLite. Writers take turns inside one process "
            "(broker/sqlite_writes.py) but across processes they wait in SQLite's busy "
            "handler, and under load a few requests wait close to a second. Serve SQLite "
            "with one worker, or use PostgreSQL."
        ]
    return []


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from broker.runtime import load_keys
    from broker.serving import http_protocol

    settings = _settings()
    protocol, protocol_warning = http_protocol()
    for warning in [*serve_warnings(settings, args.workers), protocol_warning]:
        if warning is not None:
            print(warning, file=sys.stderr)
    load_keys(settings)  # generate (dev) or check (production) before any worker starts
    asyncio.run(_schema_up_to_date(settings))  # refuse before any worker starts, too
    uvicorn.run(
        "broker.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        log_config=_log_config(args.log_level),
        access_log=args.access_log,
        proxy_headers=False,
        http=protocol,
    )
    return 0


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, with the broker's own logger at the same level on its handler.

    Without it, what the broker logs below WARNING (keys taken from the folder, the
    sequencer picking up a rotated checkpoint key) went nowhere.
    """
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["broker"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


async def _schema_up_to_date(settings: Settings) -> None:
    """Raise ``SchemaBehind`` (a RuntimeError: one line and exit 2) if migrations are due.

    A database that cannot be reached is left to the workers: they start, answer 503
    and report not ready until it is back.
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    from broker.schema_version import SchemaBehind, check_schema

    engine = create_async_engine(settings.database_url)
    try:
        await check_schema(engine)
    except SchemaBehind:
        raise
    except Exception:  # noqa: S110 - unreachable now; the workers say so
        pass
    finally:
        await engine.dispose()


def cmd_migrate(args: argparse.Namespace) -> int:
    from broker.db import redacted_url
    from broker.db_privileges import grant_to
    from broker.migrate import upgrade

    settings = _settings()
    if args.grant_to is not None and settings.is_sqlite:
        raise ValueError("--grant-to is for PostgreSQL; SQLite has no roles")
    upgrade(settings.database_url)
    print(f"database at head: {redacted_url(settings.database_url)}")
    if args.grant_to is not None:
        role = args.grant_to
        count = asyncio.run(_on_database(lambda session: grant_to(session, role)))
        print(f"{role} may now do what this release needs and nothing else ({count} grants)")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from broker.backup import backup

    settings = _settings()
    done = backup(settings, Path(args.dest))
    print(f"backed up to {done.where} (ledger tree size {done.tree_size})")
    print(
        "the backup holds no key: back the key folder up apart from it "
        f"({settings.key_dir}); together they open the held records",
        file=sys.stderr,
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from broker.backup import RESTORED_ENTRY, restore

    settings = _settings()
    done = restore(settings, Path(args.source), replace=args.replace)
    print(f"restored into {done.where} (ledger tree size {done.tree_size})")
    for path in done.moved_aside:
        print(f"moved aside: {path}", file=sys.stderr)
    if done.migrated:
        print("the backup's schema was older: brought to this release's", file=sys.stderr)
    if done.newest_consent_change is not None:
        print(
            "CONSENT: the newest consent change in this backup was recorded at "
            f"{done.newest_consent_change.isoformat()}. A revocation or pause recorded "
            "after it is NOT in the restored database: the consent it ended is in force "
            "again. Before agencies reach this broker, have advocates record again every "
            "consent change made since (their notes, the revocation notices agencies "
            "received, an auditor's later ledger export list them).",
            file=sys.stderr,
        )
    print(
        "DISCLOSURES ARE ON HOLD: every disclosure request gets 503 until "
        "`broker disclosures resume`, once those consent changes are recorded again.",
        file=sys.stderr,
    )
    print(
        f"queued a {RESTORED_ENTRY} ledger entry. Entries integrated after the backup are "
        "gone: tell auditors the ledger went back to this tree size, since a checkpoint "
        "they hold from after the backup no longer matches. Serve it with a key folder "
        "holding the keys of the backup's time: after `broker keys rewrap-records "
        "--forget-retired`, only a folder (backup) from before that opens its held records.",
        file=sys.stderr,
    )
    return 0


async def _on_database(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """``work`` in one transaction on the configured database; no keys needed."""
    from broker.db import make_engine, make_sessionmaker

    engine = make_engine(_settings().database_url)
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            return await work(session)
    finally:
        await engine.dispose()


def cmd_disclosures(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import IntegrityError

    from broker.disclosure.holds import (
        HOLD_INTERVAL_SECONDS,
        OPERATOR,
        lift_holds,
        place_hold,
        read_holds,
    )

    wait = (
        f"running brokers follow within {HOLD_INTERVAL_SECONDS:g} s"
        if _settings().is_sqlite
        else f"running brokers follow at once, within {HOLD_INTERVAL_SECONDS:g} s at worst"
    )
    if args.action == "hold":
        try:
            placed = asyncio.run(_on_database(lambda s: place_hold(s, OPERATOR)))
        except IntegrityError:  # another operator's hold committed first
            placed = False
        if placed:
            print(f"disclosures on hold: every request gets 503 ({wait})")
        else:
            print("disclosures were already on hold by an operator")
        return 0
    if args.action == "resume":
        lifted = asyncio.run(_on_database(lift_holds))
        for hold in lifted:
            print(f"lifted the {hold.reason} hold (since {hold.placed_at.isoformat()})")
        print(f"disclosures resume ({wait})" if lifted else "no hold was in place")
        return 0
    holds = asyncio.run(_on_database(read_holds))
    for hold in holds:
        print(f"on hold: {hold.reason} (since {hold.placed_at.isoformat()})")
    if not holds:
        print("no hold: disclosures are served")
    return 1 if holds else 0


def cmd_keys_init(_: argparse.Namespace) -> int:
    from broker.crypto.keystore import BrokerKeys

    settings = _settings()
    BrokerKeys.generate(settings.key_dir)
    print(f"broker keys ready in {settings.key_dir} (mode 0600)")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from broker.crypto.keystore import RETIRED_DIR, rotate_records_kek, rotate_signing_key
    from broker.workers import KEY_FOLDER_INTERVAL_SECONDS

    settings = _settings()
    if args.which == "checkpoint":
        return asyncio.run(_rotate_checkpoint_key(args.lost_key))
    if args.lost_key is not None:
        raise ValueError("--lost-key is for the checkpoint key only")
    if args.which == "subject":
        return asyncio.run(_rotate_subject_key(settings))
    if args.which == "records":
        old_id, new_id = rotate_records_kek(settings.key_dir)
        print(f"records key rotated: new key {new_id}")
        print(
            f"the retired key {old_id} is kept in {settings.key_dir / RETIRED_DIR} and still "
            "unwraps. Processes using this folder take the new key when they next need it "
            "(no restart); copy the folder to every other host, then run "
            "`broker keys rewrap-records`",
            file=sys.stderr,
        )
        return 0
    retired, new = rotate_signing_key(settings.key_dir, args.which)
    print(f"{args.which} signing key rotated: new kid {new}")
    print(
        f"the retired key {retired} stays published from {settings.key_dir / RETIRED_DIR}. "
        f"Processes using this folder sign with the new key within "
        f"{KEY_FOLDER_INTERVAL_SECONDS:g} s (no restart); copy the folder to every other "
        "host now"
        + (
            ": until a host has it, tokens issued here are refused there"
            if args.which == "token"
            else ""
        ),
        file=sys.stderr,
    )
    return 0


async def _rotate_subject_key(settings: Settings) -> int:
    """Rotate the subject-commitment key and say so in the ledger: auditors who group
    entries by commitment see where a survivor's commitment changes.

    The database is checked first, so an unreachable or unmigrated one stops the
    command before the key changes.
    """
    from broker.crypto.keystore import RETIRED_DIR, rotate_subject_hmac
    from broker.ledger.entries import record_operation
    from broker.schema_version import SchemaBehind, check_schema
    from broker.workers import KEY_FOLDER_INTERVAL_SECONDS

    async def rotate(rt: Runtime) -> tuple[str, str] | None:
        try:
            await check_schema(rt.engine)
        except SchemaBehind:
            raise  # one line, exit 2
        except Exception as exc:
            print(
                f"error: the database could not be reached ({type(exc).__name__}). "
                "Nothing was rotated",
                file=sys.stderr,
            )
            return None
        old_id, new_id = rotate_subject_hmac(settings.key_dir)
        fields = {"retired_subject_key": old_id, "subject_key": new_id}
        await record_operation(rt.sessionmaker, "keys.subject_key_rotated", fields)
        return old_id, new_id

    rotated = await _on_runtime(rotate, settings)
    if rotated is None:
        return 1
    old_id, new_id = rotated
    print(f"subject-commitment key rotated: new key {new_id}")
    print(
        f"the retired key {old_id} stays in {settings.key_dir / RETIRED_DIR} for good: the "
        "broker finds a survivor's earlier ledger entries with it. Entries from now on "
        "commit under the new key (processes using this folder take it within "
        f"{KEY_FOLDER_INTERVAL_SECONDS:g} s); copy the folder to every other host",
        file=sys.stderr,
    )
    return 0


async def _rotate_checkpoint_key(lost_key: str | None) -> int:
    from sqlalchemy.exc import DBAPIError

    from broker.ledger.checkpoint_key import CheckpointKeyStale, rotate_checkpoint_key
    from broker.ledger.verify import read_text_arg

    settings = _settings()
    lost = read_text_arg(lost_key) if lost_key is not None else None
    try:
        done = await _on_runtime(
            lambda rt: rotate_checkpoint_key(
                rt.sessionmaker, settings.key_dir, settings.ledger_origin, lost_vkey=lost
            ),
            settings,
        )
    except CheckpointKeyStale as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DBAPIError as exc:
        print(
            f"error: the database refused ({type(exc.orig).__name__}); is it reachable and "
            "migrated (`broker migrate`)? Nothing was rotated",
            file=sys.stderr,
        )
        return 1
    if done.resumed:
        print("finished a checkpoint key rotation an earlier run had committed")
    print(f"checkpoint key rotated at tree size {done.tree_size}: new verifier key")
    print(done.new_verifier_key)
    if lost is not None and not done.resumed:
        print(
            f"recovery: the lost key signs nothing past tree size {done.tree_size}, and it could "
            "not vouch for the new one. Auditors who pinned it must be given the new key "
            "out of band (in person, or signed by your organisation) before they trust it",
            file=sys.stderr,
        )
        return 0
    print(
        f"the old key now verifies only checkpoints up to size {done.tree_size}, and its "
        "private half is deleted. Processes using this key folder sign with the new key "
        "from their next batch; copy the folder to every other host that runs the broker "
        "(until then their sequencers wait). Auditors follow the hand-over from "
        "GET /v1/ledger/key or the export; tell them the new key to pin",
        file=sys.stderr,
    )
    return 0


async def _rewrap_records(forget: bool) -> int:
    from broker.crypto.keystore import forget_retired_records_keks, records_kek_id
    from broker.subjects.rewrap import rewrap_data_keys
    from broker.workers import KEY_FOLDER_INTERVAL_SECONDS

    settings = _settings()

    async def rewrap(rt: Runtime) -> tuple[RewrapReport, str]:
        report = await rewrap_data_keys(rt.sessionmaker, rt.keys.records_keks)
        return report, records_kek_id(rt.keys.records_kek)

    report, current = await _on_runtime(rewrap, settings)
    print(
        f"data keys checked {report.checked}: rewrapped {report.rewrapped}, already under "
        f"the current key {report.already_current}, unreadable {report.unreadable}, "
        f"changed meanwhile {report.changed_meanwhile}"
    )
    if report.unreadable:
        print(
            f"error: {report.unreadable} data keys open with no records key in "
            f"{settings.key_dir}; restore the missing key from backup before going on",
            file=sys.stderr,
        )
        return 1
    if not forget:
        print(
            f"all data keys read are under records key {current}. Once every host's key "
            "folder holds this key, run this again with --forget-retired",
            file=sys.stderr,
        )
        return 0
    if not report.done:
        print(
            "not forgetting the retired keys: this pass still rewrapped or skipped some; "
            "run it again (once every host's key folder holds the new key)",
            file=sys.stderr,
        )
        return 1
    gone = forget_retired_records_keks(settings.key_dir)
    print(f"retired records keys deleted: {', '.join(gone) or 'none were left'}")
    print(
        f"processes using this folder drop them from memory within "
        f"{KEY_FOLDER_INTERVAL_SECONDS:g} s; do the same on every other host. Delete old "
        "backups of the key folder too, or they still open the backups of the database "
        "they go with",
        file=sys.stderr,
    )
    return 0


def cmd_keys_rewrap_records(args: argparse.Namespace) -> int:
    return asyncio.run(_rewrap_records(args.forget_retired))


async def _rekey_records() -> int:
    from broker.subjects.rekey import rekey_held_records

    report = await _on_runtime(
        lambda rt: rekey_held_records(
            rt.sessionmaker,
            rt.keys.records_keks,
            progress=lambda r: print(f"... {r.survivors_checked} survivors", file=sys.stderr),
        )
    )
    print(
        f"survivors checked {report.survivors_checked}: given a new data key "
        f"{report.survivors_rekeyed} ({report.records_reencrypted} held records "
        f"re-encrypted), erased meanwhile {report.erased_meanwhile}, left as they were "
        f"because something of theirs opens with no key held {report.unreadable}"
    )
    if not report.done:
        print(
            "error: some survivors were not re-keyed: restore the missing records key from "
            "backup and run this again",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_keys_rekey_records(_: argparse.Namespace) -> int:
    return asyncio.run(_rekey_records())


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from broker.crypto.keystore import generate_agency_keys

    paths = generate_agency_keys(Path(args.out), args.name, enc_curve=args.enc_curve)
    print("created (keep the *.private.jwk.json files secret; register only the *.jwks.json):")
    for p in paths:
        print(f"  {p}")
    return 0


async def _clients_add(args: argparse.Namespace) -> dict[str, Any]:
    from broker.agencies.service import issue_operator_client
    from broker.auth.roles import Role
    from broker.runtime import build_runtime

    jwks = json.loads(Path(args.jwks).read_text())  # noqa: ASYNC240 - before the loop does work
    rt = build_runtime(_settings())
    try:
        async with rt.sessionmaker() as session, session.begin():
            client = await issue_operator_client(
                session,
                rt,
                role=Role(args.role),
                name=args.name,
                jwks=jwks,
                agency_id=args.agency_id,
            )
            return {"client_id": client.id, "agency_id": client.agency_id, "role": client.role}
    finally:
        await rt.aclose()


def cmd_clients_add(args: argparse.Namespace) -> int:
    from broker.errors import BrokerError

    try:
        out = asyncio.run(_clients_add(args))
    except BrokerError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2
    print(out["client_id"])
    print(f"(agency {out['agency_id']}, role {out['role']})", file=sys.stderr)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from broker.sdk import BrokerClient, load_private_jwk

    async def run() -> str:
        client = BrokerClient(args.url, args.client_id, load_private_jwk(args.key))
        try:
            return await client.fetch_token()
        finally:
            await client.aclose()

    print(asyncio.run(run()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from broker.demo import run_demo

    return asyncio.run(run_demo(args.url))


async def _ledger_status() -> int:
    from broker.ledger.status import ledger_status

    status = await _on_runtime(ledger_status)
    print("\n".join(status.lines()))
    if not status.this_folder_signs:
        print(
            "error: this key folder does not hold the checkpoint key the ledger expects: "
            "sequencers using it sign nothing; copy the key folder from where "
            "`broker keys rotate checkpoint` last ran",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_ledger_status(_: argparse.Namespace) -> int:
    return asyncio.run(_ledger_status())


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from broker.ledger.cli import verify_command

    return int(verify_command(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="broker", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the API (uvicorn)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--log-level", default="info")
    s.add_argument("--access-log", action="store_true", help="log request lines (paths only)")
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("migrate", help="bring the database schema to head (alembic)")
    m.add_argument(
        "--grant-to",
        metavar="ROLE",
        help="PostgreSQL: then give ROLE, the role the broker serves as, exactly the grants "
        "this release needs (what deploy/sql/app_role.sql does), revoking any others",
    )
    m.set_defaults(func=cmd_migrate)

    b = sub.add_parser(
        "backup",
        help="a consistent copy of the database, safe while serving (SQLite: online backup; "
        "PostgreSQL: pg_dump); never overwrites, holds no key",
    )
    b.add_argument("dest", help="the backup file to write (must not exist)")
    b.set_defaults(func=cmd_backup)
    r = sub.add_parser(
        "restore",
        help="put a backup back (PostgreSQL: into an empty database; SQLite: the broker "
        "stopped), bring its schema up, and record the restore in the ledger",
    )
    r.add_argument("source", help="a file `broker backup` wrote")
    r.add_argument(
        "--replace",
        action="store_true",
        help="SQLite: rename the database there (and its -wal, -shm) aside first",
    )
    r.set_defaults(func=cmd_restore)

    h = sub.add_parser(
        "disclosures",
        help="hold every disclosure (503) in an incident or after a restore, resume them, "
        "or show the holds (exit 1 while on hold)",
    )
    h.add_argument("action", choices=["hold", "resume", "status"])
    h.set_defaults(func=cmd_disclosures)

    k = sub.add_parser("keys", help="key management").add_subparsers(dest="keys_cmd", required=True)
    ki = k.add_parser("init", help="create the broker's own keys in BROKER_KEY_DIR")
    ki.set_defaults(func=cmd_keys_init)
    kr = k.add_parser(
        "rotate",
        help="replace the broker's token or payload signing key (the old one's public "
        "half stays published so what it signed still verifies) or its records key "
        "(the old one still unwraps until `keys rewrap-records --forget-retired`), its "
        "subject-commitment key (the old one is kept to find earlier ledger entries) or its "
        "ledger checkpoint key (the old one cosigns a hand-over auditors follow)",
    )
    kr.add_argument("which", choices=["token", "payload", "records", "subject", "checkpoint"])
    kr.add_argument(
        "--lost-key",
        metavar="VKEY",
        help="checkpoint only, when its private key is lost: the verifier key it had (text "
        "or @FILE, as GET /v1/ledger/key gave it); the new key alone signs the hand-over",
    )
    kr.set_defaults(func=cmd_keys_rotate)
    kw = k.add_parser(
        "rewrap-records",
        help="after `keys rotate records`, with the new key on every host: rewrap every "
        "survivor's data key under the current records key",
    )
    kw.add_argument(
        "--forget-retired",
        action="store_true",
        help="then, if nothing is left under a retired key, delete the retired records keys",
    )
    kw.set_defaults(func=cmd_keys_rewrap_records)
    kk = k.add_parser(
        "rekey-records",
        help="give every survivor a new data key and re-encrypt her held records under it "
        "(after a database copy may have leaked with a records key); safe while serving",
    )
    kk.set_defaults(func=cmd_keys_rekey_records)
    kg = k.add_parser("generate", help="make an agency's signing and encryption key pairs")
    kg.add_argument("--out", required=True)
    kg.add_argument("--name", default="agency")
    kg.add_argument("--enc-curve", choices=["X25519", "P-256"], default="X25519")
    kg.set_defaults(func=cmd_keys_generate)

    c = sub.add_parser("clients", help="credentials").add_subparsers(
        dest="clients_cmd", required=True
    )
    ca = c.add_parser("add", help="issue a client from the shell (bootstrap the first admin)")
    ca.add_argument("--role", required=True, choices=["admin", "agency", "advocate", "auditor"])
    ca.add_argument("--name", required=True)
    ca.add_argument("--jwks", required=True, help="public JWKS file of the client's signing key")
    ca.add_argument("--agency-id", default=None, help="default: a new 'Broker operations' agency")
    ca.set_defaults(func=cmd_clients_add)

    t = sub.add_parser("token", help="get an access token with a private_key_jwt assertion")
    t.add_argument("--client-id", required=True)
    t.add_argument("--key", required=True, help="the client's private signing JWK file")
    t.add_argument("--url", default="http://127.0.0.1:8000")
    t.set_defaults(func=cmd_token)

    d = sub.add_parser("demo", help="walk through the whole loop against a running broker")
    d.add_argument("--url", default="http://127.0.0.1:8000")
    d.set_defaults(func=cmd_demo)

    lg = sub.add_parser("ledger", help="ledger tools").add_subparsers(
        dest="ledger_cmd", required=True
    )
    lv = lg.add_parser("verify", help="verify a ledger export offline (or fetch it from a broker)")
    lv.add_argument("export", nargs="?", help="JSONL export file, or - for stdin")
    lv.add_argument("--vkey", help="note verifier key text, or @FILE")
    lv.add_argument("--checkpoint", help="a checkpoint note saved earlier (file)")
    lv.add_argument("--origin", default=None)
    lv.add_argument("--url", help="fetch the export from this broker instead of a file")
    lv.add_argument(
        "--strict", action="store_true", help="also check every entry is RFC 8785 canonical"
    )
    lv.add_argument("--client-id")
    lv.add_argument("--key", help="auditor's private signing JWK file (with --url)")
    lv.set_defaults(func=cmd_ledger_verify)
    ls = lg.add_parser(
        "status",
        help="tree size, entries waiting, and whether this key folder may sign checkpoints "
        "(exit 1 if not)",
    )
    ls.set_defaults(func=cmd_ledger_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
