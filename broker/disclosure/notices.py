"""Revocation notices: queued in the revoking transaction, delivered by a worker.

The outbox row is written with the revocation itself, so a crash or a webhook
that is down loses nothing; the worker retries with exponential backoff and
jitter until a 2xx, or gives up after ``webhook_max_attempts`` (state visible to
the advocate on the grant's notices).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from broker.crypto.payload import sign_claims
from broker.crypto.randomness import random_id
from broker.models import (
    Agency,
    ConsentGrant,
    ConsentVersion,
    Disclosure,
    SubjectReference,
    WebhookDelivery,
)
from broker.runtime import Runtime

log = logging.getLogger("broker.notices")
NOTICE_TYP = "revocation-notice+jwt"


async def queue_revocation_notices(
    session: AsyncSession, rt: Runtime, grant: ConsentGrant, version: ConsentVersion
) -> int:
    """One notice per agency that received data under the grant and has a webhook."""
    rows = (
        await session.execute(
            select(Disclosure.requester_agency_id, Disclosure.id).where(
                Disclosure.grant_id == grant.id, Disclosure.outcome == "permitted"
            )
        )
    ).all()
    by_agency: dict[str, list[str]] = {}
    for agency_id, disclosure_id in rows:
        by_agency.setdefault(agency_id, []).append(disclosure_id)
    queued = 0
    for agency_id, disclosure_ids in sorted(by_agency.items()):
        agency = await session.get(Agency, agency_id)
        if agency is None or not agency.webhook_url:
            continue
        ref = await session.scalar(
            select(SubjectReference.reference).where(
                SubjectReference.subject_id == grant.subject_id,
                SubjectReference.agency_id == agency_id,
            )
        )
        claims = {
            "iss": rt.settings.issuer,
            "aud": agency_id,
            "event": "consent.revoked",
            "grant_id": grant.id,
            "grant_version": version.version,
            "subject_ref": ref,
            "disclosure_ids": sorted(disclosure_ids),
            "data_life_days": version.data_life_days,
            "instruction": "Stop using the data disclosed under this grant; "
            "delete it per data_life_days.",
            "iat": int(time.time()),
            "jti": random_id(),
        }
        session.add(
            WebhookDelivery(
                agency_id=agency_id,
                grant_id=grant.id,
                grant_version=version.version,
                event="consent.revoked",
                body=sign_claims(claims, rt.keys.payload_signing, typ=NOTICE_TYP),
                status="pending",
                attempts=0,
                disclosure_ids=sorted(disclosure_ids),
                next_attempt_at=datetime.now(UTC),
            )
        )
        queued += 1
    if queued:
        # After the commit, not now: woken earlier, the loop would find nothing yet.
        event.listen(session.sync_session, "after_commit", _wake(rt), once=True)
    return queued


def _wake(rt: Runtime) -> Callable[[Session], None]:
    def wake(_: Session) -> None:
        rt.notices_due.set()

    return wake


def backoff_seconds(attempts: int) -> float:
    base: float = min(2.0**attempts, 3600.0)
    return base * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not security


async def deliver_due(rt: Runtime, limit: int = 20) -> int:
    """Try each due notice once; returns how many were attempted."""
    now = datetime.now(UTC)
    async with rt.sessionmaker() as session, session.begin():
        stmt = (
            select(WebhookDelivery, Agency.webhook_url)
            .join(Agency, Agency.id == WebhookDelivery.agency_id)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        )
        if not rt.settings.is_sqlite:
            stmt = stmt.with_for_update(of=WebhookDelivery, skip_locked=True)
        due = (await session.execute(stmt)).all()
        for delivery, url in due:
            await _attempt(rt, delivery, url)
        return len(due)


_WEBHOOK_TIMEOUT = httpx.Timeout(5.0)


async def _attempt(rt: Runtime, delivery: WebhookDelivery, url: str | None) -> None:
    delivery.attempts += 1
    outcome = "no webhook registered"
    ok = False
    if url:
        try:
            # Only the status matters: the body is never read (nor buffered).
            async with rt.http.post(
                url,
                delivery.body.encode(),
                {"Content-Type": "application/jose"},
                timeout=_WEBHOOK_TIMEOUT,
            ) as resp:
                ok = 200 <= resp.status_code < 300
                outcome = f"HTTP {resp.status_code}"
        except Exception as exc:  # any transport failure is retried
            outcome = type(exc).__name__
    delivery.last_status = outcome
    if ok:
        delivery.status = "delivered"
        delivery.delivered_at = datetime.now(UTC)
    elif delivery.attempts >= rt.settings.webhook_max_attempts:
        delivery.status = "failed"
        log.warning(
            "revocation notice %s undeliverable after %d attempts", delivery.id, delivery.attempts
        )
    else:
        delivery.next_attempt_at = datetime.now(UTC) + timedelta(
            seconds=backoff_seconds(delivery.attempts)
        )
