"""Rotating the records key: held records stay readable through every step, and once
the retired key is forgotten it opens nothing the broker stores."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from broker.crypto.datakeys import RecordUnreadable, unwrap_data_key
from broker.crypto.key_rotation import forget_retired_records_keks, rotate_records_kek
from broker.crypto.keystore import RETIRED_DIR, BrokerKeys, records_kek_id
from broker.crypto.payload import open_payload
from broker.models import Disclosure, Subject
from broker.runtime import Runtime
from broker.subjects.rewrap import rewrap_data_keys
from tests.support import (
    HELD_RECORD,
    Story,
    World,
    broker_process,
    queued_entries,
    runtime_of,
    story_one,
    story_with_held_record,
)

BIN = Path(sys.executable).parent
RECORD = HELD_RECORD  # what the story's shelter deposited
ASK = {"subject_ref": "PD-24-0193", "category": "shelter", "purpose": "safety_planning"}


async def _deposit(http: httpx.AsyncClient, token: str) -> None:
    """Harbor House leaves M.'s record again, as its case system would."""
    deposit = {"subject_ref": "HH-2024-0042", "category": "shelter", "record": RECORD}
    stored = await http.post(
        "/v1/records", json=deposit, headers={"Authorization": f"Bearer {token}"}
    )
    assert stored.status_code == 201, stored.text


