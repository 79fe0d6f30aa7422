"""The records-endpoint fetcher against a real HTTP server: success, auth, every failure mode.

The server runs on real sockets (``tests.records_server``) and the client is a real httpx
client configured like the broker's, so redirects, streaming limits and timeouts are exercised
for real. Every failure is also checked for leaks: an error must never carry the survivor's
reference or any value from the record.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.catalog import Catalog, load_catalog
from broker.crypto.keystore import BrokerKeys
from broker.errors import UpstreamError, UpstreamTimeout
from broker.sources.connections import AgencyClient
from broker.sources.endpoint import (
    REASONS,
    REQUEST_TOKEN_TYP,
    FetchResult,
    SourceFailure,
    fetch_record,
)
from tests.records_server import (
    WRONG_TYPE_NUMBER,
    WRONG_TYPE_STRING,
    RecordsServer,
    RequestNotAuthentic,
    async_running_records_server,
    running_records_server,
    start_records_server,
    verify_records_request,
)

ROOT = Path(__file__).resolve().parents[1]
ISSUER = "https://broker.example.org"
HOLDER = "agency-shelter-01"
SUBJECT_REF = "CASE-REF-93817-SECRET"
RECORD: dict[str, Any] = {
    "shelter_client_id": "SHL-7781-PRIVATE",
    "intake_date": "2026-03-14",
    "bed_status": "assigned",
    "children_in_residence": 2,
    "advocate_assigned": "Advocate Rosalind Quill",
    "confidential_contact_number": "+1-555-0199-321",
    "accessibility_needs": ["ground-floor-room"],
    "safety_plan_on_file": True,
}
# Anything the holder sent or the broker was told that must never appear in an error or log.
SECRETS = [
    SUBJECT_REF,
    "SHL-7781-PRIVATE",
    "Rosalind",
    "555-0199",
    "ground-floor-room",
    "2026-03-14",
    "unknown-field-1",
    WRONG_TYPE_STRING,
    str(WRONG_TYPE_NUMBER),
]


@pytest.fixture(scope="module")
def server() -> Iterator[RecordsServer]:
    with running_records_server() as srv:
        yield srv


@pytest.fixture
def records(server: RecordsServer) -> RecordsServer:
    server.reset()
    server.records[SUBJECT_REF, "shelter"] = dict(RECORD)
    return server


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(ROOT / "schemas", ROOT / "policies" / "minimisation.yaml")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> BrokerKeys:
    return BrokerKeys.generate(tmp_path_factory.mktemp("sources") / "keys")


@pytest.fixture
async def http() -> AsyncIterator[AgencyClient]:
    # The broker's own client, so every test here also runs its connection pool.
    async with AgencyClient(max_connections=8, read_timeout=2.0, connect_timeout=1.0) as client:
        yield client


async def fetch(
    http: AgencyClient,
    server: RecordsServer,
    keys: BrokerKeys,
    catalog: Catalog,
    **overrides: Any,
) -> FetchResult:
    args: dict[str, Any] = {
        "url": server.url,
        "signing_key": keys.token_signing,
        "issuer": ISSUER,
        "holder_agency_id": HOLDER,
        "subject_ref": SUBJECT_REF,
        "category": "shelter",
        "schema": catalog.schemas["shelter"],
        "max_bytes": 64 * 1024,
    }
    args.update(overrides)
    return await fetch_record(http, **args)


def assert_no_leak(failure: SourceFailure, caplog: pytest.LogCaptureFixture) -> None:
    error = failure.to_broker_error()
    texts = [str(failure), repr(failure), error.detail, json.dumps(error.to_problem()), caplog.text]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
    # No chained upstream exception (e.g. a JSONDecodeError holding the body) rides along.
    assert failure.__cause__ is None and failure.__context__ is None


# ---------------------------------------------------------------------------- success


async def test_fetch_returns_clean_record(
    http: AgencyClient, records: RecordsServer, keys: BrokerKeys, catalog: Catalog
) -> None:
    result = await fetch(http, records, keys, catalog)

    assert result == FetchResult(record=RECORD, dropped_fields=0, status=200)
    [request] = records.requests
    # The reference travels in the body only, never in the URL.
    assert request["path"] == "/records" and SUBJECT_REF not in records.url
    assert json.loads(request["body"]) == {"subject_ref": SUBJECT_REF, "category": "shelter"}
    assert request["method"] == "POST"
    assert request["headers"]["accept"] == "application/json"
    assert request["headers"]["content-type"] == "application/json"
    assert request["headers"]["authorization"].startswith("Bearer ")


async def test_content_type_parameters_are_accepted(
    http: AgencyClient, records: RecordsServer, keys: BrokerKeys, catalog: Catalog
) -> None:
    records.content_type = "Application/JSON; charset=utf-8"
    result = await fetch(http, records, keys, catalog)
    assert result.record == RECORD


async def test_unknown_fields_are_dropped_and_counted(
    http: AgencyClient, records: RecordsServer, keys: BrokerKeys, catalog: Catalog
) -> None:
    records.behaviour = "extra_fields"
    result = await fetch(http, records, keys, catalog)
    assert result.record == RECORD
    assert result.dropped_fields == len(records.extra_fields) == 2


@pytest.mark.parametrize("how", ["no_record_stored", "not_found"])
async def test_404_means_no_record(
    http: AgencyClient,
    records: RecordsServer,
    keys: BrokerKeys,
    catalog: Catalog,
    how: str,
) -> None:
    if how == "no_record_stored":
        records.records.clear()
    else:
        records.behaviour = "not_found"
    result = await fetch(http, records, keys, catalog)
    assert result == FetchResult(record=None, dropped_fields=0, status=404)


# ---------------------------------------------------------------------------- authentication


async def test_holder_verifies_the_request_token(
    http: AgencyClient, records: RecordsServer, keys: BrokerKeys, catalog: Catalog
) -> None:
    records.verify_with = keys.public_jwks()
    records.expect_issuer, records.expect_holder = ISSUER, HOLDER

    assert (await fetch(http, records, keys, catalog)).record == RECORD
    assert (await fetch(http, records, keys, catalog)).record == RECORD

    first, second = records.requests
    for request in (first, second):
        assert request["auth_error"] is None
        claims = request["claims"]
        assert claims["iss"] == ISSUER
        assert claims["aud"] == records.url
        assert claims["sub"] == HOLDER
        assert claims["category"] == "shelter"
        assert claims["req"] == hashlib.sha256(request["body"]).hexdigest()
        assert claims["exp"] - claims["iat"] == 60
        assert abs(claims["iat"] - time.time()) < 5
        assert uuid.UUID(claims["jti"]).version == 4
        assert SUBJECT_REF not in json.dumps(claims)
    assert first["claims"]["jti"] != second["claims"]["jti"]

    token = first["headers"]["authorization"].removeprefix("Bearer ")
    header = json.loads(_b64url_decode(token.split(".")[0]))
    assert header == {"alg": "ES256", "typ": REQUEST_TOKEN_TYP, "kid": keys.token_signing.kid}


def _b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


async def test_token_is_bound_to_its_body(
    http: AgencyClient, records: RecordsServer, keys: BrokerKeys, catalog: Catalog
) -> None:
    records.verify_with = keys.public_jwks()
    records.records["OTHER-CASE", "shelter"] = {"bed_status": "none"}
    await fetch(http, records, keys, catalog)
    [sent] = records.requests
    authorization = sent["headers"]["authorization"]
    other_body = json.dumps({"subject_ref": "OTHER-CASE", "category": "shelter"}).encode()

    # Offline: the same token does not verify for another body...
    with pytest.raises(RequestNotAuthentic, match="req digest"):
        verify_records_request(authorization, other_body, keys.public_jwks(), records.url)
    # ...nor for another audience...
    with pytest.raises(RequestNotAuthentic, match="aud"):
        verify_records_request(
            authorization, sent["body"], keys.public_jwks(), records.base_url + "/other"
        )
    # ...and the live server refuses it with 401 when replayed with the other body or resent.
    for body in (other_body, sent["body"]):
        headers = {"Authorization": authorization, "Content-Type": "application/json"}
        async with http.post(records.url, body, headers) as response:
            assert response.status_code == 401
    assert [r["auth_error"] for r in records.requests[1:]] == [
        "req digest does not match the body",
        "replayed jti",
    ]


async def test_token_from_another_key_is_refused(
    http: AgencyClient,
    records: RecordsServer,
    keys: BrokerKeys,
    catalog: Catalog,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    records.verify_with = BrokerKeys.generate(tmp_path / "other").public_jwks()
    with pytest.raises(SourceFailure) as info:
        await fetch(http, records, keys, catalog)
    assert info.value.reason == "source_status"
    assert info.value.upstream_status == 401
    assert records.requests[0]["auth_error"] == "unknown kid"
    assert_no_leak(info.value, caplog)


# ---------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("status_500", "source_status"),
        ("wrong_content_type", "source_content_type"),
        ("not_json", "source_malformed"),
        ("json_array", "source_malformed"),
        ("compressed", "source_malformed"),
        ("wrong_types", "source_invalid_record"),
        ("huge", "source_too_large"),
        ("huge_chunked", "source_too_large"),
        ("redirect", "source_redirect"),
    ],
)
async def test_failure_modes(
    http: AgencyClient,
    records: RecordsServer,
    keys: BrokerKeys,
    catalog: Catalog,
    caplog: pytest.LogCaptureFixture,
    behaviour: str,
    reason: str,
) -> None:
    records.behaviour = behaviour
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceFailure) as info:
        await fetch(http, records, keys, catalog)
    failure = info.value
    assert failure.reason == reason
    assert failure.http_status == 502
    error = failure.to_broker_error()
    assert isinstance(error, UpstreamError) and error.status_code == 502
    assert error.slug == "source-error"
    assert f"({reason})" in error.detail
    assert_no_leak(failure, caplog)
    assert len(records.requests) == 1
    assert records.redirect_target_hits == 0


async def test_status_is_named_in_the_detail(
    http: AgencyClient, records: RecordsServer, keys: BrokerKeys, catalog: Catalog
) -> None:
    records.behaviour = "status_500"
    with pytest.raises(SourceFailure) as info:
        await fetch(http, records, keys, catalog)
    assert info.value.upstream_status == 500
    assert "HTTP 500" in info.value.to_broker_error().detail


async def test_redirect_is_never_followed(
    http: AgencyClient, records: RecordsServer, keys: BrokerKeys, catalog: Catalog
) -> None:
    records.behaviour = "redirect"
    with pytest.raises(SourceFailure) as info:
        await fetch(http, records, keys, catalog)
    assert info.value.reason == "source_redirect"
    assert info.value.upstream_status == 302
    assert records.redirect_target_hits == 0


async def test_invalid_record_names_fields_not_values(
    http: AgencyClient,
    records: RecordsServer,
    keys: BrokerKeys,
    catalog: Catalog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    records.behaviour = "wrong_types"
    with pytest.raises(SourceFailure) as info:
        await fetch(http, records, keys, catalog)
    assert info.value.fields == frozenset(RECORD)
    assert "bed_status" in str(info.value)
    assert_no_leak(info.value, caplog)


async def test_huge_body_is_refused_within_the_limit(
    http: AgencyClient, records: RecordsServer, keys: BrokerKeys, catalog: Catalog
) -> None:
    # A record that fits by default is refused once the cap is below its size.
    size = len(json.dumps(RECORD))
    with pytest.raises(SourceFailure) as info:
        await fetch(http, records, keys, catalog, max_bytes=size - 1)
    assert info.value.reason == "source_too_large"
    assert (await fetch(http, records, keys, catalog, max_bytes=size)).record == RECORD


async def test_slow_server_times_out(
    http: AgencyClient,
    records: RecordsServer,
    keys: BrokerKeys,
    catalog: Catalog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    records.behaviour, records.delay = "slow", 1.0
    started = time.monotonic()
    with pytest.raises(SourceFailure) as info:
        await fetch(http, records, keys, catalog, timeout=httpx.Timeout(0.3))
    assert time.monotonic() - started < 0.9
    assert info.value.reason == "source_timeout"
    assert info.value.http_status == 504
    error = info.value.to_broker_error()
    assert isinstance(error, UpstreamTimeout) and error.status_code == 504
    assert error.slug == "source-timeout"
    assert_no_leak(info.value, caplog)


async def test_trickling_server_hits_the_total_deadline(
    http: AgencyClient,
    records: RecordsServer,
    keys: BrokerKeys,
    catalog: Catalog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each byte arrives well within the read timeout; only the wall-clock cap stops it.
    records.behaviour, records.delay = "trickle", 0.05
    started = time.monotonic()
    with pytest.raises(SourceFailure) as info:
        await fetch(http, records, keys, catalog, timeout=httpx.Timeout(2.0), total_deadline=0.4)
    assert time.monotonic() - started < 1.0
    assert info.value.reason == "source_timeout"
    assert info.value.http_status == 504
    assert_no_leak(info.value, caplog)


async def test_unreachable_endpoint(
    http: AgencyClient, keys: BrokerKeys, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = RecordsServer()
    dead.url = f"http://127.0.0.1:{port}/records"
    with pytest.raises(SourceFailure) as info:
        await fetch(http, dead, keys, catalog)
    assert info.value.reason == "source_unreachable"
    assert info.value.http_status == 502
    assert_no_leak(info.value, caplog)


# ---------------------------------------------------------------------------- misc


async def test_several_servers_run_at_once(
    http: AgencyClient, records: RecordsServer, keys: BrokerKeys, catalog: Catalog
) -> None:
    other = start_records_server()
    try:
        other.records[SUBJECT_REF, "shelter"] = {"bed_status": "waitlisted"}
        first, second = await asyncio.gather(
            fetch(http, records, keys, catalog), fetch(http, other, keys, catalog)
        )
    finally:
        started = time.monotonic()
        other.stop()
        assert time.monotonic() - started < 0.5
    assert first.record == RECORD
    assert second.record == {"bed_status": "waitlisted"}
    assert len(records.requests) == len(other.requests) == 1


async def test_async_helper_starts_and_stops_a_server(
    http: AgencyClient, keys: BrokerKeys, catalog: Catalog
) -> None:
    async with async_running_records_server() as srv:
        srv.records[SUBJECT_REF, "shelter"] = {"program_type": "safe_home"}
        result = await fetch(http, srv, keys, catalog)
    assert result.record == {"program_type": "safe_home"}
    with pytest.raises(httpx.ConnectError):
        async with http.post(srv.url, b"{}", {}):
            pass


async def test_schema_must_match_category(
    http: AgencyClient, records: RecordsServer, keys: BrokerKeys, catalog: Catalog
) -> None:
    with pytest.raises(ValueError, match="category"):
        await fetch(http, records, keys, catalog, schema=catalog.schemas["medical"])
    assert records.requests == []


def test_failure_reasons() -> None:
    assert {"source_timeout", "source_invalid_record", "source_redirect"} <= REASONS
    assert len(REASONS) == 8
    with pytest.raises(ValueError):
        SourceFailure("source_whatever")
    for reason in REASONS:
        failure = SourceFailure(reason)
        assert failure.http_status == (504 if reason == "source_timeout" else 502)
        assert str(failure).startswith(reason + ": ")
        assert failure.to_broker_error().status_code == failure.http_status
