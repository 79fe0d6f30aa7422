"""``broker ledger status`` and ``verify``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from broker.cli.shared import on_runtime


async def _ledger_status() -> int:
    from broker.ledger.status import ledger_status

    status = await on_runtime(ledger_status)
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
