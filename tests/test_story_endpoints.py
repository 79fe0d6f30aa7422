"""Stories 3 and 4 over real HTTP peers: a clinic's records endpoint and a police webhook."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from broker.crypto.payload import open_payload, verify_signed
from broker.disclosure.notices import deliver_due
from broker.models import HeldRecord, LedgerPending, WebhookDelivery
from broker.settings import Settings
from tests.records_server import RecordsServer, start_records_server
from tests.support import World, attestation, consent_body, in_days, story_one
from tests.webhook_server import WebhookServer

CLINIC_RECORD = {
    "visit_date": "2024-03-04",
    "injury_documentation": "Bruising to left forearm, photographed",
    "forensic_exam_done": True,
    "clinical_notes": "Patient disclosed prior strangulation episode",
    "diagnosis_codes": ["S50.812A"],
}


@pytest.fixture
def records_server() -> Iterator[RecordsServer]:
    server = start_records_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def webhook_server() -> Iterator[WebhookServer]:
    server = WebhookServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"records_read_timeout": 0.5, "records_connect_timeout": 0.5})


async def _story_three(world: World, server: RecordsServer) -> tuple[Any, Any, str]:
    clinic = await world.agency("Mercy Clinic", "medical", records_endpoint=server.url)
    legal = await world.agency("Northside Legal Aid", "legal_aid")
    advocate = await world.client(clinic.id, "advocate", "clinic advocate")
    lawyer = await world.client(legal.id, "agency", "legal aid case system")
    subject_id = await world.subject(advocate, {clinic.id: "MC-555", legal.id: "NLA-2024-17"})
    server.records[("MC-555", "medical")] = CLINIC_RECORD
    server.verify_with = (await world.http.get("/.well-known/jwks.json")).json()
    hearing_plus_14 = in_days(40)
    await world.grant(
        advocate,
        **consent_body(
            subject_id=subject_id,
            source_agency_ids=[clinic.id],
            recipient_agency_id=legal.id,
            fields={"medical": ["visit_date", "injury_documentation", "forensic_exam_done"]},
            purposes=["protective_order"],
            expires_at=hearing_plus_14,
            max_uses=3,
        ),
    )
    return legal, lawyer, subject_id


ASK = {"subject_ref": "NLA-2024-17", "category": "medical", "purpose": "protective_order"}


async def test_story_three_clinic_endpoint(world: World, records_server: RecordsServer) -> None:
    legal, lawyer, _ = await _story_three(world, records_server)
    resp = await lawyer.post("/v1/disclosures", json=ASK)
    assert resp.status_code == 200, resp.text
    assert resp.json()["fields_disclosed"] == [
        "forensic_exam_done",
        "injury_documentation",
        "visit_date",
    ]
    claims = open_payload(
        resp.json()["payload"],
        legal.enc_private,
        (await world.http.get("/.well-known/jwks.json")).json(),
    )
    assert "clinical_notes" not in claims["data"] and "diagnosis_codes" not in claims["data"]
    assert records_server.requests[-1]["auth_error"] is None, (
        "the clinic verified the broker's token"
    )
    for _ in range(2):
        assert (await lawyer.post("/v1/disclosures", json=ASK)).status_code == 200
    assert (await lawyer.post("/v1/disclosures", json=ASK)).status_code == 403, "at most 3 uses"
    async with world.rt.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(HeldRecord)) == 0, (
            "no copy kept"
        )


@pytest.mark.parametrize(
    ("behaviour", "status", "reason"),
    [
        ("status_500", 502, "source_status"),
        ("slow", 504, "source_timeout"),
        ("huge", 502, "source_too_large"),
        ("redirect", 502, "source_redirect"),
        ("wrong_content_type", 502, "source_content_type"),
        ("wrong_types", 502, "source_invalid_record"),
        ("not_json", 502, "source_malformed"),
    ],
)
async def test_failing_endpoint_gives_problem_and_ledger_entry(
    world: World, records_server: RecordsServer, behaviour: str, status: int, reason: str
) -> None:
    _, lawyer, _ = await _story_three(world, records_server)
    records_server.behaviour = behaviour
    records_server.delay = 2.0
    resp = await lawyer.post("/v1/disclosures", json=ASK)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert "payload" not in resp.json()
    assert "strangulation" not in resp.text and "Bruising" not in resp.text
    assert records_server.redirect_target_hits == 0
    async with world.rt.sessionmaker() as session:
        last = await session.scalar(
            select(LedgerPending.body).order_by(LedgerPending.seq.desc()).limit(1)
        )
    assert last is not None and '"disclosure.failed"' in last and f'"{reason}"' in last


async def test_slow_endpoint_does_not_block_other_requests(
    world: World, records_server: RecordsServer
) -> None:
    _, lawyer, _ = await _story_three(world, records_server)
    records_server.behaviour = "slow"
    records_server.delay = 2.0
    slow = asyncio.create_task(lawyer.post("/v1/disclosures", json=ASK))
    await asyncio.sleep(0.05)
    meta = await asyncio.wait_for(world.http.get("/.well-known/oauth-authorization-server"), 0.4)
    assert meta.status_code == 200 and not slow.done()
    assert (await slow).status_code == 504


async def test_story_four_revocation_notice(world: World, webhook_server: WebhookServer) -> None:
    s = await story_one(world)
    assert world.admin is not None
    r = await world.admin.patch(
        f"/v1/agencies/{s.police.id}", json={"webhook_url": webhook_server.url}
    )
    assert r.status_code == 200
    depositor = await world.client(s.shelter.id, "agency")
    await depositor.post(
        "/v1/records",
        json={
            "subject_ref": "HH-2024-0042",
            "category": "shelter",
            "record": {"intake_date": "2024-03-02", "bed_status": "assigned"},
        },
    )
    grant = await world.grant(
        s.advocate,
        **consent_body(
            subject_id=s.subject_id,
            source_agency_ids=[s.shelter.id],
            recipient_agency_id=s.police.id,
        ),
    )
    ask = {"subject_ref": "PD-24-0193", "category": "shelter", "purpose": "safety_planning"}
    disclosed = await s.officer.post("/v1/disclosures", json=ask)
    assert disclosed.status_code == 200
    webhook_server.answer_status = 503  # the DV Unit's webhook is down at first
    oral = {
        "attestation": attestation("verbal"),
        "reason": "Survivor phoned: stop sharing with police",
    }
    assert not world.rt.notices_due.is_set()
    assert (
        await s.advocate.post(f"/v1/consents/{grant['id']}/revoke", json=oral)
    ).status_code == 200
    # The commit woke this process's delivery loop (not running in tests): no idle wait.
    assert world.rt.notices_due.is_set()
    assert (await s.officer.post("/v1/disclosures", json=ask)).status_code == 403
    assert await deliver_due(world.rt) == 1
    notices = (await s.advocate.get(f"/v1/consents/{grant['id']}/notices")).json()["items"]
    assert notices[0]["status"] == "pending" and notices[0]["attempts"] == 1
    assert notices[0]["last_status"] == "HTTP 503"
    webhook_server.answer_status = 204
    async with world.rt.sessionmaker() as session, session.begin():
        await session.execute(
            update(WebhookDelivery).values(next_attempt_at=datetime.now(UTC) - timedelta(1))
        )
    assert await deliver_due(world.rt) == 1
    notices = (await s.advocate.get(f"/v1/consents/{grant['id']}/notices")).json()["items"]
    assert notices[0]["status"] == "delivered" and notices[0]["attempts"] == 2
    delivery = webhook_server.deliveries[-1]
    assert delivery["content_type"] == "application/jose"
    claims = verify_signed(
        delivery["body"], (await world.http.get("/.well-known/jwks.json")).json()
    )
    assert claims["event"] == "consent.revoked"
    assert claims["grant_id"] == grant["id"] and claims["grant_version"] == 2
    assert claims["subject_ref"] == "PD-24-0193"
    assert claims["disclosure_ids"] == [disclosed.json()["disclosure_id"]]
    assert claims["data_life_days"] == 30 and claims["jti"]
