"""Disclosure holds: one switch that stops every disclosure, for an operator.

``broker restore`` places one: consent changes made after the backup are lost, so
a grant revoked since would be in force again until an advocate records the
revocation again. ``broker disclosures hold`` places one in an incident: stop
sharing first, investigate after. While any hold is in place, ``POST
/v1/disclosures`` answers 503 before anything is decided, fetched or recorded;
consent changes, deposits, receipts and the ledger go on, so advocates can put
right what the restore lost. ``broker disclosures resume`` lifts the holds.

Each process reads the holds at start and every ``HOLD_INTERVAL_SECONDS``, so a hold
placed while it runs is obeyed within that interval. On PostgreSQL, placing or
lifting a hold also notifies (``NOTIFY``) every process listening, which reads them
at once: in an incident, seconds matter. The notice only wakes the read; a lost
notice (a listening connection cut) costs the interval, never a hold. A process
that has not read the holds yet (its database was unreachable at start) holds: it
fails closed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from broker.errors import ServiceUnavailable
from broker.ledger.entries import append_operation
from broker.models import DisclosureHold

if TYPE_CHECKING:
    from broker.runtime import Runtime

__all__ = [
    "HOLD_INTERVAL_SECONDS",
    "OPERATOR",
    "RESTORED",
    "DisclosuresHeld",
    "Hold",
    "lift_holds",
    "listen_for_holds",
    "place_hold",
    "read_holds",
    "refresh_holds",
    "refresh_holds_or_hold",
    "require_no_hold",
]

log = logging.getLogger("broker.disclosure")

#: How often each process reads the holds (``broker.workers``).
HOLD_INTERVAL_SECONDS = 5.0
#: The PostgreSQL channel a hold's placing or lifting is announced on.
CHANNEL = "broker_disclosure_holds"
#: Reasons: placed by ``broker restore``, or by ``broker disclosures hold``.
RESTORED = "restored"
OPERATOR = "operator"


class DisclosuresHeld(ServiceUnavailable):
    slug = "disclosures-held"
    title = "Disclosures are on hold"


@dataclass(frozen=True)
class Hold:
    reason: str
    placed_at: datetime


async def read_holds(session: AsyncSession) -> list[Hold]:
    rows = await session.execute(
        select(DisclosureHold.reason, DisclosureHold.placed_at).order_by(DisclosureHold.reason)
    )
    return [Hold(reason, placed_at) for reason, placed_at in rows]


async def place_hold(session: AsyncSession, reason: str) -> bool:
    """Hold every disclosure for ``reason``, in the caller's transaction, with a ledger
    entry; False if that hold was already in place."""
    if await session.get(DisclosureHold, reason) is not None:
        return False
    session.add(DisclosureHold(reason=reason))
    await session.flush()  # the next look in this transaction sees it
    await append_operation(session, "disclosures.held", {"reason": reason})
    await _announce(session)
    return True


async def lift_holds(session: AsyncSession, reasons: set[str] | None = None) -> list[Hold]:
    """Lift the holds of ``reasons`` (all if None), each with a ledger entry; those lifted."""
    lifted = [h for h in await read_holds(session) if reasons is None or h.reason in reasons]
    for hold in lifted:
        await session.execute(delete(DisclosureHold).where(DisclosureHold.reason == hold.reason))
        fields = {"reason": hold.reason, "held_since": hold.placed_at.isoformat()}
        await append_operation(session, "disclosures.resumed", fields)
    if lifted:
        await _announce(session)
    return lifted


async def _announce(session: AsyncSession) -> None:
    """PostgreSQL: tell listening processes, when (and only if) the transaction commits."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


async def refresh_holds(rt: Runtime) -> None:
    """Read the holds into ``rt.disclosure_holds``; a failed read keeps what was known."""
    async with rt.sessionmaker() as session:
        reasons = frozenset(h.reason for h in await read_holds(session))
    if reasons != rt.disclosure_holds:
        if reasons:
            log.warning(
                "disclosures on hold (%s): every request gets 503", ", ".join(sorted(reasons))
            )
        elif rt.disclosure_holds:
            log.info("disclosure holds lifted: disclosures resume")
    rt.disclosure_holds = reasons


async def refresh_holds_or_hold(rt: Runtime, *, when: str) -> None:
    """``refresh_holds``; if the read fails, what was known stays (None: held) and the
    log says what to check."""
    try:
        await refresh_holds(rt)
    except Exception as exc:  # the database is down, or the role may not read the table
        log.warning(
            "disclosure holds could not be read %s (%s): every disclosure is held until they "
            "can be (after an upgrade: broker migrate --grant-to ROLE, or "
            "deploy/sql/app_role.sql)",
            when,
            type(exc).__name__,
        )


async def require_no_hold(rt: Runtime) -> None:
    """Raise ``DisclosuresHeld`` if a hold is in place, or not yet known to be absent."""
    if rt.disclosure_holds is None:
        await refresh_holds_or_hold(rt, when="for a request")
    if rt.disclosure_holds is None or rt.disclosure_holds:
        raise DisclosuresHeld(
            "Disclosures are on hold at this broker; nothing was decided or disclosed. "
            "Try again later."
        )


async def listen_for_holds(rt: Runtime) -> None:
    """PostgreSQL: wake the holds loop (``rt.holds_changed``) whenever a hold is placed or
    lifted anywhere; returns only by raising, when the listening connection is lost.

    It has a connection of its own, outside the pools, for as long as the process runs.
    """
    engine = create_async_engine(rt.settings.database_url, poolclass=NullPool)
    lost = asyncio.Event()
    try:
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            driver.add_termination_listener(lambda _conn: lost.set())
            await driver.add_listener(CHANNEL, lambda *_: rt.holds_changed.set())
            rt.holds_changed.set()  # what was committed before LISTEN took hold is read now
            await lost.wait()
            raise ConnectionError("the connection listening for disclosure holds was lost")
    finally:
        await engine.dispose()
