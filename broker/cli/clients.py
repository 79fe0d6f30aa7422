"""``broker clients add``, ``token`` and ``demo``: the API's callers, from a shell."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.cli.shared import on_runtime

if TYPE_CHECKING:
    from broker.runtime import Runtime


async def _clients_add(args: argparse.Namespace) -> dict[str, Any]:
    from broker.agencies.service import issue_operator_client
    from broker.auth.roles import Role

    jwks = json.loads(Path(args.jwks).read_text())  # noqa: ASYNC240 - before the loop does work

    async def issue(rt: Runtime) -> dict[str, Any]:
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

    return await on_runtime(issue)


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
