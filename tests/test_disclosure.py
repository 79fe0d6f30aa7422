"""The disclosure path end to end, over HTTP, against the held-record store.

Each test maps to an invariant of DESIGN.md §3; all run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import ECKey
from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk as jw_jwk
from jwcrypto import jws as jw_jws
from sqlalchemy import func, select, text

from broker.crypto.key_rotation import rotate_signing_key
from broker.crypto.payload import PayloadInvalid, open_payload
from broker.disclosure.fast_path import DisclosureFastPath
from broker.middleware import BodyLimitMiddleware
from broker.models import ConsentGrant, Disclosure, HeldRecord, LedgerPending
from tests.support import (
    Story,
    World,
    attestation,
    broker_process,
    checked_out,
    consent_body,
    in_days,
    runtime_of,
    story_one,
)

SHELTER_RECORD = {
    "intake_date": "2024-03-02",
    "bed_status": "assigned",
    "shelter_location": "12 Hidden Lane, Eastside",
    "safety_plan_on_file": True,
    "advocate_assigned": "Advocate Rosa Quinn",
    "children_in_residence": 2,
}
SECRET_VALUES = ["12 Hidden Lane", "Rosa Quinn", "2024-03-02", "HH-2024-0042", "PD-24-0193"]


async def _setup(
    world: World, *, deposit: bool = True, **grant_terms: Any
) -> tuple[Story, dict[str, Any]]:
    s = await story_one(world)
    if deposit:
        depositor = await world.client(s.shelter.id, "agency", "shelter case system")
        r = await depositor.post(
            "/v1/records",
            json={
                "subject_ref": "HH-2024-0042",
                "category": "shelter",
                "record": SHELTER_RECORD | {"x": 1},
            },
        )
        assert r.status_code == 201, r.text
        assert r.json()["dropped_fields"] == 1
    terms = consent_body(
        subject_id=s.subject_id, source_agency_ids=[s.shelter.id], recipient_agency_id=s.police.id
    )
    terms.update(grant_terms)
    grant = await world.grant(s.advocate, **terms)
    return s, grant


def _ask(fields: list[str] | None = None, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subject_ref": "PD-24-0193",
        "category": "shelter",
        "purpose": "safety_planning",
    }
    if fields is not None:
        body["fields"] = fields
    body.update(over)
    return body


async def _jwks(world: World) -> dict[str, Any]:
    return dict((await world.http.get("/.well-known/jwks.json")).json())


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "Application/JSON; charset=utf-8", "application/vnd.example+json"],
    ids=["fast-path", "fast-path-charset", "fastapi-route"],
)
async def test_both_ways_in_disclose_alike(world: World, content_type: str) -> None:
    """An application/json body is served before FastAPI routes it; FastAPI's documented
    route serves other JSON types. Same answer, same records, same errors either way."""
    # Outermost first: the body limit and security headers wrap the fast path too.
    middleware: list[object] = [m.cls for m in world.app.user_middleware]
    assert middleware == [BodyLimitMiddleware, DisclosureFastPath]
    assert world.app.router.dependencies == []  # none the fast path would skip
    s, grant = await _setup(world)
    headers = {"Content-Type": content_type}
    body = orjson.dumps(_ask(["intake_date", "bed_status", "shelter_location"]))
    resp = await s.officer.post("/v1/disclosures", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    answer = resp.json()
    assert answer["fields_disclosed"] == ["bed_status", "intake_date"]
    claims = open_payload(answer["payload"], s.police.enc_private, await _jwks(world))
    assert claims["data"] == {"intake_date": "2024-03-02", "bed_status": "assigned"}
    async with world.rt.sessionmaker() as session:
        row = await session.get(Disclosure, answer["disclosure_id"])
    assert row is not None and row.outcome == "permitted" and row.grant_id == grant["id"]

    bad = orjson.dumps({**_ask(), "fields": ["intake_date", 3]})
    refused = await s.officer.post("/v1/disclosures", content=bad, headers=headers)
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert [e["loc"] for e in refused.json()["errors"]] == [["body", "fields", "1"]]
    untyped = await s.officer.post("/v1/disclosures", content=body)  # no content type
    assert untyped.status_code == 422, untyped.text


def _bodies(count: int) -> list[bytes]:
    """Request bodies from nearly valid to garbage, drawn by hypothesis (fixed seed)."""
    text = st.text(max_size=140)
    ask = st.fixed_dictionaries(
        {
            "subject_ref": text,
            "category": st.sampled_from(["shelter", "legal_aid", "medical"]) | text,
            "purpose": st.sampled_from(["safety_planning"]) | text,
        },
        optional={
            "fields": st.none() | st.lists(text | st.integers(), max_size=4),
            "extra": st.integers(),
        },
    )
    json_value = st.recursive(
        st.none() | st.booleans() | st.integers() | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8,
    )
    as_json = st.booleans()
    body = st.builds(
        lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode(),
        ask | json_value,
        as_json,
    ) | st.binary(max_size=64)
    drawn: list[bytes] = []

    @settings(max_examples=count, database=None, derandomize=True, deadline=None)
    @given(body)
    def draw(one: bytes) -> None:
        drawn.append(one)

    draw()
    return drawn


async def test_fast_path_and_route_refuse_alike(world: World) -> None:
    """Differential: the same body as application/json (the fast path) and as another
    JSON type (FastAPI's route) gets the same status and the same problem."""
    for body in _bodies(120):
        answers = []
        for content_type in ("application/json", "application/vnd.example+json"):
            resp = await world.http.post(
                "/v1/disclosures", content=body, headers={"Content-Type": content_type}
            )
            assert resp.status_code in (401, 422), (body, resp.text)
            answers.append((resp.status_code, resp.json()))
        assert answers[0] == answers[1], body


async def test_after_a_key_rotation_old_tokens_and_payloads_stay_valid(
    world: World, key_copy: Path
) -> None:
    """`broker keys rotate`, then a restart: a token issued before still works until it
    expires, the new payload key signs, and an earlier payload still verifies."""
    s, _ = await _setup(world)
    earlier = await s.officer.post("/v1/disclosures", json=_ask())
    assert earlier.status_code == 200, earlier.text
    token = await s.officer.token()
    old = world.rt.keys
    rotate_signing_key(key_copy, "token")  # the session's folder stays as it is
    rotate_signing_key(key_copy, "payload")

    async with broker_process(world, key_copy) as (restarted, http):
        jwks = (await http.get("/.well-known/jwks.json")).json()
        new = runtime_of(restarted).keys
        assert [k["kid"] for k in jwks["keys"]] == [
            new.token_signing.kid,
            new.payload_signing.kid,
            old.token_signing.kid,
            old.payload_signing.kid,
        ]
        auth = {"Authorization": f"Bearer {token}"}
        later = await http.post("/v1/disclosures", json=_ask(), headers=auth)
        assert later.status_code == 200, later.text
        current_only = {"keys": jwks["keys"][:2]}
        assert open_payload(later.json()["payload"], s.police.enc_private, current_only)
        assert open_payload(earlier.json()["payload"], s.police.enc_private, jwks)
        with pytest.raises(PayloadInvalid):
            open_payload(earlier.json()["payload"], s.police.enc_private, current_only)
        forged = jwt.encode(
            {"alg": "ES256", "typ": "at+jwt", "kid": "unknown"},
            {"sub": "x"},
            ECKey.generate_key("P-256", private=True),
        )
        refused = await http.post(
            "/v1/disclosures", json=_ask(), headers={"Authorization": f"Bearer {forged}"}
        )
        assert refused.status_code == 401, refused.text


async def test_story_one_disclosure(world: World) -> None:
    s, grant = await _setup(world)
    resp = await s.officer.post(
        "/v1/disclosures", json=_ask(["intake_date", "bed_status", "shelter_location"])
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["fields_disclosed"] == ["bed_status", "intake_date"]
    assert body["fields_withheld"] == ["shelter_location"]
    assert body["grant_id"] == grant["id"] and body["grant_version"] == 1
    assert body["policy_version"].startswith("sha256:")
    for secret in ("12 Hidden Lane", "Rosa Quinn", "2024-03-02"):
        assert secret not in resp.text, "no plaintext record data in the response"
    claims = open_payload(body["payload"], s.police.enc_private, await _jwks(world))
    assert claims["data"] == {"intake_date": "2024-03-02", "bed_status": "assigned"}
    assert claims["subject_ref"] == "PD-24-0193"
    assert claims["disclosure_id"] == body["disclosure_id"]
    assert claims["data_life_days"] == 30
    assert "prohibited" in claims["notice"]
    assert {
        "grant_id",
        "grant_version",
        "policy_version",
        "iat",
        "category",
        "purpose",
    } <= claims.keys()


async def test_the_record_comes_from_the_sources_of_the_version_in_force(
    world: World,
) -> None:
    """The statement that resolves the survivor also gathers her grants' sources: only the
    agencies named by the version in force are read, whoever else holds a record."""
    s, grant = await _setup(world)  # Harbor House deposits; the grant names it
    second = await world.agency("Second Shelter", "shelter")
    r = await s.advocate.post(
        f"/v1/subjects/{s.subject_id}/references",
        json={"agency_id": second.id, "reference": "SS-77"},
    )
    assert r.status_code == 201, r.text
    # A grant to someone else names the second shelter as a source: it may deposit.
    legal = await world.agency("Northside Legal Aid", "legal_aid")
    await world.grant(
        s.advocate,
        **consent_body(
            subject_id=s.subject_id, source_agency_ids=[second.id], recipient_agency_id=legal.id
        ),
    )
    depositor = await world.client(second.id, "agency", "second shelter case system")
    waitlisted = {"intake_date": "2024-05-05", "bed_status": "waitlisted"}
    r = await depositor.post(
        "/v1/records", json={"subject_ref": "SS-77", "category": "shelter", "record": waitlisted}
    )
    assert r.status_code == 201, r.text

    async def disclosed() -> dict[str, Any]:
        resp = await s.officer.post("/v1/disclosures", json=_ask())
        assert resp.status_code == 200, resp.text
        claims = open_payload(resp.json()["payload"], s.police.enc_private, await _jwks(world))
        return dict(claims["data"])

    assert await disclosed() == {"intake_date": "2024-03-02", "bed_status": "assigned"}
    terms = consent_body(source_agency_ids=[second.id])
    revised = await s.advocate.post(f"/v1/consents/{grant['id']}/versions", json=terms)
    assert revised.status_code == 201, revised.text
    assert await disclosed() == waitlisted


async def test_payload_only_opens_for_recipient(world: World) -> None:
    s, _ = await _setup(world)
    body = (await s.officer.post("/v1/disclosures", json=_ask())).json()
    with pytest.raises(PayloadInvalid):
        open_payload(body["payload"], s.shelter.enc_private, await _jwks(world))
    tampered = body["payload"][:-4] + ("AAAA" if not body["payload"].endswith("AAAA") else "BBBB")
    with pytest.raises(PayloadInvalid):
        open_payload(tampered, s.police.enc_private, await _jwks(world))


async def test_payload_interoperates_with_jwcrypto(world: World) -> None:
    """A recipient on another JOSE stack opens and verifies the payload."""
    s, _ = await _setup(world)
    body = (await s.officer.post("/v1/disclosures", json=_ask())).json()
    token = jw_jwe.JWE()
    token.deserialize(body["payload"], key=jw_jwk.JWK(**s.police.enc_private))
    inner = jw_jws.JWS()
    inner.deserialize(token.payload.decode())
    broker_keys = jw_jwk.JWKSet.from_json(__import__("json").dumps(await _jwks(world)))
    inner.verify(broker_keys.get_key(inner.jose_header["kid"]), alg="ES256")
    assert b'"bed_status":"assigned"' in inner.payload


async def test_default_request_excludes_never_disclosable(world: World) -> None:
    fields = {"shelter": ["intake_date", "bed_status", "shelter_location"]}
    s, _ = await _setup(world, fields=fields)
    default = (await s.officer.post("/v1/disclosures", json=_ask())).json()
    assert "shelter_location" not in default["fields_disclosed"]
    explicit = (await s.officer.post("/v1/disclosures", json=_ask(["shelter_location"]))).json()
    assert explicit["fields_disclosed"] == ["shelter_location"], "granted and asked for by name"


async def _denied(world: World, s: Story, body: dict[str, Any] | None = None) -> dict[str, Any]:
    resp = await s.officer.post("/v1/disclosures", json=body or _ask())
    assert resp.status_code == 403, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert "payload" not in resp.json()
    return dict(resp.json())


async def _last_reason(world: World) -> str:
    async with world.rt.sessionmaker() as session:
        return str(
            await session.scalar(
                select(Disclosure.reason).order_by(Disclosure.created_at.desc()).limit(1)
            )
        )


@pytest.mark.parametrize(
    ("case", "grant_terms", "ask", "reason"),
    [
        ("wrong purpose", {}, _ask(purpose="protective_order"), "purpose_not_granted"),
        ("wrong category", {}, _ask(category="medical"), "category_not_granted"),
        ("not yet valid", {"valid_from": in_days(2)}, _ask(), "not_yet_valid"),
        (
            "empty policy list",
            {"fields": {"medical": ["visit_date"]}, "purposes": ["housing_placement"]},
            _ask(category="medical", purpose="housing_placement"),
            "no_permitted_fields",
        ),
        (
            "policy excludes field",
            {"fields": {"shelter": ["exit_date"]}},
            _ask(),
            "no_permitted_fields",
        ),
    ],
)
async def test_deny_by_default(
    world: World, case: str, grant_terms: dict[str, Any], ask: dict[str, Any], reason: str
) -> None:
    s, _ = await _setup(world, **grant_terms)
    await _denied(world, s, ask)
    assert await _last_reason(world) == reason, case


async def test_deny_no_grant_and_wrong_recipient(world: World) -> None:
    s, _ = await _setup(world)
    legal = await world.agency("Northside Legal Aid", "legal_aid")
    lawyer = await world.client(legal.id, "agency")
    r = await s.advocate.post(
        f"/v1/subjects/{s.subject_id}/references",
        json={"agency_id": legal.id, "reference": "NLA-77"},
    )
    assert r.status_code == 201
    resp = await lawyer.post("/v1/disclosures", json=_ask(subject_ref="NLA-77"))
    assert resp.status_code == 403
    assert await _last_reason(world) == "no_grant"


async def test_paused_revoked_and_resumed(world: World) -> None:
    s, grant = await _setup(world)
    life = {"attestation": attestation(), "reason": "survivor asked"}
    assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
    await s.advocate.post(f"/v1/consents/{grant['id']}/pause", json=life)
    await _denied(world, s)
    assert await _last_reason(world) == "paused"
    await s.advocate.post(f"/v1/consents/{grant['id']}/resume", json=life)
    assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
    oral = {"attestation": attestation("verbal"), "reason": "phoned advocate"}
    assert (
        await s.advocate.post(f"/v1/consents/{grant['id']}/revoke", json=oral)
    ).status_code == 200
    await _denied(world, s)
    assert await _last_reason(world) == "revoked"


async def test_expiry_acts_at_once(world: World) -> None:
    s, _ = await _setup(world, expires_at=in_days(1.5 / 86400))
    assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
    await asyncio.sleep(1.6)
    await _denied(world, s)
    assert await _last_reason(world) == "expired"


async def test_use_limit(world: World) -> None:
    s, grant = await _setup(world, max_uses=2)
    assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
    assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
    await _denied(world, s)
    assert await _last_reason(world) == "uses_exhausted"
    assert (await s.advocate.get(f"/v1/consents/{grant['id']}")).json()["uses"] == 2


async def test_excluded_officer_denied_and_seen_by_advocate(world: World) -> None:
    """Story 2: the ex-partner's brother is named on the grant and refused."""
    s = await story_one(world)
    brother = await world.client(s.police.id, "agency", "Officer (excluded)")
    terms = consent_body(
        subject_id=s.subject_id,
        source_agency_ids=[s.shelter.id],
        recipient_agency_id=s.police.id,
        excluded_client_ids=[brother.client_id],
    )
    await world.grant(s.advocate, **terms)
    resp = await brother.post("/v1/disclosures", json=_ask())
    assert resp.status_code == 403
    accounting = (await s.advocate.get(f"/v1/subjects/{s.subject_id}/disclosures")).json()["items"]
    assert [(i["outcome"], i["reason"], i["requester_client_id"]) for i in accounting] == [
        ("denied", "recipient_excluded", brother.client_id)
    ]
    csv_text = (await s.advocate.get(f"/v1/subjects/{s.subject_id}/disclosures?format=csv")).text
    assert "recipient_excluded" in csv_text.splitlines()[1]


async def test_suspended_source_denies(world: World) -> None:
    s, _ = await _setup(world)
    assert world.admin is not None
    await world.admin.patch(f"/v1/agencies/{s.shelter.id}", json={"status": "suspended"})
    await _denied(world, s)
    assert await _last_reason(world) == "agency_suspended"


async def test_no_existence_oracle(world: World) -> None:
    """Story 5: unknown survivor and survivor without consent look exactly alike."""
    s, _ = await _setup(world)
    other = await world.agency("Westside Clinic", "medical")
    fisher = await world.client(other.id, "agency")
    r = await s.advocate.post(
        f"/v1/subjects/{s.subject_id}/references", json={"agency_id": other.id, "reference": "WC-1"}
    )
    assert r.status_code == 201
    known = await fisher.post("/v1/disclosures", json=_ask(subject_ref="WC-1"))
    unknown = await fisher.post("/v1/disclosures", json=_ask(subject_ref="WC-2"))
    assert known.status_code == unknown.status_code == 403
    kb, ub = known.json(), unknown.json()
    assert kb.pop("instance") != ub.pop("instance")
    assert kb == ub
    assert len(known.content) == len(unknown.content)
    assert {k for k in known.headers if k != "content-length"} == {
        k for k in unknown.headers if k != "content-length"
    }


async def test_denials_leave_on_the_time_grid(world: World) -> None:
    """Invariant 6's timing half (``denial_timing``): no denial, whoever is asked about,
    leaves before the grid's first tick. (That they then look alike is measured by
    ``bench/oracle.py``, not asserted here.)"""
    s, _ = await _setup(world)
    fisher = await world.client((await world.agency("Westside Clinic", "medical")).id, "agency")
    world.rt.settings = world.rt.settings.model_copy(update={"denial_quantum_ms": 200})
    for client, ref in ((fisher, "WC-404"), (s.officer, "PD-404"), (s.officer, "PD-24-0193")):
        await client.token()  # not part of what is timed
        body = _ask(subject_ref=ref, purpose="protective_order")
        began = time.monotonic()
        answer = await client.post("/v1/disclosures", json=body)
        assert answer.status_code == 403, answer.text
        assert time.monotonic() - began >= 0.2
    # Refused for its standing by the statement that also looked the survivor up.
    assert world.admin is not None
    gone = await world.admin.request("DELETE", f"/v1/clients/{fisher.client_id}")
    assert gone.status_code in (200, 204), gone.text
    began = time.monotonic()
    answer = await fisher.post("/v1/disclosures", json=_ask(subject_ref="WC-404"))
    assert answer.status_code == 401, answer.text
    assert time.monotonic() - began >= 0.2


async def test_ledger_entries_hold_no_personal_data(world: World) -> None:
    s, _ = await _setup(world)
    await s.officer.post("/v1/disclosures", json=_ask())
    await s.officer.post("/v1/disclosures", json=_ask(subject_ref="PD-UNKNOWN"))
    async with world.rt.sessionmaker() as session:
        bodies = (await session.scalars(select(LedgerPending.body))).all()
    assert any('"disclosure.permitted"' in b for b in bodies)
    for body in bodies:
        for secret in [*SECRET_VALUES, "PD-UNKNOWN", s.subject_id]:
            assert secret not in body


async def test_no_payload_without_committed_ledger_entry(world: World, backend: str) -> None:
    """If the ledger write cannot commit, the caller gets an error and no payload."""
    s, grant = await _setup(world)
    async with world.rt.engine.begin() as conn:
        if backend == "sqlite":
            await conn.execute(
                text(
                    "CREATE TRIGGER fail_ledger BEFORE INSERT ON ledger_pending "
                    "BEGIN SELECT RAISE(ABORT, 'ledger unavailable'); END"
                )
            )
        else:
            await conn.execute(
                text(
                    "CREATE FUNCTION fail_ledger() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'ledger unavailable'; END $$"
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER fail_ledger BEFORE INSERT ON ledger_pending "
                    "FOR EACH ROW EXECUTE FUNCTION fail_ledger()"
                )
            )
    resp = await s.officer.post("/v1/disclosures", json=_ask())
    assert resp.status_code in {409, 500, 503}, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert "payload" not in resp.text and "eyJ" not in resp.text
    async with world.rt.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(Disclosure)) == 0
        head = await session.get(ConsentGrant, grant["id"])
        assert head is not None and head.uses == 0, "the use count rolled back with the entry"


async def test_concurrent_requests_respect_last_use(world: World) -> None:
    s, grant = await _setup(world, max_uses=1)
    results = await asyncio.gather(
        *[s.officer.post("/v1/disclosures", json=_ask()) for _ in range(8)]
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) == 1, statuses
    assert set(statuses) <= {200, 403}
    assert (await s.advocate.get(f"/v1/consents/{grant['id']}")).json()["uses"] == 1
    # Each loser wrote exactly one denial (no permit row left behind by a lost use).
    async with world.rt.sessionmaker() as session:
        rows = (await session.execute(select(Disclosure.outcome, Disclosure.reason))).all()
        kinds = (
            await session.scalars(
                select(LedgerPending.entry_type).where(
                    LedgerPending.entry_type.like("disclosure.%")
                )
            )
        ).all()
    assert sorted(o for o, _ in rows) == ["denied"] * 7 + ["permitted"], rows
    assert {r for o, r in rows if o == "denied"} <= {"uses_exhausted", "grant_changed"}
    assert sorted(kinds) == ["disclosure.denied"] * 7 + ["disclosure.permitted"]


async def test_revocation_is_never_followed_by_a_disclosure(world: World) -> None:
    s, grant = await _setup(world)
    oral = {"attestation": attestation("verbal"), "reason": "stop"}
    await s.officer.token()
    revoked_at: list[float] = []

    async def revoke() -> None:
        await asyncio.sleep(0.01)
        r = await s.advocate.post(f"/v1/consents/{grant['id']}/revoke", json=oral)
        assert r.status_code == 200
        revoked_at.append(time.monotonic())

    async def disclose() -> tuple[float, int]:
        started = time.monotonic()
        r = await s.officer.post("/v1/disclosures", json=_ask())
        return started, r.status_code

    tasks = [asyncio.create_task(disclose()) for _ in range(10)]
    await revoke()
    later = [asyncio.create_task(disclose()) for _ in range(5)]
    results = await asyncio.gather(*tasks, *later)
    for started, status in results:
        if started > revoked_at[0]:
            assert status == 403
    async with world.rt.sessionmaker() as session:
        rows = (await session.execute(select(LedgerPending.seq, LedgerPending.entry_type))).all()
    revoke_seq = next(seq for seq, kind in rows if kind == "consent.revoked")
    assert all(seq < revoke_seq for seq, kind in rows if kind == "disclosure.permitted")


async def test_a_deposit_tells_an_agency_nothing_it_may_not_know(world: World) -> None:
    """Invariant 6 for deposits: an agency that neither enrolled the survivor nor is a
    source of her grants gets, for its own linked case number, exactly the 404 an
    unknown one gets, on the denial grid, and nothing is stored; a grant naming it as
    a source opens deposits, and its revocation closes them again."""
    s, _ = await _setup(world)
    clinic = await world.agency("Westside Clinic", "medical")
    linked = await s.advocate.post(
        f"/v1/subjects/{s.subject_id}/references",
        json={"agency_id": clinic.id, "reference": "WC-1"},
    )
    assert linked.status_code == 201, linked.text
    depositor = await world.client(clinic.id, "agency", "clinic records")
    await depositor.token()
    world.rt.settings = world.rt.settings.model_copy(update={"denial_quantum_ms": 200})

    async def deposit(ref: str) -> httpx.Response:
        record = {"subject_ref": ref, "category": "shelter", "record": SHELTER_RECORD}
        return await depositor.post("/v1/records", json=record)

    answers = []
    for ref in ("WC-1", "WC-2"):
        began = time.monotonic()
        answer = await deposit(ref)
        assert time.monotonic() - began >= 0.2
        assert answer.status_code == 404, answer.text
        body = answer.json()
        body.pop("instance", None)
        answers.append((body, len(answer.content)))
    assert answers[0] == answers[1]
    async with world.rt.sessionmaker() as session:
        held = select(func.count()).select_from(HeldRecord)
        assert await session.scalar(held.where(HeldRecord.agency_id == clinic.id)) == 0

    grant = await world.grant(
        s.advocate,
        **consent_body(
            subject_id=s.subject_id, source_agency_ids=[clinic.id], recipient_agency_id=s.police.id
        ),
    )
    assert (await deposit("WC-1")).status_code == 201
    oral = {"attestation": attestation("verbal_witnessed"), "reason": "Survivor called."}
    revoked = await s.advocate.post(f"/v1/consents/{grant['id']}/revoke", json=oral)
    assert revoked.status_code == 200, revoked.text
    assert (await deposit("WC-1")).status_code == 404


async def test_erasure_shreds_held_records(world: World) -> None:
    """Story 7: records unreadable, references gone, grants revoked, ledger kept."""
    s, grant = await _setup(world)
    assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
    async with world.rt.sessionmaker() as session:
        entries_before = await session.scalar(select(func.count()).select_from(LedgerPending))
    assert entries_before is not None
    erase = await s.advocate.request(
        "DELETE",
        f"/v1/subjects/{s.subject_id}",
        json={"attestation": attestation("verbal_witnessed"), "reason": "erase"},
    )
    assert erase.status_code == 200, erase.text
    assert erase.json()["grants_revoked"] == 1
    assert (await s.advocate.get(f"/v1/subjects/{s.subject_id}")).status_code == 404
    await _denied(world, s)
    async with world.rt.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(HeldRecord)) == 0
        pending = await session.scalar(select(func.count()).select_from(LedgerPending))
        assert pending is not None and pending > entries_before
        head = await session.get(ConsentGrant, grant["id"])
        assert head is not None and head.subject_id is None


