"""Re-keying held records: new data keys, records re-encrypted, nothing lost, and the
old data key opens nothing the broker stores any more."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select, update

from broker.crypto.datakeys import RecordUnreadable, decrypt_record, record_aad, unwrap_data_key
from broker.crypto.keystore import records_kek_id
from broker.models import HeldRecord, Subject
from broker.subjects.rekey import RekeyReport, lock_data_key, rekey_held_records, rekey_survivor
from tests.support import World, queued_entries, story_one, story_with_held_record
from tests.test_records_kek_rotation import (
    RECORD,
    _disclose,
    _wrapped_keys,
    shell,
)


async def _held(world: World, subject_id: str) -> HeldRecord:
    async with world.rt.sessionmaker() as session:
        held = await session.scalar(select(HeldRecord).where(HeldRecord.subject_id == subject_id))
    assert held is not None
    return held


async def test_rekeyed_records_stay_readable_and_the_old_data_key_opens_nothing(
    world: World,
) -> None:
    s = await story_with_held_record(world)
    rt = world.rt
    others = [await world.subject(s.advocate) for _ in range(3)]  # no records: new keys only
    before = await _wrapped_keys(rt)
    old_key = unwrap_data_key(rt.keys.records_kek, before[s.subject_id])
    old_blob = (await _held(world, s.subject_id)).ciphertext

    seen: list[int] = []
    report = await rekey_held_records(
        rt.sessionmaker,
        rt.keys.records_keks,
        batch=2,
        progress=lambda r: seen.append(r.survivors_checked),
    )
    assert seen == list(range(2, len(before) + 1, 2)) + ([len(before)] if len(before) % 2 else [])
    assert report.survivors_checked == len(before) >= 4
    assert report.survivors_rekeyed == report.survivors_checked
    assert (report.records_reencrypted, report.unreadable, report.done) == (1, 0, True)
    [entry] = await queued_entries(rt, "keys.held_records_rekeyed")  # counts, nothing personal
    assert entry["records_key"] == records_kek_id(rt.keys.records_kek)
    assert (entry["survivors_rekeyed"], entry["records_reencrypted"], entry["actor"]) == (
        report.survivors_rekeyed,
        1,
        None,
    )

    after = await _wrapped_keys(rt)
    assert after.keys() == before.keys()
    assert all(after[sid] != before[sid] for sid in after)
    for sid in after:
        unwrap_data_key(rt.keys.records_kek, after[sid])  # wrapped under the current key
    held = await _held(world, s.subject_id)
    assert held.ciphertext != old_blob
    with pytest.raises(RecordUnreadable):
        decrypt_record(old_key, held.ciphertext, record_aad(s.subject_id, s.shelter.id, "shelter"))
    token = await s.officer.token()
    assert await _disclose(world.http, token, s) == RECORD
    assert len(others) == 3


async def test_a_survivor_with_a_damaged_record_is_left_as_she_was(world: World) -> None:
    s = await story_with_held_record(world)
    rt = world.rt
    held = await _held(world, s.subject_id)
    damaged = held.ciphertext[:-1] + bytes([held.ciphertext[-1] ^ 1])
    async with rt.sessionmaker() as session, session.begin():
        await session.execute(
            update(HeldRecord).where(HeldRecord.id == held.id).values(ciphertext=damaged)
        )
    before = await _wrapped_keys(rt)

    report = await rekey_held_records(rt.sessionmaker, rt.keys.records_keks)
    assert report.unreadable == 1 and not report.done
    assert report.survivors_rekeyed == report.survivors_checked - 1
    assert (await _wrapped_keys(rt))[s.subject_id] == before[s.subject_id]
    assert (await _held(world, s.subject_id)).ciphertext == damaged


async def test_erased_survivors_are_not_rekeyed(world: World) -> None:
    s = await story_one(world)
    rt = world.rt
    async with rt.sessionmaker() as session, session.begin():
        await session.execute(
            update(Subject).where(Subject.id == s.subject_id).values(wrapped_data_key=None)
        )
    report = await rekey_held_records(rt.sessionmaker, rt.keys.records_keks)
    assert s.subject_id not in await _wrapped_keys(rt)
    assert report.survivors_checked == report.survivors_rekeyed
    # Erased after the listing: her turn finds no key and writes nothing.
    late = RekeyReport()
    async with rt.sessionmaker() as session:
        assert await lock_data_key(session, s.subject_id) is None
        assert not await rekey_survivor(session, rt.keys.records_keks, s.subject_id, late)
    assert late.erased_meanwhile == 1


async def test_a_deposit_waits_for_a_rekey_of_the_same_survivor(world: World) -> None:
    s = await story_with_held_record(world)
    rt = world.rt
    depositor = await world.client(s.shelter.id, "agency", "second case system")
    newer = {"intake_date": "2024-03-09", "bed_status": "waitlisted"}
    await depositor.token()  # fetched now: getting one writes too, and would wait as well
    async with rt.sessionmaker() as rekey:
        report = RekeyReport()
        assert await lock_data_key(rekey, s.subject_id) is not None  # her turn has begun
        deposit = asyncio.create_task(
            depositor.post(
                "/v1/records",
                json={"subject_ref": "HH-2024-0042", "category": "shelter", "record": newer},
            )
        )
        await asyncio.sleep(0.3)
        assert not deposit.done()  # waiting for her row, not sealing under the old key
        assert await rekey_survivor(rekey, rt.keys.records_keks, s.subject_id, report)
        await rekey.commit()
    resp = await asyncio.wait_for(deposit, timeout=30)
    assert resp.status_code == 201, resp.text
    token = await s.officer.token()
    assert await _disclose(world.http, token, s) == newer


def test_rekey_from_the_shell(tmp_path: Path, database_url: str) -> None:
    broker = shell(tmp_path, database_url)
    assert broker("keys", "init").returncode == 0
    done = broker("keys", "rekey-records")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("survivors checked 0: given a new data key 0")
