"""Disclosure holds: an operator's switch, and what ``broker restore`` leaves on.

While a hold is in place every disclosure request gets 503 before anything is
decided or recorded, and everything else (consent changes above all) goes on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from broker.disclosure import holds
from broker.disclosure.holds import (
    HOLD_INTERVAL_SECONDS,
    OPERATOR,
    lift_holds,
    place_hold,
    read_holds,
    refresh_holds,
)
from broker.models import Disclosure, LedgerPending
from broker.runtime import Runtime
from tests.support import (
    POLICE_ASK,
    World,
    broker_process,
    count_rows,
    queued_entries,
    revoke_by_phone,
    runtime_of,
    same_client,
    story_with_held_record,
    wait_until,
)
from tests.test_records_kek_rotation import shell


async def _hold(rt: Runtime) -> None:
    async with rt.sessionmaker() as session, session.begin():
        assert await place_hold(session, OPERATOR)
        assert not await place_hold(session, OPERATOR)  # once per reason


async def _resume(rt: Runtime) -> list[str]:
    async with rt.sessionmaker() as session, session.begin():
        return [hold.reason for hold in await lift_holds(session)]


async def _rows(rt: Runtime) -> tuple[int, int]:
    return await count_rows(rt, Disclosure), await count_rows(rt, LedgerPending)


async def test_a_hold_stops_every_disclosure_and_nothing_else(world: World) -> None:
    s = await story_with_held_record(world)
    assert (await s.officer.post("/v1/disclosures", json=POLICE_ASK)).status_code == 200
    await _hold(world.rt)
    await refresh_holds(world.rt)
    before = await _rows(world.rt)

    held = await s.officer.post("/v1/disclosures", json=POLICE_ASK)

    assert held.status_code == 503, held.text
    assert held.headers["content-type"] == "application/problem+json"
    problem = held.json()
    assert (
        problem["type"].endswith("disclosures-held") and "nothing was decided" in problem["detail"]
    )
    assert await _rows(world.rt) == before  # no decision, no disclosure row, no entry
    # Advocates can still act: a revocation made during the hold is in force after it.
    await revoke_by_phone(world, s)
    assert await _resume(world.rt) == [OPERATOR]
    await refresh_holds(world.rt)
    denied = await s.officer.post("/v1/disclosures", json=POLICE_ASK)
    assert denied.status_code == 403, denied.text
    types = [e["type"] for e in await queued_entries(world.rt, "disclosures.held")]
    assert types == ["disclosures.held"]
    (resumed,) = await queued_entries(world.rt, "disclosures.resumed")
    assert resumed["reason"] == OPERATOR and "held_since" in resumed


async def test_a_process_that_has_not_read_the_holds_holds(world: World) -> None:
    """Unread (None) is not "no hold": the first request reads them, and obeys."""
    s = await story_with_held_record(world)
    await _hold(world.rt)
    world.rt.disclosure_holds = None
    assert (await s.officer.post("/v1/disclosures", json=POLICE_ASK)).status_code == 503
    assert world.rt.disclosure_holds == frozenset({OPERATOR})
    await _resume(world.rt)
    world.rt.disclosure_holds = None
    assert (await s.officer.post("/v1/disclosures", json=POLICE_ASK)).status_code == 200


async def test_a_running_broker_follows_a_hold_within_the_interval(
    world: World, key_copy: Path
) -> None:
    s = await story_with_held_record(world)
    async with broker_process(world, key_copy, run_background_workers=True) as (app, http):
        rt = runtime_of(app)
        officer = same_client(s.officer, http)
        assert rt.disclosure_holds == frozenset()  # read at start
        assert (await officer.post("/v1/disclosures", json=POLICE_ASK)).status_code == 200
        await _hold(world.rt)  # another process (the operator's command) places it
        await wait_until(lambda: bool(rt.disclosure_holds), 3 * HOLD_INTERVAL_SECONDS, "hold")
        assert (await officer.post("/v1/disclosures", json=POLICE_ASK)).status_code == 503
        await _resume(world.rt)
        await wait_until(lambda: not rt.disclosure_holds, 3 * HOLD_INTERVAL_SECONDS, "resume")
        assert (await officer.post("/v1/disclosures", json=POLICE_ASK)).status_code == 200


async def test_a_broker_started_on_a_held_database_holds_from_its_first_request(
    world: World, key_copy: Path
) -> None:
    s = await story_with_held_record(world)
    await _hold(world.rt)
    async with broker_process(world, key_copy) as (app, http):
        assert runtime_of(app).disclosure_holds == frozenset({OPERATOR})
        held = await same_client(s.officer, http).post("/v1/disclosures", json=POLICE_ASK)
        assert held.status_code == 503


def test_hold_resume_and_status_from_the_shell(tmp_path: Path, database_url: str) -> None:
    broker = shell(tmp_path, database_url)
    status = broker("disclosures", "status")
    assert (status.returncode, status.stdout) == (0, "no hold: disclosures are served\n")
    held = broker("disclosures", "hold")
    assert held.returncode == 0 and held.stdout.startswith("disclosures on hold"), held.stderr
    again = broker("disclosures", "hold")
    assert again.stdout == "disclosures were already on hold by an operator\n"
    status = broker("disclosures", "status")
    assert status.returncode == 1 and status.stdout.startswith("on hold: operator (since 20")
    resumed = broker("disclosures", "resume")
    assert resumed.returncode == 0
    assert resumed.stdout.startswith("lifted the operator hold") and "resume" in resumed.stdout
    assert broker("disclosures", "resume").stdout == "no hold was in place\n"


async def test_holds_read_back_in_order(world: World) -> None:
    """Two reasons at once are both listed; lifting one leaves the other."""
    from broker.disclosure.holds import RESTORED

    async with world.rt.sessionmaker() as session, session.begin():
        await place_hold(session, RESTORED)
        await place_hold(session, OPERATOR)
    async with world.rt.sessionmaker() as session, session.begin():
        assert [h.reason for h in await read_holds(session)] == [OPERATOR, RESTORED]
        await lift_holds(session, {OPERATOR})
    async with world.rt.sessionmaker() as session:
        assert [h.reason for h in await read_holds(session)] == [RESTORED]


@pytest.mark.postgres_only
async def test_two_operators_holding_at_once_both_see_disclosures_held(
    tmp_path: Path, database_url: str
) -> None:
    """The second insert waits for the first's commit, then hits the key: not an error."""
    first = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        tx = first.transaction()
        await tx.start()
        await first.execute("INSERT INTO disclosure_holds VALUES ('operator', now())")
        second = asyncio.create_task(
            asyncio.to_thread(shell(tmp_path, database_url), "disclosures", "hold")
        )
        await asyncio.sleep(1.0)  # the command is waiting on the uncommitted row
        assert not second.done()
        await tx.commit()
        done = await asyncio.wait_for(second, 30)
    finally:
        await first.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout == "disclosures were already on hold by an operator\n"


