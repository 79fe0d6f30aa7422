"""The survivor's accounting of disclosures: every permit, denial and failure about her."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from broker.auth.roles import Principal
from broker.disclosure.schemas import Accounting, AccountingItem
from broker.models import Disclosure, LedgerEntry
from broker.subjects.repository import get_readable_subject


async def for_subject(session: AsyncSession, caller: Principal, subject_id: str) -> Accounting:
    subject = await get_readable_subject(session, caller, subject_id)
    stmt = (
        select(Disclosure, LedgerEntry.idx)
        .outerjoin(LedgerEntry, LedgerEntry.entry_id == Disclosure.ledger_entry_id)
        .where(Disclosure.subject_id == subject.id)
        .order_by(Disclosure.created_at, Disclosure.id)
    )
    items = [
        AccountingItem(
            disclosure_id=d.id,
            at=d.created_at,
            outcome=d.outcome,
            reason=d.reason,
            requester_agency_id=d.requester_agency_id,
            requester_client_id=d.requester_client_id,
            source_agency_id=d.source_agency_id,
            category=d.category,
            purpose=d.purpose,
            fields_disclosed=d.fields_disclosed,
            fields_withheld=d.fields_withheld,
            grant_id=d.grant_id,
            grant_version=d.grant_version,
            policy_version=d.policy_version,
            ledger_entry=d.ledger_entry_id,
            ledger_index=idx,
        )
        for d, idx in (await session.execute(stmt)).all()
    ]
    return Accounting(subject_id=subject.id, items=items)
