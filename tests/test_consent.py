"""Consent grants: validation, lifecycle, immutable versions, ledger entries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from broker.models import LedgerPending
from tests.support import Story, World, attestation, consent_body, in_days, story_one


async def _story(world: World) -> Story:
    return await story_one(world)


def _base(s: Story, **over: Any) -> dict[str, Any]:
    return consent_body(
        subject_id=s.subject_id,
        source_agency_ids=[s.shelter.id],
        recipient_agency_id=s.police.id,
        **over,
    )


REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("no expiry", {"expires_at": None}, "expires_at"),
    ("expiry in the past", {"expires_at": in_days(-1)}, "past"),
    ("expiry beyond max term", {"expires_at": in_days(400)}, "365 days"),
    (
        "unknown field",
        {"fields": {"shelter": ["intake_date", "favourite_colour"]}},
        "favourite_colour",
    ),
    ("wildcard all", {"fields": {"shelter": ["all"]}}, "wildcard"),
    ("wildcard star", {"fields": {"shelter": ["*"]}}, "wildcard"),
    ("unknown category", {"fields": {"finance": ["balance"]}}, "finance"),
    ("empty field list", {"fields": {"shelter": []}}, "empty"),
    ("unknown purpose", {"purposes": ["curiosity"]}, "curiosity"),
    ("duplicate field", {"fields": {"shelter": ["bed_status", "bed_status"]}}, "twice"),
    ("missing attestation", {"attestation": None}, "attestation"),
    (
        "attestation without digest",
        {"attestation": {"method": "written", "signed_at": in_days(-1)}},
        "document_sha256",
    ),
    ("verbal attestation for a grant", {"attestation": attestation("verbal")}, "attestation"),
    ("naive datetime", {"expires_at": "2030-01-01T00:00:00"}, "expires_at"),
    (
        "unknown recipient",
        {"recipient_agency_id": "00000000-0000-0000-0000-000000000000"},
        "recipient",
    ),
    ("extra member", {"all_fields": True}, "all_fields"),
]


@pytest.mark.parametrize(("case", "over", "needle"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_grant_refusals(world: World, case: str, over: dict[str, Any], needle: str) -> None:
    s = await _story(world)
    body = _base(s)
    for key, value in over.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    before = await _pending_count(world)
    resp = await s.advocate.post("/v1/consents", json=body)
    assert resp.status_code == 422, (case, resp.text)
    assert resp.headers["content-type"] == "application/problem+json"
    problem = resp.json()
    assert problem["type"].endswith("invalid-request")
    assert needle in resp.text
    assert await _pending_count(world) == before, "a refused grant must write nothing"


async def _pending_count(world: World) -> int:
    async with world.rt.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(LedgerPending)) or 0)


async def test_suspended_recipient_refused(world: World) -> None:
    s = await _story(world)
    assert world.admin is not None
    await world.admin.patch(f"/v1/agencies/{s.police.id}", json={"status": "suspended"})
    resp = await s.advocate.post("/v1/consents", json=_base(s))
    assert resp.status_code == 422
    assert "suspended" in resp.json()["detail"]


async def test_excluded_client_must_belong_to_recipient(world: World) -> None:
    s = await _story(world)
    resp = await s.advocate.post(
        "/v1/consents", json=_base(s, excluded_client_ids=[s.advocate.client_id])
    )
    assert resp.status_code == 422
    ok = await s.advocate.post(
        "/v1/consents", json=_base(s, excluded_client_ids=[s.officer.client_id])
    )
    assert ok.status_code == 201
    assert ok.json()["excluded_client_ids"] == [s.officer.client_id]


async def test_lifecycle_writes_versions_and_ledger_entries(world: World) -> None:
    s = await _story(world)
    before = await _pending_count(world)
    grant = await world.grant(s.advocate, **_base(s))
    gid = grant["id"]
    life = {"attestation": attestation("verbal_witnessed"), "reason": "Call with survivor"}
    revised = await s.advocate.post(
        f"/v1/consents/{gid}/versions",
        json=_base(s, fields={"shelter": ["intake_date"]}) | {"subject_id": None},
    )
    assert revised.status_code == 422  # subject_id is not a revisable term
    body = _base(s, fields={"shelter": ["intake_date"]})
    del body["subject_id"], body["recipient_agency_id"]
    revised = await s.advocate.post(f"/v1/consents/{gid}/versions", json=body)
    assert revised.status_code == 201, revised.text
    assert revised.json()["version"] == 2 and revised.json()["fields"] == {
        "shelter": ["intake_date"]
    }
    paused = await s.advocate.post(f"/v1/consents/{gid}/pause", json=life)
    assert paused.json()["status"] == "paused" and paused.json()["version"] == 3
    again = await s.advocate.post(f"/v1/consents/{gid}/pause", json=life)
    assert again.status_code == 409
    resumed = await s.advocate.post(f"/v1/consents/{gid}/resume", json=life)
    assert resumed.json()["status"] == "active" and resumed.json()["version"] == 4
    oral = {
        "attestation": attestation("verbal"),
        "reason": "Survivor phoned: stop sharing with police",
    }
    revoked = await s.advocate.post(f"/v1/consents/{gid}/revoke", json=oral)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked" and revoked.json()["version"] == 5
    for path, payload in (("versions", body), ("resume", life), ("pause", life), ("revoke", oral)):
        refused = await s.advocate.post(f"/v1/consents/{gid}/{path}", json=payload)
        assert refused.status_code == 409, path
    history = (await s.advocate.get(f"/v1/consents/{gid}/versions")).json()["versions"]
    assert [v["change"] for v in history] == ["granted", "revised", "paused", "resumed", "revoked"]
    assert history[0]["fields"] == {"shelter": ["bed_status", "intake_date"]}, "v1 unchanged"
    v2 = (await s.advocate.get(f"/v1/consents/{gid}/versions/2")).json()
    assert v2["fields"] == {"shelter": ["intake_date"]}
    assert (await s.advocate.get(f"/v1/consents/{gid}/versions/9")).status_code == 404
    assert await _pending_count(world) == before + 5
    async with world.rt.sessionmaker() as session:
        bodies = (
            await session.scalars(select(LedgerPending.body).order_by(LedgerPending.seq))
        ).all()
    consent_entries = [b for b in bodies if '"consent.' in b]
    assert len(consent_entries) == 5
    for entry in consent_entries:
        assert "stop sharing" not in entry and "Call with survivor" not in entry
        assert s.subject_id not in entry, "the ledger holds a commitment, never the subject id"
        assert s.advocate.client_id in entry, "each change names its actor"


async def test_other_agency_cannot_read_or_change(world: World) -> None:
    s = await _story(world)
    grant = await world.grant(s.advocate, **_base(s))
    other = await world.agency("Other Shelter", "shelter")
    stranger = await world.client(other.id, "advocate")
    assert (await stranger.get(f"/v1/consents/{grant['id']}")).status_code == 404
    life = {"attestation": attestation(), "reason": "x"}
    assert (await stranger.post(f"/v1/consents/{grant['id']}/revoke", json=life)).status_code == 404
    assert (await stranger.get(f"/v1/subjects/{s.subject_id}")).status_code == 404
    body = _base(s)
    assert (await stranger.post("/v1/consents", json=body)).status_code == 404


async def test_versions_immutable_in_database(world: World) -> None:
    s = await _story(world)
    grant = await world.grant(s.advocate, **_base(s))
    statements = [
        "UPDATE consent_versions SET status = 'revoked'",
        "DELETE FROM consent_versions",
    ]
    for sql in statements:
        async with world.rt.engine.connect() as conn:
            with pytest.raises(DBAPIError, match="append-only"):
                await conn.execute(text(sql))
            await conn.rollback()
    fetched = await s.advocate.get(f"/v1/consents/{grant['id']}")
    assert fetched.json()["status"] == "active"


async def test_ledger_tables_refuse_rewrites(world: World) -> None:
    await _story(world)
    for table in ("ledger_entries", "ledger_nodes", "ledger_checkpoints", "ledger_key_rotations"):
        for sql in (
            f"UPDATE {table} SET idx = idx"
            if table in ("ledger_entries", "ledger_nodes")
            else f"UPDATE {table} SET tree_size = tree_size",
            f"DELETE FROM {table}",
        ):
            async with world.rt.engine.connect() as conn:
                await _insert_dummy(conn, table)
                with pytest.raises(DBAPIError, match="append-only"):
                    await conn.execute(text(sql))
                await conn.rollback()


async def _insert_dummy(conn: Any, table: str) -> None:
    blob = b"\x00" * 32
    when = datetime(2026, 1, 1, tzinfo=UTC)
    if conn.dialect.name == "sqlite":
        when = when.replace(tzinfo=None)
    if table == "ledger_entries":
        await conn.execute(
            text(
                "INSERT INTO ledger_entries (idx, entry_id, entry_type, body, leaf_hash, created_at, "
                "integrated_at) VALUES (999999, 'dummy', 't', '{}', :h, :t, :t)"
            ),
            {"h": blob, "t": when},
        )
    elif table == "ledger_nodes":
        await conn.execute(
            text("INSERT INTO ledger_nodes (level, idx, hash) VALUES (0, 999999, :h)"), {"h": blob}
        )
    elif table == "ledger_checkpoints":
        await conn.execute(
            text(
                "INSERT INTO ledger_checkpoints (tree_size, root_hash, note, created_at) "
                "VALUES (999999, :h, 'n', :t)"
            ),
            {"h": blob, "t": when},
        )
    else:
        await conn.execute(
            text(
                "INSERT INTO ledger_key_rotations (tree_size, old_verifier_key, "
                "new_verifier_key, note, created_at) VALUES (999999, 'o', 'n', 'n', :t)"
            ),
            {"t": when},
        )


@pytest.mark.postgres_only
async def test_truncate_refused_on_postgresql(world: World) -> None:
    """TRUNCATE does not exist on SQLite; there DELETE is covered above."""
    async with world.rt.engine.connect() as conn:
        with pytest.raises(DBAPIError, match="append-only"):
            await conn.execute(text("TRUNCATE consent_versions CASCADE"))
        await conn.rollback()
