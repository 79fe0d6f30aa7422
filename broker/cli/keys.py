"""``broker keys``: make, rotate and rewrap the broker's keys."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from broker.cli.shared import on_runtime, settings_from_env
from broker.settings import Settings

if TYPE_CHECKING:  # imported where used: the command starts without the whole broker
    from broker.runtime import Runtime
    from broker.subjects.rewrap import RewrapReport


def cmd_keys_init(_: argparse.Namespace) -> int:
    from broker.crypto.keystore import BrokerKeys

    settings = settings_from_env()
    BrokerKeys.generate(settings.key_dir)
    print(f"broker keys ready in {settings.key_dir} (mode 0600)")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from broker.crypto.key_rotation import rotate_records_kek, rotate_signing_key
    from broker.crypto.keystore import RETIRED_DIR
    from broker.workers import KEY_FOLDER_INTERVAL_SECONDS

    settings = settings_from_env()
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
    from broker.crypto.key_rotation import rotate_subject_hmac
    from broker.crypto.keystore import RETIRED_DIR
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

    rotated = await on_runtime(rotate, settings)
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

    settings = settings_from_env()
    lost = read_text_arg(lost_key) if lost_key is not None else None
    try:
        done = await on_runtime(
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
    from broker.crypto.key_rotation import forget_retired_records_keks
    from broker.crypto.keystore import records_kek_id
    from broker.subjects.rewrap import rewrap_data_keys
    from broker.workers import KEY_FOLDER_INTERVAL_SECONDS

    settings = settings_from_env()

    async def rewrap(rt: Runtime) -> tuple[RewrapReport, str]:
        report = await rewrap_data_keys(rt.sessionmaker, rt.keys.records_keks)
        return report, records_kek_id(rt.keys.records_kek)

    report, current = await on_runtime(rewrap, settings)
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

    report = await on_runtime(
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
    from broker.crypto.agency_keys import generate_agency_keys

    paths = generate_agency_keys(Path(args.out), args.name, enc_curve=args.enc_curve)
    print("created (keep the *.private.jwk.json files secret; register only the *.jwks.json):")
    for p in paths:
        print(f"  {p}")
    return 0
