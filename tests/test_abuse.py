"""Abuse signals: the auditors' denial report (story 5) and audited reference refusals."""

from __future__ import annotations

import json

from sqlalchemy import func, select

from broker.models import LedgerPending, SubjectReference
from tests.support import World, consent_body, story_one


async def test_fishing_shows_up_for_auditors(world: World) -> None:
    s = await story_one(world)
    await world.grant(
        s.advocate,
        **consent_body(
            subject_id=s.subject_id,
            source_agency_ids=[s.shelter.id],
            recipient_agency_id=s.police.id,
        ),
    )
    rogue_agency = await world.agency("Rogue Agency", "advocacy")
    rogue = await world.client(rogue_agency.id, "agency", "fisher")
    for i in range(4):
        r = await rogue.post(
            "/v1/disclosures",
            json={
                "subject_ref": f"PD-24-{i:04d}",
                "category": "shelter",
                "purpose": "safety_planning",
            },
        )
        assert r.status_code == 403
    oversight = await world.agency("State oversight office", "oversight")
    auditor = await world.client(oversight.id, "auditor")
    report = await auditor.get("/v1/audit/denials", params={"threshold": 3})
    assert report.status_code == 200, report.text
    body = report.json()
    assert body["flagged_clients"] == [rogue.client_id]
    row = next(i for i in body["items"] if i["client_id"] == rogue.client_id)
    assert row["denials"] == 4 and row["unknown_subject"] == 4 and row["reason"] == "no_grant"
    assert (await rogue.get("/v1/audit/denials")).status_code == 403
    bad = await auditor.get(
        "/v1/audit/denials",
        params={"since": "2030-01-01T00:00:00Z", "until": "2029-01-01T00:00:00Z"},
    )
    assert bad.status_code == 422


async def test_fhir_export(world: World) -> None:
    s = await story_one(world)
    grant = await world.grant(
        s.advocate,
        **consent_body(
            subject_id=s.subject_id,
            source_agency_ids=[s.shelter.id],
            recipient_agency_id=s.police.id,
            excluded_client_ids=[s.officer.client_id],
            max_uses=3,
        ),
    )
    resp = await s.advocate.get(f"/v1/consents/{grant['id']}/fhir")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/fhir+json"
    res = resp.json()
    assert res["resourceType"] == "Consent" and res["status"] == "active"
    assert res["meta"]["versionId"] == "1"
    provision = res["provision"]
    assert provision["actor"][0]["reference"]["reference"] == f"Organization/{s.police.id}"
    assert [p["code"] for p in provision["purpose"]] == ["safety_planning"]
    codes = [c["coding"][0]["code"] for c in provision["provision"][0]["code"]]
    assert codes == ["bed_status", "intake_date"]
    assert provision["provision"][1]["type"] == "deny"


async def test_taken_reference_is_refused_and_recorded(world: World) -> None:
    """A 409 on linking reveals that a reference exists at an agency: an insider could
    probe with it, so every refusal is committed to the ledger for auditors."""
    s = await story_one(world)
    other = await world.subject(s.advocate)
    before = await _count(world, SubjectReference)
    refused = await s.advocate.post(
        f"/v1/subjects/{other}/references",
        json={"agency_id": s.shelter.id, "reference": "HH-2024-0042"},
    )
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["detail"] == "This agency already uses this reference for a survivor."
    assert s.subject_id not in refused.text
    assert await _count(world, SubjectReference) == before
    async with world.rt.sessionmaker() as session:
        rows = (
            await session.execute(
                select(LedgerPending.body).where(
                    LedgerPending.entry_type == "subject.reference_refused"
                )
            )
        ).all()
    assert len(rows) == 1
    entry = json.loads(rows[0][0])
    assert entry["actor"]["client_id"] == s.advocate.client_id
    assert entry["agency_id"] == s.shelter.id and entry["reason"] == "reference_taken"
    assert entry["subject"] and entry["reference"]  # keyed commitments only
    for secret in ("HH-2024-0042", s.subject_id, other):
        assert secret not in rows[0][0]
    # The same reference at another agency is free: uniqueness is per agency.
    free = await s.advocate.post(
        f"/v1/subjects/{other}/references",
        json={"agency_id": s.police.id, "reference": "HH-2024-0042"},
    )
    assert free.status_code == 201, free.text


async def _count(world: World, model: type[SubjectReference]) -> int:
    async with world.rt.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)