@pytest.mark.parametrize("change", ["agency suspended", "client withdrawn"])
async def test_caller_standing_is_checked_before_anything_is_recorded(
    world: World, change: str
) -> None:
    """The disclosure route reads the caller's standing in the statement that resolves
    the survivor: a still-valid token of a suspended agency or withdrawn client is
    refused (401), and neither a decision nor a ledger entry is written."""
    s, grant = await _setup(world)
    first = await s.officer.post("/v1/disclosures", json=_ask())
    assert first.status_code == 200, first.text
    assert world.admin is not None
    if change == "agency suspended":
        r = await world.admin.patch(f"/v1/agencies/{s.police.id}", json={"status": "suspended"})
    else:
        r = await world.admin.delete(f"/v1/clients/{s.officer.client_id}")
    assert r.status_code == 200, r.text
    async with world.rt.sessionmaker() as session:
        pending_before = await session.scalar(select(func.count()).select_from(LedgerPending))
    refused = await s.officer.post("/v1/disclosures", json=_ask())  # the same token
    assert refused.status_code == 401, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert ("suspended" if change == "agency suspended" else "withdrawn") in refused.text
    assert "payload" not in refused.json()
    async with world.rt.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(Disclosure)) == 1
        assert (
            await session.scalar(select(func.count()).select_from(LedgerPending)) == pending_before
        )
        head = await session.get(ConsentGrant, grant["id"])
        assert head is not None and head.uses == 1
    # The refusal handed its connection back to the pool (PostgreSQL: a pooled driver).
    assert checked_out(world.rt.autocommit_engine) == 0