@pytest.mark.postgres_only
async def test_on_postgresql_a_running_broker_follows_a_hold_without_waiting_for_its_poll(
    world: World, key_copy: Path, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """NOTIFY wakes the read: with the poll an hour apart, the hold still arrives, and
    again after the listening connection is cut (it reconnects)."""
    monkeypatch.setattr(holds, "HOLD_INTERVAL_SECONDS", 3600.0)
    s = await story_with_held_record(world)
    async with broker_process(world, key_copy, run_background_workers=True) as (app, http):
        rt = runtime_of(app)
        officer = same_client(s.officer, http)
        assert rt.disclosure_holds == frozenset()
        await _hold(world.rt)  # another process: the operator's command
        await wait_until(lambda: rt.disclosure_holds == frozenset({OPERATOR}), 10, "hold seen")
        assert (await officer.post("/v1/disclosures", json=POLICE_ASK)).status_code == 503

        admin = await asyncpg.connect(database_url.replace("+asyncpg", "", 1))
        try:
            cut = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN %'"
            )
        finally:
            await admin.close()
        assert cut == 1
        await _resume(world.rt)
        # Reconnecting waits the loop's retry pause (at most 5 s), then reads the holds.
        await wait_until(lambda: rt.disclosure_holds == frozenset(), 15, "resume seen")
        assert (await officer.post("/v1/disclosures", json=POLICE_ASK)).status_code == 200
        await _hold(world.rt)  # the new connection listens too
        await wait_until(lambda: rt.disclosure_holds == frozenset({OPERATOR}), 10, "hold seen")
