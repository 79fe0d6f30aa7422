"""``broker ledger verify``: check an export offline, or fetch one from a broker first.

The verification itself (``broker.ledger.verify``) needs only the standard
library and ``cryptography``; fetching over HTTP is a convenience around it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from broker.ledger.verify import print_report, read_text_arg, verify_export


async def _fetch(url: str, client_id: str, key_file: str, out: Path) -> str:
    """Download the whole export as an auditor; returns the broker's published vkey."""
    import httpx

    from broker.sdk import BrokerClient, load_private_jwk

    client = BrokerClient(url, client_id, load_private_jwk(key_file))
    try:
        token = await client.fetch_token()
        async with httpx.AsyncClient(base_url=url, timeout=60.0, trust_env=False) as http:
            key = (await http.get("/v1/ledger/key")).raise_for_status().json()
            headers = {"Authorization": f"Bearer {token}"}
            async with http.stream(
                "GET", "/v1/ledger/export", params={"checkpoints": "all"}, headers=headers
            ) as resp:
                resp.raise_for_status()
                with out.open("wb") as fh:
                    async for chunk in resp.aiter_bytes():
                        fh.write(chunk)
        return str(key["verifier_key"])
    finally:
        await client.aclose()


def verify_command(args: argparse.Namespace) -> int:
    """Print a one-line verdict and every problem found; exit 0 only if all holds."""
    vkey = read_text_arg(args.vkey) if args.vkey else None
    with tempfile.TemporaryDirectory(prefix="broker-ledger-") as tmp:
        export = args.export
        if args.url:
            if not (args.client_id and args.key):
                raise ValueError("--url needs --client-id and --key (an auditor credential)")
            export = str(Path(tmp) / "ledger.jsonl")
            published = asyncio.run(_fetch(args.url, args.client_id, args.key, Path(export)))
            if vkey is None:
                print(
                    "warning: trusting the key the broker publishes; pin it with --vkey",
                    file=sys.stderr,
                )
                vkey = published
        if export is None:
            raise ValueError("give an export file (or - for stdin), or --url")
        if vkey is None:
            raise ValueError("--vkey is required: the note verifier key (GET /v1/ledger/key)")
        trusted = Path(args.checkpoint).read_text(encoding="utf-8") if args.checkpoint else None
        with open(export, "rb") if export != "-" else os.fdopen(0, "rb", closefd=False) as fh:
            report = verify_export(
                fh, vkey, origin=args.origin, trusted_checkpoint=trusted, strict=args.strict
            )
    return print_report(report)
