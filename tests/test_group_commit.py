"""Group commit of disclosure decisions (PostgreSQL): each decision keeps its own answer.

A batch takes all uses of one grant version or none; what it cannot take, and every
decision of a batch the database refused, comes back unwritten for the single
statement to decide. These tests drive the writer with real rows on a real server.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select

from broker.disclosure.group_commit import DecisionWriter
from broker.models import ConsentGrant, Disclosure, LedgerPending
from tests.support import World
from tests.test_disclosure import _ask, _setup

pytestmark = pytest.mark.postgres_only


def _decision(
    *, grant: dict[str, Any] | None = None, entry_id: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    now = datetime.now(UTC)
    entry_id = entry_id or str(uuid.uuid4())
    outcome = "permitted" if grant else "denied"
    pending = {
        "entry_id": entry_id,
        "entry_type": f"disclosure.{outcome}",
        "agency_id": None,
        "subject_commitment": None,
        "body": "{}",
        "created_at": now,
    }
    disclosure = {
        "id": str(uuid.uuid4()),
        "subject_id": None,
        "requester_agency_id": str(uuid.uuid4()),
        "requester_client_id": str(uuid.uuid4()),
        "source_agency_id": None,
        "category": "shelter",
        "purpose": "safety_planning",
        "outcome": outcome,
        "reason": outcome,
        "fields_disclosed": ["bed_status"] if grant else [],
        "fields_withheld": [],
        "grant_id": grant["grant_id"] if grant else None,
        "grant_version": grant["version"] if grant else None,
        "policy_version": "test",
        "payload_digest": None,
        "ledger_entry_id": entry_id,
        "subject_ref": None,
        "created_at": now,
    }
    return pending, disclosure


def _writer(world: World) -> DecisionWriter:
    writer = world.rt.decisions
    assert writer is not None, "PostgreSQL runs disclosures through a DecisionWriter"
    return writer


async def _counts(world: World, grant_id: str) -> tuple[int, int, int]:
    async with world.rt.sessionmaker() as session:
        disclosures = await session.scalar(select(func.count()).select_from(Disclosure))
        pending = await session.scalar(
            select(func.count())
            .select_from(LedgerPending)
            .where(LedgerPending.entry_type.like("disclosure.%"))
        )
        head = await session.get(ConsentGrant, grant_id)
    assert head is not None
    return int(disclosures or 0), int(pending or 0), head.uses


async def test_a_batch_takes_all_uses_of_a_grant_or_none(world: World) -> None:
    _, grant = await _setup(world, max_uses=2)
    writer = _writer(world)
    use = {"grant_id": grant["id"], "version": grant["version"], "max_uses": 2}
    stale = use | {"version": grant["version"] + 1}
    denial = _decision()
    three = [_decision(grant=use) for _ in range(3)]
    wrong = _decision(grant=stale)
    results = await asyncio.gather(
        *(writer.store(p, d, g) for (p, d), g in [(denial, None), (wrong, stale)]),
        *(writer.store(p, d, use) for p, d in three),
    )
    # One statement: the denial written; three uses of two left and a stale version
    # handed back unwritten.
    assert writer.batches == 1
    assert results == [True, False, False, False, False]
    assert await _counts(world, grant["id"]) == (1, 1, 0)

    two = [_decision(grant=use) for _ in range(2)]
    assert await asyncio.gather(*(writer.store(p, d, use) for p, d in two)) == [True, True]
    assert await _counts(world, grant["id"]) == (3, 3, 2)
    # No use left: a permit alone in its batch is handed back too.
    last_p, last_d = _decision(grant=use)
    assert await writer.store(last_p, last_d, use) is False
    assert await _counts(world, grant["id"]) == (3, 3, 2)


async def test_a_refused_batch_writes_nothing_and_hands_every_decision_back(
    world: World,
) -> None:
    _, grant = await _setup(world)
    writer = _writer(world)
    use = {"grant_id": grant["id"], "version": grant["version"], "max_uses": None}
    shared = str(uuid.uuid4())  # two ledger entries with one id: a unique violation
    first, second = _decision(grant=use, entry_id=shared), _decision(entry_id=shared)
    results = await asyncio.gather(writer.store(*first, use), writer.store(*second, None))
    assert results == [False, False]
    assert writer.batches == 0
    assert await _counts(world, grant["id"]) == (0, 0, 0), "the refused batch wrote nothing"


async def test_concurrent_disclosures_share_batches_and_respect_the_last_use(
    world: World,
) -> None:
    s, grant = await _setup(world, max_uses=3)
    writer = _writer(world)
    await s.officer.token()
    results = await asyncio.gather(
        *[s.officer.post("/v1/disclosures", json=_ask()) for _ in range(12)]
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] * 3 + [403] * 9, statuses
    assert writer.batches >= 1, "some decisions waited for a batch"
    disclosures, pending, uses = await _counts(world, grant["id"])
    assert (disclosures, pending, uses) == (12, 12, 3)
    async with world.rt.sessionmaker() as session:
        permits = await session.scalar(
            select(func.count()).select_from(Disclosure).where(Disclosure.outcome == "permitted")
        )
    assert permits == 3
