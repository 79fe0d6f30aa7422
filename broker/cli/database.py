"""``broker migrate``, ``backup``, ``restore`` and ``disclosures``: the database as a whole."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from broker.cli.shared import on_database, settings_from_env


def cmd_migrate(args: argparse.Namespace) -> int:
    from broker.db import redacted_url
    from broker.db_privileges import grant_to
    from broker.migrate import upgrade

    settings = settings_from_env()
    if args.grant_to is not None and settings.is_sqlite:
        raise ValueError("--grant-to is for PostgreSQL; SQLite has no roles")
    upgrade(settings.database_url)
    print(f"database at head: {redacted_url(settings.database_url)}")
    if args.grant_to is not None:
        role = args.grant_to
        count = asyncio.run(on_database(lambda session: grant_to(session, role)))
        print(f"{role} may now do what this release needs and nothing else ({count} grants)")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from broker.backup import backup

    settings = settings_from_env()
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

    settings = settings_from_env()
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
        if settings_from_env().is_sqlite
        else f"running brokers follow at once, within {HOLD_INTERVAL_SECONDS:g} s at worst"
    )
    if args.action == "hold":
        try:
            placed = asyncio.run(on_database(lambda s: place_hold(s, OPERATOR)))
        except IntegrityError:  # another operator's hold committed first
            placed = False
        if placed:
            print(f"disclosures on hold: every request gets 503 ({wait})")
        else:
            print("disclosures were already on hold by an operator")
        return 0
    if args.action == "resume":
        lifted = asyncio.run(on_database(lift_holds))
        for hold in lifted:
            print(f"lifted the {hold.reason} hold (since {hold.placed_at.isoformat()})")
        print(f"disclosures resume ({wait})" if lifted else "no hold was in place")
        return 0
    holds = asyncio.run(on_database(read_holds))
    for hold in holds:
        print(f"on hold: {hold.reason} (since {hold.placed_at.isoformat()})")
    if not holds:
        print("no hold: disclosures are served")
    return 1 if holds else 0
