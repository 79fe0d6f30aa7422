"""The subject-commitment key rotated: new entries commit under the new key, and the
broker still finds every entry about a survivor. Both backends."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from broker.crypto.commitment import subject_commitment
from broker.crypto.key_rotation import rotate_subject_hmac
from broker.crypto.keystore import BrokerKeys, subject_hmac_id
from broker.ledger.sequencer import integrate_until_empty
from broker.workers import reload_keys
from tests.support import (
    POLICE_ASK,
    World,
    broker_process,
    queued_entries,
    runtime_of,
    same_client,
    story_with_held_record,
)
from tests.test_records_kek_rotation import shell


async def test_a_survivors_entries_are_found_across_a_rotation(
    world: World, key_copy: Path
) -> None:
    s = await story_with_held_record(world)
    oversight = await world.agency("State DV Oversight Board", "oversight")
    auditor = await world.client(oversight.id, "auditor", "oversight auditor")
    old_key = BrokerKeys.load(key_copy).subject_hmac
    async with broker_process(world, key_copy) as (app, http):
        rt = runtime_of(app)
        officer = same_client(s.officer, http)
        assert (await officer.post("/v1/disclosures", json=POLICE_ASK)).status_code == 200
        await integrate_until_empty(rt)
        by_subject = {"subject_id": s.subject_id, "limit": 1000}
        before = await same_client(auditor, http).get("/v1/ledger/entries", params=by_subject)
        assert before.status_code == 200, before.text
        earlier = before.json()["items"]
        assert len(earlier) >= 3  # enrolment, consent, the disclosure at least

        old_id, new_id = rotate_subject_hmac(key_copy)
        assert old_id == subject_hmac_id(old_key) != new_id
        await reload_keys(rt)
        assert rt.keys.subject_hmacs[1:] == (old_key,)
        assert (await officer.post("/v1/disclosures", json=POLICE_ASK)).status_code == 200
        await integrate_until_empty(rt)
        after = await same_client(auditor, http).get("/v1/ledger/entries", params=by_subject)
        items = after.json()["items"]

    assert [e["index"] for e in items[: len(earlier)]] == [e["index"] for e in earlier]
    assert len(items) == len(earlier) + 1
    newest = items[-1]
    assert newest["type"] == "disclosure.permitted"
    old_commitment = subject_commitment(old_key, s.subject_id)
    new_commitment = subject_commitment(BrokerKeys.load(key_copy).subject_hmac, s.subject_id)
    assert {_commitment(e) for e in earlier} == {old_commitment}
    # Whoever holds only the old key cannot tell the new entry is about her.
    assert _commitment(newest) == new_commitment != old_commitment


def _commitment(item: dict[str, Any]) -> str:
    return str(item["entry"]["subject"])


async def test_the_command_rotates_and_says_so_in_the_ledger(world: World, key_copy: Path) -> None:
    broker = shell(key_copy.parent, world.rt.settings.database_url)  # keys in key_copy
    held = BrokerKeys.load(key_copy).subject_hmac
    rotated = await asyncio.to_thread(broker, "keys", "rotate", "subject")
    assert rotated.returncode == 0, rotated.stderr
    new_id = subject_hmac_id(BrokerKeys.load(key_copy).subject_hmac)
    assert rotated.stdout.strip() == f"subject-commitment key rotated: new key {new_id}"
    assert "for good" in rotated.stderr
    retired = key_copy / "retired" / f"subject-hmac.{subject_hmac_id(held)}.key"
    assert retired.stat().st_mode & 0o777 == 0o600
    assert BrokerKeys.load(key_copy).retired_subject_hmacs == (held,)
    (fields,) = await queued_entries(world.rt, "keys.subject_key_rotated")
    assert (fields["retired_subject_key"], fields["subject_key"]) == (
        subject_hmac_id(held),
        new_id,
    )


async def test_an_unreachable_database_stops_the_command_before_the_key_changes(
    world: World, key_copy: Path
) -> None:
    nowhere = "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"
    broker = shell(key_copy.parent, nowhere)
    held = (key_copy / "subject-hmac.key").read_bytes()
    refused = await asyncio.to_thread(broker, "keys", "rotate", "subject")
    assert refused.returncode == 1, refused.stderr
    assert "Nothing was rotated" in refused.stderr and "Traceback" not in refused.stderr
    assert (key_copy / "subject-hmac.key").read_bytes() == held
    assert not (key_copy / "retired").exists() or not list(
        (key_copy / "retired").glob("subject-hmac.*")
    )
