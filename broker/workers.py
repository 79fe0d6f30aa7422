"""Background loops run inside each broker process.

Each loop is safe to run in several processes at once: the sequencer serialises
on a database lock, webhook delivery claims rows with SKIP LOCKED (PostgreSQL)
or runs under SQLite's single writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete

if TYPE_CHECKING:
    from broker.runtime import Runtime

log = logging.getLogger("broker.workers")


async def _loop(
    name: str,
    interval: float,
    step: Callable[[], Awaitable[object]],
    wake: asyncio.Event | None = None,
) -> None:
    failures = idle = 0
    while True:
        try:
            result = await step()
            failures = 0
            # A step that found nothing to do (returns 0) backs off up to 4x, so idle
            # processes do not poll the database 20 times a second.
            idle = idle + 1 if result == 0 else 0
            await _pause(interval * min(2**idle, 4), wake)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a worker must outlive a database restart
            failures += 1
            log.warning("%s: %s (retrying)", name, type(exc).__name__)
            await asyncio.sleep(min(interval * 2**failures, 5.0))


async def _pause(seconds: float, wake: asyncio.Event | None) -> None:
    """Sleep ``seconds``, or less if ``wake`` is set meanwhile (or already)."""
    if wake is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await wake.wait()
    wake.clear()  # before the step: a wake during the step makes the next pause short


async def purge_used_assertions(rt: Runtime) -> None:
    from broker.models import UsedAssertion

    cutoff = datetime.now(UTC) - timedelta(seconds=rt.settings.clock_skew_seconds)
    async with rt.sessionmaker() as session, session.begin():
        await session.execute(delete(UsedAssertion).where(UsedAssertion.expires_at < cutoff))


#: How often each process reads its key folder for rotated keys (``Runtime.reload_keys``).
KEY_FOLDER_INTERVAL_SECONDS = 5.0


async def reload_keys(rt: Runtime) -> None:
    """Take rotated keys from the folder: after ``broker keys rotate token|payload|records|
    subject`` or ``rewrap-records --forget-retired``, every process follows within the
    interval."""
    rt.reload_keys()


def start_workers(rt: Runtime) -> list[asyncio.Task[None]]:
    from broker.disclosure.holds import HOLD_INTERVAL_SECONDS, listen_for_holds, refresh_holds
    from broker.disclosure.notices import deliver_due
    from broker.ledger.sequencer import integrate_until_empty

    Loop = tuple[str, float, Callable[[], Awaitable[object]], asyncio.Event | None]
    loops: list[Loop] = [
        ("webhooks", 1.0, lambda: deliver_due(rt), rt.notices_due),
        ("assertion-purge", 60.0, lambda: purge_used_assertions(rt), None),
        ("key-folder", KEY_FOLDER_INTERVAL_SECONDS, lambda: reload_keys(rt), None),
        ("disclosure-holds", HOLD_INTERVAL_SECONDS, lambda: refresh_holds(rt), rt.holds_changed),
        (
            "sequencer",
            rt.settings.sequencer_interval_seconds,
            lambda: integrate_until_empty(rt),
            None,
        ),
    ]
    if not rt.settings.is_sqlite:
        loops.append(("hold-notices", HOLD_INTERVAL_SECONDS, lambda: listen_for_holds(rt), None))
    return [
        asyncio.create_task(_loop(name, interval, step, wake), name=name)
        for name, interval, step, wake in loops
    ]
