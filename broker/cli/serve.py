"""``broker serve``: checks made once, before uvicorn starts its workers."""

from __future__ import annotations

import argparse
import asyncio
import copy
import sys
from typing import Any

from broker.cli.shared import settings_from_env
from broker.settings import Settings


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

    settings = settings_from_env()
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
