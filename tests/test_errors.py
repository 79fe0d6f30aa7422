"""Every error is RFC 9457 problem+json; bad input never yields a 500 or a half-write."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from broker.app import create_app
from broker.catalog import CatalogError
from broker.crypto.keystore import KeysMissing
from broker.models import LedgerPending
from broker.settings import Settings
from tests.support import World, consent_body, story_one


def _is_problem(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body = resp.json()
    assert body["status"] == status and body["type"].startswith("urn:consent-broker:problem:")
    assert isinstance(body["title"], str) and isinstance(body["detail"], str)
    return dict(body)


async def test_framework_errors_are_problems(world: World) -> None:
    _is_problem(await world.http.get("/nowhere"), 404)
    _is_problem(await world.http.put("/v1/disclosures"), 405)
    assert world.admin is not None
    _is_problem(await world.admin.get("/v1/agencies/does-not-exist"), 404)


async def test_validation_errors_do_not_echo_input(world: World) -> None:
    s = await story_one(world)
    body = consent_body(
        subject_id=s.subject_id,
        source_agency_ids=[s.shelter.id],
        recipient_agency_id=s.police.id,
        max_uses="SECRET-ADDRESS-12",
    )
    problem = _is_problem(await s.advocate.post("/v1/consents", json=body), 422)
    assert "SECRET-ADDRESS-12" not in str(problem)
    assert problem["errors"]


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[" * 5000 + b"]" * 5000,
        b'{"subject_ref": "A", "subject_ref": "B", "category": "shelter", "purpose": "safety_planning"}',
        b'{"subject_ref": "'
        + b"x" * 5000
        + b'", "category": "shelter", "purpose": "safety_planning"}',
        b'{"subject_ref": "\' OR 1=1 --", "category": "{{7*7}}", "purpose": "safety_planning"}',
        b'{"subject_ref": "A", "category": "shelter", "purpose": "safety_planning", "fields": '
        + b"["
        + b",".join(b'"f%d"' % i for i in range(500))
        + b"]}",
    ],
    ids=[
        "broken",
        "invalid-utf8",
        "deeply-nested",
        "duplicate-keys",
        "long-string",
        "injection-looking",
        "huge-field-list",
    ],
)
async def test_hostile_disclosure_bodies(world: World, raw: bytes) -> None:
    s = await story_one(world)
    async with world.rt.sessionmaker() as session:
        before = await session.scalar(select(func.count()).select_from(LedgerPending))
    token = await s.officer.token()
    resp = await world.http.post(
        "/v1/disclosures",
        content=raw,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    if resp.status_code == 403:  # well-formed but unknown: the uniform, recorded denial
        return
    async with world.rt.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(LedgerPending)) == before


async def test_oversized_bodies_are_refused(world: World) -> None:
    assert world.admin is not None
    token = await world.admin.token()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    big = b'{"name": "' + b"x" * (70 * 1024) + b'"}'
    _is_problem(await world.http.post("/v1/agencies", content=big, headers=headers), 413)

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(80):
            yield b"x" * 1024

    _is_problem(await world.http.post("/v1/agencies", content=stream(), headers=headers), 413)


async def test_openapi_lists_problem_schema(world: World) -> None:
    spec = (await world.http.get("/openapi.json")).json()
    assert "Problem" in spec["components"]["schemas"]
    responses = spec["paths"]["/v1/disclosures"]["post"]["responses"]
    assert {"403", "422", "502", "504"} <= set(responses)


def test_production_without_keys_refuses(tmp_path: Path) -> None:
    with pytest.raises(KeysMissing, match="broker keys init"):
        create_app(
            Settings(
                environment="production",
                key_dir=tmp_path / "k",
                database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db",
            )
        )


def test_dev_mode_generates_private_keys(tmp_path: Path) -> None:
    create_app(
        Settings(
            environment="dev",
            key_dir=tmp_path / "k",
            database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db",
        )
    )
    files = list((tmp_path / "k").iterdir())
    assert len(files) == 5
    assert all(f.stat().st_mode & 0o077 == 0 for f in files)
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0


def test_malformed_policy_stops_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("format: 1\npurposes: [unclosed\n")
    with pytest.raises(CatalogError, match="policy.yaml"):
        create_app(
            Settings(
                environment="dev",
                key_dir=tmp_path / "k",
                policy_file=bad,
                database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db",
            )
        )


def test_settings_refuse_unknown_and_unsafe_values(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="token_lifetime_seconds"):
        Settings(token_lifetime_seconds=3600)
    with pytest.raises(ValueError, match="https"):
        Settings(environment="production", public_url="http://broker.example.org")
    monkeypatch.setenv("BROKER_NO_SUCH_SETTING", "1")
    with pytest.raises(ValueError, match="BROKER_NO_SUCH_SETTING"):
        Settings()


async def test_a_nul_character_anywhere_is_refused_alike_on_both_backends(
    world: World, backend: str
) -> None:
    """PostgreSQL text cannot hold U+0000 (SQLite can): a JSON body holding one is
    refused on both with a 422 that says so, before any write. In a path the caller is
    checked first; then PostgreSQL's refusal is a 422 and SQLite finds nothing."""
    s = await story_one(world)
    _is_problem(await s.officer.get("/v1/subjects/ab%00cd"), 403)
    by_id = await s.advocate.get("/v1/subjects/ab%00cd")
    _is_problem(by_id, 422 if backend == "postgresql" else 404)
    grant = consent_body(
        subject_id=s.subject_id, source_agency_ids=[s.shelter.id], recipient_agency_id=s.police.id
    )
    depositor = await world.client(s.shelter.id, "agency", "case system")
    asks = [
        (s.advocate, "/v1/consents", {**grant, "reason": "agreed\x00"}),
        (s.advocate, "/v1/consents", {**grant, "excluded_client_ids": ["x\x00"]}),
        (s.officer, "/v1/disclosures", {"subject_ref": "PD\x00", "category": "shelter",
                                        "purpose": "safety_planning"}),
        (depositor, "/v1/records", {"subject_ref": "HH-1", "category": "shelter",
                                    "record": {"intake_date": "2024-03-02\x00"}}),
    ]  # fmt: skip
    async with world.rt.sessionmaker() as session:
        pending = await session.scalar(select(func.count()).select_from(LedgerPending))
    for client, path, body in asks:
        problem = _is_problem(await client.post(path, json=body), 422)
        assert problem["errors"] == [
            {
                "loc": ["body"],
                "msg": "Value error, text must not contain NUL characters (U+0000)",
                "type": "value_error",
            }
        ], path
    async with world.rt.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(LedgerPending)) == pending


