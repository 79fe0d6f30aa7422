"""Abuse signals for auditors: who keeps asking about survivors without consent."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from broker.disclosure.schemas import DenialCount, DenialReport
from broker.models import Disclosure

FISHING_REASONS = ("no_grant", "recipient_excluded")


async def denial_report(
    session: AsyncSession, since: datetime, until: datetime, threshold: int
) -> DenialReport:
    unknown = func.sum(case((Disclosure.subject_id.is_(None), 1), else_=0))
    stmt = (
        select(
            Disclosure.requester_agency_id,
            Disclosure.requester_client_id,
            Disclosure.reason,
            func.count(),
            unknown,
            func.min(Disclosure.created_at),
            func.max(Disclosure.created_at),
        )
        .where(
            Disclosure.outcome == "denied",
            Disclosure.created_at >= since,
            Disclosure.created_at < until,
        )
        .group_by(Disclosure.requester_agency_id, Disclosure.requester_client_id, Disclosure.reason)
        .order_by(func.count().desc())
        .limit(1000)
    )
    items = [
        DenialCount(
            agency_id=agency,
            client_id=client,
            reason=reason,
            denials=count,
            unknown_subject=int(unknown_count or 0),
            first_at=first,
            last_at=last,
        )
        for agency, client, reason, count, unknown_count, first, last in (
            await session.execute(stmt)
        ).all()
    ]
    per_client: dict[str, int] = {}
    for item in items:
        if item.reason in FISHING_REASONS:
            per_client[item.client_id] = per_client.get(item.client_id, 0) + item.denials
    flagged = sorted(c for c, n in per_client.items() if n >= threshold)
    return DenialReport(
        since=since, until=until, threshold=threshold, flagged_clients=flagged, items=items
    )
