"""Three broker processes against one PostgreSQL keep one gapless, consistent tree.

Bounded: a fixed number of requests spread over a few seconds, 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from broker.ledger.checkpoint import open_checkpoint
from broker.ledger.merkle import verify_consistency
from broker.ledger.verify import verify_export
from broker.sdk import BrokerClient
from tests.servers import bootstrap_admin, broker_env, brokers, client_at, free_port, run_cli
from tests.support import consent_body, enc_keypair, sig_keypair

pytestmark = pytest.mark.postgres_only

SUBJECTS = 12
REQUESTS = 240
SECONDS = 4.0


async def _client(
    admin: BrokerClient, agency_id: str, role: str, urls: list[str], public_url: str
) -> list[BrokerClient]:
    private, public = sig_keypair()
    r = await admin.post(
        "/v1/clients", json={"agency_id": agency_id, "role": role, "name": role, "jwks": public}
    )
    assert r.status_code == 201, r.text
    return [client_at(u, r.json()["client_id"], private, public_url) for u in urls]


async def _agency(admin: BrokerClient, name: str, kind: str) -> str:
    _, jwks = enc_keypair()
    r = await admin.post("/v1/agencies", json={"name": name, "kind": kind, "encryption_jwks": jwks})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _traffic(
    officers: list[BrokerClient], advocates: list[BrokerClient], grants: list[str]
) -> dict[str, int]:
    counts = {"disclosures": 0, "consent_changes": 0, "other": 0}
    deadline = time.monotonic() + SECONDS
    rng = random.Random(7)
    paused: set[str] = set()

    async def one(i: int) -> None:
        await asyncio.sleep(SECONDS * i / REQUESTS)
        if time.monotonic() > deadline:
            return
        replica = i % len(officers)
        if i % 5 == 0:
            gid = rng.choice(grants)
            change = "resume" if gid in paused else "pause"
            paused.symmetric_difference_update({gid})
            body = {"attestation": consent_body()["attestation"], "reason": "Survivor's call"}
            r = await advocates[replica].post(f"/v1/consents/{gid}/{change}", json=body)
            counts["consent_changes" if r.status_code == 200 else "other"] += 1
        else:
            ref = f"PD-{rng.randrange(SUBJECTS):04d}"
            r = await officers[replica].post(
                "/v1/disclosures",
                json={"subject_ref": ref, "category": "shelter", "purpose": "safety_planning"},
            )
            assert r.status_code in (200, 403), r.text
            counts["disclosures"] += 1

    await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return counts


async def _integrated(dsn: str, within: float = 20.0) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + within
        while await conn.fetchval("SELECT count(*) FROM ledger_pending"):
            assert time.monotonic() < deadline, "the sequencers did not drain the outbox"
            await asyncio.sleep(0.1)
        return int(await conn.fetchval("SELECT count(*) FROM ledger_entries"))
    finally:
        await conn.close()


async def test_three_processes_one_gapless_tree(database_url: str, tmp_path: Path) -> None:
    public_url = f"http://127.0.0.1:{free_port()}"  # the proxy's address, as replicas see it
    env = broker_env(database_url, tmp_path / "keys", public_url)
    run_cli(env, "keys", "init")
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    with brokers(env, 3) as procs:
        urls = [p.url for p in procs]
        admin = await asyncio.to_thread(bootstrap_admin, env, urls[0], tmp_path)
        shelter = await _agency(admin, "Harbor House", "shelter")
        police = await _agency(admin, "Eastside Police DV Unit", "law_enforcement")
        oversight = await _agency(admin, "Oversight Board", "oversight")
        advocates = await _client(admin, shelter, "advocate", urls, public_url)
        depositors = await _client(admin, shelter, "agency", urls, public_url)
        officers = await _client(admin, police, "agency", urls, public_url)
        auditors = await _client(admin, oversight, "auditor", urls, public_url)
        grants = []
        for n in range(SUBJECTS):
            adv = advocates[n % 3]
            sid = (await adv.post("/v1/subjects", json={})).json()["subject_id"]
            for agency, ref in ((police, f"PD-{n:04d}"), (shelter, f"HH-{n:04d}")):
                r = await adv.post(
                    f"/v1/subjects/{sid}/references", json={"agency_id": agency, "reference": ref}
                )
                assert r.status_code == 201, r.text
            r = await depositors[n % 3].post(
                "/v1/records",
                json={
                    "subject_ref": f"HH-{n:04d}",
                    "category": "shelter",
                    "record": {"intake_date": "2026-01-02", "bed_status": "assigned"},
                },
            )
            assert r.status_code == 201, r.text
            terms = consent_body(
                subject_id=sid, source_agency_ids=[shelter], recipient_agency_id=police
            )
            grants.append(str((await adv.post("/v1/consents", json=terms)).json()["id"]))

        # Checkpoints seen by an auditor while traffic runs, to check consistency later.
        seen: list[dict[str, Any]] = []

        async def watch() -> None:
            for _ in range(int(SECONDS / 0.5)):
                r = await auditors[0].get("/v1/ledger/checkpoint")
                if r.status_code == 200:
                    seen.append(r.json())
                await asyncio.sleep(0.5)

        counts, _ = await asyncio.gather(_traffic(officers, advocates, grants), watch())
        assert counts["disclosures"] > 100 and counts["consent_changes"] > 10, counts

        size = await _integrated(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            indices = [
                r[0] for r in await conn.fetch("SELECT idx FROM ledger_entries ORDER BY idx")
            ]
            orphans = await conn.fetchval(
                "SELECT count(*) FROM disclosures d LEFT JOIN ledger_entries e "
                "ON e.entry_id = d.ledger_entry_id WHERE e.idx IS NULL"
            )
            versions = await conn.fetchval("SELECT count(*) FROM consent_versions")
            consent_entries = await conn.fetchval(
                "SELECT count(*) FROM ledger_entries WHERE entry_type LIKE 'consent.%'"
            )
        finally:
            await conn.close()
        assert indices == list(range(size)), "gapless, contiguous indices"
        assert orphans == 0, "every decision is in the tree"
        assert consent_entries == versions, "one entry per consent version"

        vkey = (await auditors[1].get("/v1/ledger/key")).json()["verifier_key"]
        final = (await auditors[2].get("/v1/ledger/checkpoint")).json()
        assert final["tree_size"] == size
        final_root = base64.b64decode(final["root_hash"])
        assert seen, "the auditor saw checkpoints during the run"
        for cp in seen:
            opened = open_checkpoint(cp["note"], vkey)
            proof = (
                await auditors[0].get(
                    "/v1/ledger/proofs/consistency",
                    params={"first": opened.size, "second": size},
                )
            ).json()["hashes"]
            assert verify_consistency(
                opened.size,
                size,
                opened.root_hash,
                final_root,
                [base64.b64decode(h) for h in proof],
            ), cp["tree_size"]

        async with httpx.AsyncClient(base_url=urls[1], timeout=30) as raw:
            token = await auditors[1].token()
            export = await raw.get(
                "/v1/ledger/export",
                params={"checkpoints": "all"},
                headers={"Authorization": f"Bearer {token}"},
            )
        report = verify_export(io.BytesIO(export.content), vkey)
        assert report.ok, report.problems[:5]
        assert report.entries == size and report.checkpoints_verified > len(procs)
        for c in [admin, *advocates, *depositors, *officers, *auditors]:
            await c.aclose()