async def test_a_denial_report_reaching_before_year_one_is_refused(world: World) -> None:
    oversight = await world.agency("Oversight", "oversight")
    auditor = await world.client(oversight.id, "auditor", "auditor")
    early = await auditor.get(
        "/v1/audit/denials", params={"until": "0001-01-01T17:45:00Z", "threshold": 1}
    )
    assert "too early" in str(_is_problem(early, 422)["detail"])
    naive = await auditor.get("/v1/audit/denials", params={"since": "2026-01-01T00:00:00"})
    _is_problem(naive, 422)


@pytest.mark.postgres_only
async def test_a_value_postgresql_cannot_hold_is_a_422_not_a_503(world: World) -> None:
    """The safety net under the input checks: SQLSTATE class 22 (data exception) means
    the request's value, not the database, failed; the statement changed nothing."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from broker.db import _problem
    from broker.errors import InvalidRequest, ServiceUnavailable

    for sql, value in (("SELECT CAST(:v AS text)", "a\x00b"), ("SELECT CAST(:v AS int2)", 70000)):
        async with world.rt.sessionmaker() as session:
            with pytest.raises(DBAPIError) as caught:
                await session.execute(text(sql), {"v": value})
        assert isinstance(_problem(caught.value, committing=False), InvalidRequest)
    async with world.rt.sessionmaker() as session:
        with pytest.raises(DBAPIError) as caught:
            await session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    assert isinstance(_problem(caught.value, committing=False), ServiceUnavailable)


async def test_an_instant_before_year_one_in_utc_is_a_422(world: World) -> None:
    """``0001-01-01T00:00+01:00`` is valid ISO 8601 but lies before year 1 in UTC."""
    s = await story_one(world)
    early = "0001-01-01T00:00:00+01:00"
    oversight = await world.agency("Oversight", "oversight")
    auditor = await world.client(oversight.id, "auditor", "auditor")
    for name in ("since", "until"):
        resp = await auditor.get("/v1/ledger/entries", params={name: early})
        assert "outside the years" in str(_is_problem(resp, 422)["detail"])
    body = consent_body(
        subject_id=s.subject_id, source_agency_ids=[s.shelter.id], recipient_agency_id=s.police.id
    )
    body["attestation"] = {**body["attestation"], "signed_at": early}
    problem = _is_problem(await s.advocate.post("/v1/consents", json=body), 422)
    assert problem["errors"][0]["loc"] == ["body", "attestation", "signed_at"]  # type: ignore[index]