async def _disclose(http: httpx.AsyncClient, token: str, s: Story) -> dict[str, Any]:
    """A disclosure from the process ``http`` talks to, opened by the police."""
    resp = await http.post(
        "/v1/disclosures", json=ASK, headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.status_code == 200, resp.text
    jwks = (await http.get("/.well-known/jwks.json")).json()
    claims = open_payload(resp.json()["payload"], s.police.enc_private, jwks)
    data: dict[str, Any] = claims["data"]
    return data


async def _wrapped_keys(rt: Runtime) -> dict[str, bytes]:
    async with rt.sessionmaker() as session:
        rows = (await session.execute(select(Subject.id, Subject.wrapped_data_key))).all()
    return {sid: wrapped for sid, wrapped in rows if wrapped is not None}


async def test_held_records_stay_readable_through_rotation_rewrap_and_forgetting(
    world: World, key_copy: Path
) -> None:
    s = await story_with_held_record(world)
    token = await s.officer.token()
    assert await _disclose(world.http, token, s) == RECORD
    old_kek = world.rt.keys.records_kek
    keys = key_copy  # the session's folder stays as it is

    old_id, new_id = rotate_records_kek(keys)
    assert old_id == records_kek_id(old_kek) and new_id != old_id
    retired = keys / RETIRED_DIR / f"records-kek.{old_id}.key"
    assert retired.stat().st_mode & 0o777 == 0o600

    async with broker_process(world, keys) as (app, http):
        rt = runtime_of(app)
        assert rt.keys.records_keks == (rt.keys.records_kek, old_kek)
        # Before the rewrap the survivor's key is still under the retired key.
        assert await _disclose(http, token, s) == RECORD
        # A survivor enrolled after the restart gets a key under the new one.
        advocate_token = await s.advocate.token()
        made = await http.post(
            "/v1/subjects", json={}, headers={"Authorization": f"Bearer {advocate_token}"}
        )
        assert made.status_code == 201, made.text
        before = await _wrapped_keys(rt)
        report = await rewrap_data_keys(rt.sessionmaker, rt.keys.records_keks)
        assert (report.checked, report.rewrapped, report.already_current) == (2, 1, 1)
        assert not report.done  # this pass changed something: run it again to be sure
        after = await _wrapped_keys(rt)
        assert after[made.json()["subject_id"]] == before[made.json()["subject_id"]]
        for wrapped in after.values():  # every key now opens with the new key alone...
            unwrap_data_key(rt.keys.records_kek, wrapped)
            with pytest.raises(RecordUnreadable):  # ...and no longer with the old one
                unwrap_data_key(old_kek, wrapped)
        # The data key itself did not change: the old ciphertext still opens.
        assert unwrap_data_key(rt.keys.records_kek, after[s.subject_id]) == unwrap_data_key(
            old_kek, before[s.subject_id]
        )
        again = await rewrap_data_keys(rt.sessionmaker, rt.keys.records_keks)
        assert again.done and (again.checked, again.already_current) == (2, 2)
        # Each pass leaves one ledger entry: the key's public name and the counts.
        passes = await queued_entries(rt, "keys.data_keys_rewrapped")
        assert [(e["rewrapped"], e["already_current"]) for e in passes] == [(1, 1), (0, 2)]
        assert {e["records_key"] for e in passes} == {new_id}

    assert forget_retired_records_keks(keys) == [old_id]
    assert not retired.exists()
    assert BrokerKeys.load(keys).retired_records_keks == ()
    async with broker_process(world, keys) as (app, http):
        assert await _disclose(http, token, s) == RECORD
        # A new deposit is sealed under the same data key, through the new records key.
        depositor = await world.client(s.shelter.id, "agency", "second case system")
        deposit_token = await depositor.token()
        await _deposit(http, deposit_token)
        assert await _disclose(http, token, s) == RECORD


async def test_a_key_no_records_key_opens_is_counted_not_touched(world: World) -> None:
    s = await story_with_held_record(world)
    rt = world.rt
    stranger = os.urandom(32)  # as if the key that wrapped it were lost
    report = await rewrap_data_keys(rt.sessionmaker, (stranger,))
    assert (report.checked, report.unreadable, report.rewrapped) == (1, 1, 0)
    assert not report.done
    # Nothing was written: the row still opens with the real key.
    unwrap_data_key(rt.keys.records_kek, (await _wrapped_keys(rt))[s.subject_id])


async def test_concurrent_rewraps_write_each_key_once(world: World, key_copy: Path) -> None:
    s = await story_one(world)
    for _ in range(11):
        await world.subject(s.advocate)
    keys = key_copy
    rotate_records_kek(keys)
    async with broker_process(world, keys) as (app, http):
        rt = runtime_of(app)
        a, b = await asyncio.gather(
            rewrap_data_keys(rt.sessionmaker, rt.keys.records_keks, batch=3),
            rewrap_data_keys(rt.sessionmaker, rt.keys.records_keks, batch=5),
        )
        assert a.checked == b.checked == 12
        # Each key was rewritten by exactly one pass; the other saw it current or changed.
        assert a.rewrapped + b.rewrapped == 12
        for wrapped in (await _wrapped_keys(rt)).values():
            unwrap_data_key(rt.keys.records_kek, wrapped)


def shell(tmp_path: Path, database_url: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``broker ARGS`` as an operator runs it: production, keys in ``tmp_path / "keys"``."""
    env = {
        **os.environ,
        "BROKER_ENVIRONMENT": "production",
        "BROKER_KEY_DIR": str(tmp_path / "keys"),
        "BROKER_DATABASE_URL": database_url,
    }

    def broker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603
            [str(BIN / "broker"), *args], env=env, capture_output=True, text=True, check=False
        )

    return broker


def test_rotate_and_rewrap_from_the_shell(tmp_path: Path, database_url: str) -> None:
    broker = shell(tmp_path, database_url)
    assert broker("keys", "init").returncode == 0
    rotated = broker("keys", "rotate", "records")
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.startswith("records key rotated: new key ")
    assert "no restart" in rotated.stderr and "every other host" in rotated.stderr
    first = broker("keys", "rewrap-records")
    assert first.returncode == 0, first.stderr
    assert "checked 0: rewrapped 0" in first.stdout
    assert "--forget-retired" in first.stderr
    assert len(list((tmp_path / "keys" / RETIRED_DIR).glob("records-kek.*.key"))) == 1
    forgot = broker("keys", "rewrap-records", "--forget-retired")
    assert forgot.returncode == 0, forgot.stderr
    assert "retired records keys deleted: " in forgot.stdout
    assert list((tmp_path / "keys" / RETIRED_DIR).glob("records-kek.*.key")) == []


async def test_a_running_process_takes_the_rotated_records_key_from_its_folder(
    world: World, key_copy: Path
) -> None:
    """No restart: the rotation, the rewrap and the forgetting all happen while one
    process serves, and it enrols, deposits and discloses throughout."""
    s = await story_with_held_record(world)
    token = await s.officer.token()
    advocate_token = await s.advocate.token()
    keys = key_copy
    async with broker_process(world, keys) as (app, http):
        rt = runtime_of(app)
        old_kek = rt.keys.records_kek
        auth = {"Authorization": f"Bearer {advocate_token}"}
        assert (await http.post("/v1/subjects", json={}, headers=auth)).status_code == 201
        rotate_records_kek(keys)  # while this process runs with the old key
        made = await http.post("/v1/subjects", json={}, headers=auth)
        assert made.status_code == 201, made.text
        assert rt.keys.records_kek != old_kek and rt.keys.retired_records_keks == (old_kek,)
        wrapped = (await _wrapped_keys(rt))[made.json()["subject_id"]]
        unwrap_data_key(rt.keys.records_kek, wrapped)  # under the new key
        assert await _disclose(http, token, s) == RECORD  # her key is still under the old one
        report = await rewrap_data_keys(rt.sessionmaker, BrokerKeys.load(keys).records_keks)
        assert report.rewrapped == 2
        assert forget_retired_records_keks(keys)
        assert await _disclose(http, token, s) == RECORD


async def test_a_data_key_no_key_held_opens_sends_the_process_to_its_folder(
    world: World, key_copy: Path
) -> None:
    """Rotated, rewrapped and forgotten while this process did nothing with records keys:
    it holds only the old key, and the first disclosure and deposit fetch the new one."""
    s = await story_with_held_record(world)
    token = await s.officer.token()
    keys = key_copy
    async with broker_process(world, keys) as (app, http):
        rt = runtime_of(app)
        old_kek = rt.keys.records_kek
        rotate_records_kek(keys)
        await rewrap_data_keys(rt.sessionmaker, BrokerKeys.load(keys).records_keks)
        forget_retired_records_keks(keys)
        assert rt.keys.records_keks == (old_kek,)  # nothing asked for a key yet
        assert await _disclose(http, token, s) == RECORD
        assert rt.keys.records_kek != old_kek and rt.keys.retired_records_keks == ()
        depositor = await world.client(s.shelter.id, "agency", "second case system")
        deposit_token = await depositor.token()
        rotate_records_kek(keys)
        await rewrap_data_keys(rt.sessionmaker, BrokerKeys.load(keys).records_keks)
        forget_retired_records_keks(keys)
        await _deposit(http, deposit_token)
        assert await _disclose(http, token, s) == RECORD


async def test_an_unreadable_records_key_file_stops_enrolment(world: World, key_copy: Path) -> None:
    s = await story_one(world)
    advocate_token = await s.advocate.token()
    keys = key_copy
    async with broker_process(world, keys) as (app, http):
        (keys / "records-kek.key").chmod(0o644)  # now refused as group/world readable
        refused = await http.post(
            "/v1/subjects", json={}, headers={"Authorization": f"Bearer {advocate_token}"}
        )
        assert refused.status_code == 503, refused.text
        assert "0644" not in refused.text and str(keys) not in refused.text


async def test_a_process_whose_key_was_forgotten_says_unavailable_not_no_record(
    world: World, key_copy: Path
) -> None:
    """The rotation's steps done out of order: the stored keys were rewrapped while this
    process still runs with the old key only. Its answers must not say "no record"
    (an agency would act on that) nor be a 500; the failure is in the ledger."""
    s = await story_with_held_record(world)
    token = await s.officer.token()
    keys = key_copy
    rotate_records_kek(keys)
    async with broker_process(world, keys) as (app, http):
        rt = runtime_of(app)
        await rewrap_data_keys(rt.sessionmaker, rt.keys.records_keks)
    # world.app is the stale process: it holds only the old key.
    asked = await s.officer.post("/v1/disclosures", json=ASK)
    assert asked.status_code == 503, asked.text
    assert asked.headers["content-type"].startswith("application/problem+json")
    assert "nothing was disclosed" in asked.json()["detail"]
    async with world.rt.sessionmaker() as session:
        row = (
            await session.execute(
                select(Disclosure.outcome, Disclosure.reason).order_by(Disclosure.created_at.desc())
            )
        ).first()
    assert tuple(row or ()) == ("failed", "record_key_unavailable")
    depositor = await world.client(s.shelter.id, "agency", "another case system")
    stored = await depositor.post(
        "/v1/records", json={"subject_ref": "HH-2024-0042", "category": "shelter", "record": RECORD}
    )
    assert stored.status_code == 503, stored.text
    assert "nothing was stored" in stored.json()["detail"]
    # The process that holds the new key serves both.
    async with broker_process(world, keys) as (app, http):
        assert await _disclose(http, token, s) == RECORD
