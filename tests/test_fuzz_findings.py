"""Regression tests for what ``tests/test_fuzz.py`` found (each fixed in ``broker/``)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support import World, consent_body, story_one

PROBLEM = "application/problem+json"


def _problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and isinstance(body["title"], str)
    return body


async def test_body_that_is_not_utf8_is_a_documented_422(world: World) -> None:
    """Was an undocumented 400 ("error parsing the body") on every route with a JSON body."""
    agency = await world.agency()
    advocate = await world.client(agency.id, "advocate")
    token = await advocate.token()
    resp = await world.http.post(
        "/v1/subjects",
        content=b"\xf3\x83",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    body = _problem(resp, 422)
    assert body["type"] == "urn:consent-broker:problem:invalid-request"
    assert "\\xf3" not in resp.text
    spec = (await world.http.get("/openapi.json")).json()
    assert "422" in spec["paths"]["/v1/subjects"]["post"]["responses"]
    assert "400" not in spec["paths"]["/v1/subjects"]["post"]["responses"]


async def test_token_endpoint_documents_what_it_answers(world: World) -> None:
    """401 (invalid_client), 422 (form validation) and 429 were answered but undocumented,
    and the 422 was declared as FastAPI's application/json instead of problem+json."""
    spec = (await world.http.get("/openapi.json")).json()
    responses = spec["paths"]["/oauth/token"]["post"]["responses"]
    for status in ("400", "401", "422", "429"):
        assert list(responses[status]["content"]) == [PROBLEM], status
    _problem(await world.http.post("/oauth/token", data={"grant_type": ""}), 422)
    _problem(await world.http.post("/oauth/token", data={}), 422)
    refused = _problem(
        await world.http.post("/oauth/token", data={"grant_type": "client_credentials"}), 401
    )
    assert refused["error"] == "invalid_client"


async def test_fhir_export_is_documented_as_fhir_json(world: World) -> None:
    """The 200 was declared application/json with no schema but answered application/fhir+json."""
    s = await story_one(world)
    grant = await world.grant(
        s.advocate,
        **consent_body(
            subject_id=s.subject_id,
            source_agency_ids=[s.shelter.id],
            recipient_agency_id=s.police.id,
        ),
    )
    spec = (await world.http.get("/openapi.json")).json()
    ok = spec["paths"]["/v1/consents/{grant_id}/fhir"]["get"]["responses"]["200"]
    assert ok["content"] == {"application/fhir+json": {"schema": {"type": "object"}}}
    resp = await s.advocate.get(f"/v1/consents/{grant['id']}/fhir")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/fhir+json"
    assert resp.json()["resourceType"] == "Consent"
