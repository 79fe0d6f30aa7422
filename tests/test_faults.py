"""Faults: the database connection dies mid-request, the process is SIGKILLed under load,
PostgreSQL becomes unreachable under load and comes back.

Whatever happens, DESIGN.md §3 holds afterwards: no payload left the broker without its
committed ledger entry (invariant 2), no consent change is half written (8, 9), no
acknowledged write and no queued revocation notice is lost, the ledger stays gapless and
verifies offline. Every case is bounded in time and count, uses 127.0.0.1 only, never
restarts the shared PostgreSQL server (an outage is one database refusing connections) and
cleans up after itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from broker.app import create_app
from broker.db import make_engine
from broker.ledger.verify import verify_export
from broker.models import (
    ConsentGrant,
    ConsentVersion,
    Disclosure,
    LedgerEntry,
    LedgerPending,
    WebhookDelivery,
)
from broker.sdk import ASSERTION_TYPE, BrokerClient, make_client_assertion
from tests.conftest import BASE_URL, PG_ADMIN_DSN
from tests.ledger_check import check_ledger
from tests.pg_proxy import CommitCuttingProxy
from tests.records_server import RecordsServer, async_running_records_server
from tests.reliability import record
from tests.servers import (
    BrokerProcess,
    bootstrap_admin,
    broker_env,
    client_at,
    free_port,
    run_cli,
)
from tests.support import (
    Story,
    World,
    attestation,
    consent_body,
    enc_keypair,
    sig_keypair,
    story_one,
    wait_until,
)
from tests.test_disclosure import SHELTER_RECORD, _ask, _setup
from tests.webhook_server import WebhookServer

PROBLEM = "application/problem+json"
HTTP_TIMEOUT = 10.0  # no request of these tests may take longer: "never a hang"
SLEEP_SECONDS = 8  # how long a fault trigger holds a statement (it is terminated long before)


# --------------------------------------------------------------------------- PostgreSQL admin


def _dbname(database_url: str) -> str:
    return database_url.rsplit("/", 1)[1]


def _dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@contextlib.asynccontextmanager
async def _pg(dsn: str = PG_ADMIN_DSN) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        yield conn
    finally:
        await conn.close()


async def _terminate_backends(dbname: str) -> int:
    """``pg_terminate_backend`` every connection to ``dbname``; returns how many died."""
    async with _pg() as admin:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            dbname,
        )
    return sum(1 for r in rows if r[0])


async def _sleeping_backend(dbname: str) -> bool:
    async with _pg() as admin:
        n = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event = 'PgSleep'",
            dbname,
        )
    return bool(n)


@contextlib.asynccontextmanager
async def _sleep_trigger(database_url: str, table: str, when: str = "true") -> AsyncIterator[None]:
    """A BEFORE INSERT trigger on ``table`` that holds the inserting statement in ``pg_sleep``,
    so the transaction is in flight, deterministically, until the test terminates it."""
    async with _pg(_dsn(database_url)) as conn:
        await conn.execute(
            "CREATE FUNCTION fault_sleep() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_sleep({SLEEP_SECONDS}); RETURN NEW; END $$"
        )
        await conn.execute(
            f"CREATE TRIGGER fault_sleep BEFORE INSERT ON {table} FOR EACH ROW "
            f"WHEN ({when}) EXECUTE FUNCTION fault_sleep()"
        )
    try:
        yield
    finally:
        async with _pg(_dsn(database_url)) as conn:
            await conn.execute(f"DROP TRIGGER IF EXISTS fault_sleep ON {table}")
            await conn.execute("DROP FUNCTION IF EXISTS fault_sleep()")


@contextlib.asynccontextmanager
async def _allow_connections_restored(dbname: str) -> AsyncIterator[None]:
    try:
        yield
    finally:
        async with _pg() as admin:
            await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')


async def _set_allow_connections(dbname: str, allow: bool) -> None:
    async with _pg() as admin:
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS {str(allow).lower()}')


# --------------------------------------------------------------------------- the stored state


@dataclass(frozen=True)
class Notice:
    id: str
    agency_id: str
    grant_id: str
    grant_version: int
    status: str
    attempts: int
    next_attempt_at: datetime
    body: str


@dataclass
class Stored:
    """What the database holds after a fault, read directly (not through the broker)."""

    disclosures: dict[str, str]  # disclosure id -> ledger entry id
    permitted: Counter[str]  # grant id -> permitted disclosures
    uses: dict[str, int]  # grant id -> head's use count
    heads: dict[str, int]  # grant id -> latest_version
    versions: dict[str, list[int]]  # grant id -> versions present
    pending_ids: set[str]
    entry_ids: set[str]
    indices: list[int]
    consent_entries: list[tuple[str, int]]  # (grant id, version) of every consent.* entry
    deliveries: list[Notice]

    @property
    def ledgered(self) -> set[str]:
        return self.pending_ids | self.entry_ids

    def problems(self) -> list[str]:
        """Every invariant that needs no knowledge of what the callers were told."""
        out: list[str] = []
        orphans = [d for d, e in self.disclosures.items() if e not in self.ledgered]
        if orphans:
            out.append(f"{len(orphans)} disclosures without a ledger entry: {orphans[:3]}")
        for gid, latest in self.heads.items():
            if self.versions.get(gid) != list(range(1, latest + 1)):
                out.append(
                    f"grant {gid}: latest_version {latest}, versions {self.versions.get(gid)}"
                )
        for gid, uses in self.uses.items():
            if uses != self.permitted[gid]:
                out.append(f"grant {gid}: {uses} uses counted, {self.permitted[gid]} disclosed")
        present = sorted((g, v) for g, vs in self.versions.items() for v in vs)
        if sorted(self.consent_entries) != present:
            out.append(
                f"consent entries {len(self.consent_entries)} != versions {len(present)} "
                "(one ledger entry per consent version)"
            )
        if self.indices != list(range(len(self.indices))):
            out.append("ledger indices are not 0..n-1")
        versions = {(g, v) for g, vs in self.versions.items() for v in vs}
        for d in self.deliveries:
            if (d.grant_id, d.grant_version) not in versions:
                out.append(f"notice {d.id} for a consent version that does not exist")
        return out


async def _stored(engine: AsyncEngine) -> Stored:
    async with engine.connect() as conn:
        disclosures = {
            str(i): str(e)
            for i, e in (await conn.execute(select(Disclosure.id, Disclosure.ledger_entry_id)))
        }
        permitted = Counter(
            str(g)
            for (g,) in await conn.execute(
                select(Disclosure.grant_id).where(Disclosure.outcome == "permitted")
            )
        )
        heads: dict[str, int] = {}
        uses: dict[str, int] = {}
        for gid, latest, n in await conn.execute(
            select(ConsentGrant.id, ConsentGrant.latest_version, ConsentGrant.uses)
        ):
            heads[str(gid)], uses[str(gid)] = int(latest), int(n)
        versions: dict[str, list[int]] = {}
        for gid, v in await conn.execute(
            select(ConsentVersion.grant_id, ConsentVersion.version).order_by(
                ConsentVersion.grant_id, ConsentVersion.version
            )
        ):
            versions.setdefault(str(gid), []).append(int(v))
        pending = (await conn.execute(select(LedgerPending.entry_id, LedgerPending.body))).all()
        entries = (
            await conn.execute(
                select(LedgerEntry.idx, LedgerEntry.entry_id, LedgerEntry.body).order_by(
                    LedgerEntry.idx
                )
            )
        ).all()
        deliveries = [
            Notice(str(i), str(a), str(g), int(v), str(st), int(n), at, str(b))
            for i, a, g, v, st, n, at, b in await conn.execute(
                select(
                    WebhookDelivery.id,
                    WebhookDelivery.agency_id,
                    WebhookDelivery.grant_id,
                    WebhookDelivery.grant_version,
                    WebhookDelivery.status,
                    WebhookDelivery.attempts,
                    WebhookDelivery.next_attempt_at,
                    WebhookDelivery.body,
                )
            )
        ]
    consent_entries = []
    for body in [b for _, b in pending] + [b for _, _, b in entries]:
        entry = json.loads(body)
        if str(entry["type"]).startswith("consent."):
            consent_entries.append((str(entry["grant_id"]), int(entry["grant_version"])))
    return Stored(
        disclosures=disclosures,
        permitted=permitted,
        uses=uses,
        heads=heads,
        versions=versions,
        pending_ids={str(e) for e, _ in pending},
        entry_ids={str(e) for _, e, _ in entries},
        indices=[int(i) for i, _, _ in entries],
        consent_entries=consent_entries,
        deliveries=deliveries,
    )


@contextlib.asynccontextmanager
async def _engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The test's own view of the database: no pool, so nothing lingers into a fault."""
    engine = (
        make_engine(database_url, poolclass=NullPool)
        if database_url.startswith("sqlite")
        else create_async_engine(database_url, poolclass=NullPool)
    )
    try:
        yield engine
    finally:
        await engine.dispose()


def _no_payload(resp: httpx.Response) -> None:
    assert resp.headers["content-type"] == PROBLEM, resp.text
    assert "payload" not in resp.json() and "eyJ" not in resp.text, "no payload on failure"


# =========================================================================== 1. connection killed


async def _auditor(world: World) -> BrokerClient:
    oversight = await world.agency("State DV Oversight Board", "oversight")
    return await world.client(oversight.id, "auditor", "oversight auditor")


async def _after_fault(world: World, what: str, faults: int, killed: int) -> None:
    """The state is whole, the ledger verifies, and the counts go to the report.

    Called once the test has checked each faulted request (one per fault) and the
    request after it, so ``survived`` counts those; the ledger check comes last."""
    stored = await _stored(world.rt.engine)
    ledger = await check_ledger(world.rt, world.http, await _auditor(world))
    problems = stored.problems() + list(ledger.problems)
    record(
        "fault",
        f"connection killed: {what}",
        tried=faults,
        survived=faults if ledger.ok and not problems else 0,
        faults=faults,
        requests_during_fault=faults,
        connections_killed=killed,
        entries_verified=ledger.entries,
        lost=len(problems) + ledger.pending,
    )
    assert problems == [], what
    assert ledger.ok, (what, ledger)


async def _slow_records_story(
    world: World, records: RecordsServer, *, delay: float
) -> tuple[Story, dict[str, Any]]:
    """Story one with Harbor House behind ``records``, answering after ``delay`` seconds,
    and the police granted its shelter record."""
    s = await story_one(world, records_endpoint=records.url)
    records.records["HH-2024-0042", "shelter"] = dict(SHELTER_RECORD)
    records.behaviour, records.delay = "slow", delay
    terms = consent_body(
        subject_id=s.subject_id, source_agency_ids=[s.shelter.id], recipient_agency_id=s.police.id
    )
    return s, await world.grant(s.advocate, **terms)


@pytest.mark.postgres_only
async def test_connection_killed_while_records_endpoint_answers(
    world: World, database_url: str
) -> None:
    """The request's connection is killed while the holding agency's endpoint is slow.
    On PostgreSQL the disclosure route runs in autocommit, so no transaction was open:
    nothing is lost, the driver refuses the dead connection before sending, and the
    decision is written on a fresh one. The disclosure succeeds and is recorded once."""
    async with async_running_records_server() as records:
        s, grant = await _slow_records_story(world, records, delay=1.0)
        await s.officer.token()

        inflight = asyncio.create_task(s.officer.post("/v1/disclosures", json=_ask()))
        await wait_until(lambda: bool(records.requests), 5, "records endpoint called")
        killed = await _terminate_backends(_dbname(database_url))
        resp = await asyncio.wait_for(inflight, HTTP_TIMEOUT)

        assert killed >= 1, "the request's own connection was among those killed"
        assert resp.status_code == 200, resp.text
        async with world.rt.sessionmaker() as session:
            assert await session.scalar(select(func.count()).select_from(Disclosure)) == 1
            head = await session.get(ConsentGrant, grant["id"])
            assert head is not None and head.uses == 1, "the use is counted once"
            pending = await session.scalars(select(LedgerPending.entry_id))
            assert resp.json()["ledger_entry"] in pending.all()

        records.behaviour = "normal"
        again = await s.officer.post("/v1/disclosures", json=_ask())
        assert again.status_code == 200, again.text
        assert again.json()["payload"].count(".") == 4

        # Now kill the pooled connections while no request holds them: the next request
        # must not be handed a dead one (the BEGIN at checkout, broker.db._begin_on_checkout).
        idle_killed = await _terminate_backends(_dbname(database_url))
        assert idle_killed >= 1, "the pool kept a connection"
        third = await s.officer.post("/v1/disclosures", json=_ask())
        assert third.status_code == 200, third.text
    await _after_fault(world, "records endpoint in flight, then idle pool", 2, killed + idle_killed)


@pytest.mark.postgres_only
async def test_slow_records_endpoint_does_not_hold_a_connection(world: World) -> None:
    """While the holding agency's endpoint takes its time, the disclosure holds no
    database connection: with a pool of one, another request is served meanwhile
    (it would otherwise wait for the slow one to finish)."""
    async with async_running_records_server() as records:
        s, _ = await _slow_records_story(world, records, delay=3.0)
        one = {"db_pool_size": 1, "db_max_overflow": 0, "run_background_workers": False}
        app = create_app(world.rt.settings.model_copy(update=one))
        headers = {"Authorization": f"Bearer {await s.officer.token()}"}
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as http,
        ):
            slow = asyncio.create_task(http.post("/v1/disclosures", json=_ask(), headers=headers))
            await wait_until(lambda: bool(records.requests), 5, "records endpoint called")
            other = await asyncio.wait_for(
                http.get(f"/v1/disclosures/{uuid.uuid4()}/receipt", headers=headers), HTTP_TIMEOUT
            )
            assert other.status_code == 404, other.text  # authenticated and looked up
            assert not slow.done(), "served while the slow disclosure still waited"
            resp = await asyncio.wait_for(slow, HTTP_TIMEOUT)
            assert resp.status_code == 200, resp.text
            assert resp.json()["payload"].count(".") == 4


@pytest.mark.postgres_only
async def test_connection_killed_while_ledger_entry_is_written(
    world: World, database_url: str
) -> None:
    """The payload is sealed and the decision's one statement is writing its ledger
    entry when the connection dies: the entry never committed, so the payload never
    leaves. The broker cannot tell that from a lost acknowledgement, so it says the
    outcome is unknown (503 commit-unconfirmed) rather than "nothing was changed"."""
    s, grant = await _setup(world)
    assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
    db = _dbname(database_url)
    async with _sleep_trigger(
        database_url, "ledger_pending", "NEW.entry_type = 'disclosure.permitted'"
    ):
        inflight = asyncio.create_task(s.officer.post("/v1/disclosures", json=_ask()))
        await wait_until(lambda: _sleeping_backend(db), 5, "ledger insert in flight")
        killed = await _terminate_backends(db)
        resp = await asyncio.wait_for(inflight, HTTP_TIMEOUT)
    assert resp.status_code == 503, resp.text
    assert resp.json()["type"].endswith(":commit-unconfirmed")
    _no_payload(resp)
    async with world.rt.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(Disclosure)) == 1
        head = await session.get(ConsentGrant, grant["id"])
        assert head is not None and head.uses == 1, "only the first, committed, use counts"

    again = await s.officer.post("/v1/disclosures", json=_ask())
    assert again.status_code == 200, again.text
    stored = await _stored(world.rt.engine)
    assert again.json()["ledger_entry"] in stored.pending_ids
    await _after_fault(world, "ledger entry being written", 1, killed)


@pytest.mark.postgres_only
@pytest.mark.parametrize("change", ["granted", "revoked"])
async def test_connection_killed_during_consent_change(
    world: World, database_url: str, change: str
) -> None:
    """A consent version is being inserted when the connection dies: no head without its
    version, no version without its ledger entry, no queued notice for a revocation that
    did not happen. Retrying the same change then succeeds once."""
    s, grant = await _setup(world)
    assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
    police_hook = "http://127.0.0.1:9/hook"  # never contacted: no workers run here
    assert world.admin is not None
    r = await world.admin.patch(f"/v1/agencies/{s.police.id}", json={"webhook_url": police_hook})
    assert r.status_code == 200, r.text
    if change == "granted":
        path = "/v1/consents"
        body = consent_body(
            subject_id=s.subject_id,
            source_agency_ids=[s.shelter.id],
            recipient_agency_id=s.police.id,
            purposes=["housing_placement"],
        )
    else:
        path = f"/v1/consents/{grant['id']}/revoke"
        body = {"attestation": attestation("verbal"), "reason": "Survivor phoned the hotline."}
    await s.advocate.token()
    before = await _stored(world.rt.engine)
    db = _dbname(database_url)
    async with _sleep_trigger(database_url, "consent_versions"):
        inflight = asyncio.create_task(s.advocate.post(path, json=body))
        await wait_until(lambda: _sleeping_backend(db), 5, "consent version insert in flight")
        killed = await _terminate_backends(db)
        resp = await asyncio.wait_for(inflight, HTTP_TIMEOUT)
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"] == PROBLEM

    after = await _stored(world.rt.engine)
    assert after.heads == before.heads and after.versions == before.versions, "nothing written"
    assert after.ledgered == before.ledgered and after.deliveries == []
    assert after.problems() == []

    retry = await s.advocate.post(path, json=body)
    assert retry.status_code in (200, 201), retry.text
    done = await _stored(world.rt.engine)
    gid = retry.json()["id"]
    assert done.versions[gid] == list(range(1, done.heads[gid] + 1))
    assert retry.json()["ledger_entry"] in done.pending_ids
    assert len(done.deliveries) == (1 if change == "revoked" else 0), "one notice, queued once"
    await _after_fault(world, f"consent {change} being written", 1, killed)


@pytest.mark.postgres_only
async def test_commit_acknowledgement_lost(world: World, database_url: str) -> None:
    """The decision's write reaches the server but its answer never comes back (a proxy
    on 127.0.0.1 cuts the connection). On PostgreSQL that write is one statement in
    autocommit, so it is the commit. The broker cannot know the outcome: it answers 503
    commit-unconfirmed, never "nothing was changed" and never a payload. The commit did
    happen, so the disclosure is recorded and counted: the ledger over-reports a
    disclosure the recipient never received, and never under-reports. The pool then
    recovers on its own."""
    s, grant = await _setup(world)
    proxy = await CommitCuttingProxy(cut_on=b"INSERT INTO disclosures").start()
    try:
        via_proxy = database_url.replace(":5432/", f":{proxy.port}/", 1) + "?ssl=disable"
        app = create_app(world.rt.settings.model_copy(update={"database_url": via_proxy}))
        headers = {"Authorization": f"Bearer {await s.officer.token()}"}
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as http,
        ):
            first = await http.post("/v1/disclosures", json=_ask(), headers=headers)
            assert first.status_code == 200, first.text
            proxy.armed = True
            cut = await asyncio.wait_for(
                http.post("/v1/disclosures", json=_ask(), headers=headers), HTTP_TIMEOUT
            )
            assert proxy.cuts == 1
            assert cut.status_code == 503, cut.text
            _no_payload(cut)
            assert cut.json()["type"].endswith(":commit-unconfirmed")
            assert "may or may not" in cut.json()["detail"]
            again = await http.post("/v1/disclosures", json=_ask(), headers=headers)
            assert again.status_code == 200, again.text
    finally:
        await proxy.close()
    async with world.rt.sessionmaker() as session:
        outcomes = (await session.scalars(select(Disclosure.outcome))).all()
        head = await session.get(ConsentGrant, grant["id"])
        kinds = (await session.scalars(select(LedgerPending.entry_type))).all()
    assert outcomes == ["permitted"] * 3, "the unacknowledged commit was stored"
    assert head is not None and head.uses == 3
    assert kinds.count("disclosure.permitted") == 3
    await _after_fault(world, "commit acknowledgement lost", 1, 1)


@pytest.mark.postgres_only
async def test_commit_acknowledgement_lost_in_a_transaction(
    world: World, database_url: str
) -> None:
    """The same loss for a change that is a transaction (a revocation: new version,
    ledger entry, queued notices): COMMIT is sent, its answer withheld. 503
    commit-unconfirmed, and the revocation did happen, whole."""
    s, grant = await _setup(world)
    before = await _stored(world.rt.engine)
    proxy = await CommitCuttingProxy(cut_on=b"COMMIT").start()
    try:
        via_proxy = database_url.replace(":5432/", f":{proxy.port}/", 1) + "?ssl=disable"
        app = create_app(world.rt.settings.model_copy(update={"database_url": via_proxy}))
        headers = {"Authorization": f"Bearer {await s.advocate.token()}"}
        body = {"attestation": attestation("verbal"), "reason": "Survivor phoned the hotline."}
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as http,
        ):
            proxy.armed = True
            cut = await asyncio.wait_for(
                http.post(f"/v1/consents/{grant['id']}/revoke", json=body, headers=headers),
                HTTP_TIMEOUT,
            )
            assert proxy.cuts == 1
            assert cut.status_code == 503, cut.text
            assert cut.json()["type"].endswith(":commit-unconfirmed")
            again = await http.get(f"/v1/consents/{grant['id']}", headers=headers)
            assert again.status_code == 200, again.text
            assert again.json()["status"] == "revoked", "the unacknowledged commit was stored"
    finally:
        await proxy.close()
    after = await _stored(world.rt.engine)
    assert after.heads[grant["id"]] == before.heads[grant["id"]] + 1
    assert after.problems() == []
    await _after_fault(world, "commit acknowledgement lost (transaction)", 1, 1)


# =========================================================================== real processes


@contextlib.contextmanager
def _serving(env: dict[str, str], log: Path, port: int) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(env, port, log)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@dataclass
class Deployment:
    """Agencies, one client per role and ``n`` survivors with a held record and a grant."""

    admin: BrokerClient
    advocate: BrokerClient
    officer: BrokerClient
    auditor: BrokerClient
    shelter_id: str
    police_id: str
    subjects: list[str] = field(default_factory=list)
    grants: list[str] = field(default_factory=list)  # current grant per survivor

    @property
    def clients(self) -> list[BrokerClient]:
        return [self.admin, self.advocate, self.officer, self.auditor]

    def grant_body(self, n: int) -> dict[str, Any]:
        return consent_body(
            subject_id=self.subjects[n],
            source_agency_ids=[self.shelter_id],
            recipient_agency_id=self.police_id,
        )

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


def _ref(n: int) -> str:
    return f"PD-{n:04d}"


async def _deploy(
    env: dict[str, str], url: str, tmp: Path, survivors: int, webhook_url: str | None = None
) -> Deployment:
    public_url = env["BROKER_PUBLIC_URL"]
    admin = await asyncio.to_thread(bootstrap_admin, env, url, tmp)

    async def agency(name: str, kind: str, hook: str | None = None) -> str:
        _, jwks = enc_keypair()
        body = {"name": name, "kind": kind, "encryption_jwks": jwks, "webhook_url": hook}
        r = await admin.post("/v1/agencies", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async def client(agency_id: str, role: str) -> BrokerClient:
        private, public = sig_keypair()
        body = {"agency_id": agency_id, "role": role, "name": role, "jwks": public}
        r = await admin.post("/v1/clients", json=body)
        assert r.status_code == 201, r.text
        c = client_at(url, r.json()["client_id"], private, public_url)
        c.http.timeout = httpx.Timeout(HTTP_TIMEOUT)
        return c

    shelter = await agency("Harbor House", "shelter")
    police = await agency("Eastside Police DV Unit", "law_enforcement", webhook_url)
    oversight = await agency("State DV Oversight Board", "oversight")
    d = Deployment(
        admin,
        await client(shelter, "advocate"),
        await client(police, "agency"),
        await client(oversight, "auditor"),
        shelter,
        police,
    )
    depositor = await client(shelter, "agency")
    for n in range(survivors):
        sid = (await d.advocate.post("/v1/subjects", json={})).json()["subject_id"]
        for agency_id, ref in ((police, _ref(n)), (shelter, f"HH-{n:04d}")):
            r = await d.advocate.post(
                f"/v1/subjects/{sid}/references", json={"agency_id": agency_id, "reference": ref}
            )
            assert r.status_code == 201, r.text
        r = await depositor.post(
            "/v1/records",
            json={"subject_ref": f"HH-{n:04d}", "category": "shelter", "record": SHELTER_RECORD},
        )
        assert r.status_code == 201, r.text
        d.subjects.append(sid)
        r = await d.advocate.post("/v1/consents", json=d.grant_body(n))
        assert r.status_code == 201, r.text
        d.grants.append(str(r.json()["id"]))
    await depositor.aclose()
    for c in d.clients:
        await c.token()  # tokens outlive the fault: only the fault is tested
    return d


def _disclosure_ask(n: int) -> dict[str, Any]:
    return {"subject_ref": _ref(n), "category": "shelter", "purpose": "safety_planning"}


def _revocation() -> dict[str, Any]:
    return {"attestation": attestation("verbal"), "reason": "Survivor phoned the hotline."}


@dataclass
class Load:
    """Bounded traffic and what its callers were told."""

    requests: int = 0
    in_flight: int = 0
    transport_errors: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)  # anything but the expected answers
    slowest: float = 0.0
    disclosed: dict[str, str] = field(default_factory=dict)  # disclosure id -> entry id
    permitted_grants: set[str] = field(default_factory=set)
    consent_acks: list[tuple[str, int, str, str]] = field(default_factory=list)
    revoked_with_data: list[tuple[str, int]] = field(default_factory=list)

    async def call(
        self, client: BrokerClient, method: str, path: str, **kwargs: Any
    ) -> httpx.Response | None:
        self.requests += 1
        self.in_flight += 1
        started = time.monotonic()
        try:
            resp = await client.request(method, path, **kwargs)
        except httpx.TransportError:
            self.transport_errors += 1
            return None
        finally:
            self.in_flight -= 1
            self.slowest = max(self.slowest, time.monotonic() - started)
        self.statuses[resp.status_code] += 1
        return resp

    def took(self, resp: httpx.Response) -> None:
        """Remember an acknowledged disclosure or consent change."""
        body = resp.json()
        if resp.request.url.path.endswith("/disclosures") and resp.status_code == 200:
            self.disclosed[body["disclosure_id"]] = body["ledger_entry"]
            self.permitted_grants.add(body["grant_id"])
        elif "/consents" in resp.request.url.path and resp.status_code in (200, 201):
            self.consent_acks.append(
                (body["id"], body["version"], body["ledger_entry"], body["change"])
            )


async def _discloser(d: Deployment, load: Load, stop: asyncio.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        resp = await load.call(
            d.officer, "POST", "/v1/disclosures", json=_disclosure_ask(rng.randrange(len(d.grants)))
        )
        if resp is None:
            continue
        if resp.status_code == 200:
            load.took(resp)
        elif resp.status_code != 403 or resp.headers["content-type"] != PROBLEM:
            load.bad.append(f"disclosure {resp.status_code}: {resp.text[:200]}")


async def _revoker(d: Deployment, load: Load, stop: asyncio.Event, mine: list[int]) -> None:
    """Revoke each of ``mine`` after data went out under it (so a notice is queued), then
    grant again, round and round."""
    while not stop.is_set():
        for n in mine:
            if stop.is_set():
                return
            gid = d.grants[n]
            if gid not in load.permitted_grants:
                resp = await load.call(
                    d.officer, "POST", "/v1/disclosures", json=_disclosure_ask(n)
                )
                if resp is not None and resp.status_code == 200:
                    load.took(resp)
                if gid not in load.permitted_grants:
                    continue
            resp = await load.call(
                d.advocate, "POST", f"/v1/consents/{gid}/revoke", json=_revocation()
            )
            if resp is None:
                continue
            if resp.status_code != 200:
                load.bad.append(f"revoke {resp.status_code}: {resp.text[:200]}")
                continue
            load.took(resp)
            load.revoked_with_data.append((gid, int(resp.json()["version"])))
            resp = await load.call(d.advocate, "POST", "/v1/consents", json=d.grant_body(n))
            if resp is None:
                continue
            if resp.status_code != 201:
                load.bad.append(f"grant {resp.status_code}: {resp.text[:200]}")
                continue
            load.took(resp)
            d.grants[n] = str(resp.json()["id"])


async def _verified_export(d: Deployment) -> int:
    key = (await d.auditor.get("/v1/ledger/key")).json()
    export = await d.auditor.get("/v1/ledger/export")
    assert export.status_code == 200, export.text
    report = verify_export(io.BytesIO(export.content), key["verifier_key"], origin=key["origin"])
    assert report.ok, report.problems[:5]
    return report.entries


# =========================================================================== 2. SIGKILL


LOAD_SECONDS = 1.5
DISCLOSERS = 4
SURVIVORS = 6


def _env(database_url: str, tmp: Path, port: int) -> dict[str, str]:
    env = broker_env(database_url, tmp / "keys", f"http://127.0.0.1:{port}")
    run_cli(env, "keys", "init")
    return env


async def _drained(database_url: str, within: float) -> float:
    """Wait for the restarted broker's own workers to empty both outboxes."""

    async def empty() -> bool:
        async with _engine(database_url) as engine, engine.connect() as conn:
            pending = await conn.scalar(select(func.count()).select_from(LedgerPending))
            notices = await conn.scalar(
                select(func.count())
                .select_from(WebhookDelivery)
                .where(WebhookDelivery.status == "pending")
            )
        return pending == 0 and notices == 0

    return await wait_until(empty, within, "outboxes drained after restart", step=0.2)


async def test_sigkill_under_load_then_restart(
    database_url: str, backend: str, tmp_path: Path
) -> None:
    """SIGKILL ``broker serve`` while disclosures and revocations are in flight, restart it
    on the same port with the same keys: nothing acknowledged is lost, the ledger is
    gapless and verifies, every queued revocation notice is delivered."""
    port = free_port()
    env = _env(database_url, tmp_path, port)
    # Before the kill the sequencer is slow and the webhook answers 503, so the crash
    # always leaves work in both outboxes for the restarted process to finish.
    hook = WebhookServer()
    hook.start()
    hook.answer_status = 503
    proc = BrokerProcess(
        {**env, "BROKER_SEQUENCER_INTERVAL_SECONDS": "10"}, port, tmp_path / "serve.log"
    )
    try:
        await asyncio.to_thread(proc.start)
        d = await _deploy(env, proc.url, tmp_path, SURVIVORS, webhook_url=hook.url)
        load, stop = Load(), asyncio.Event()
        half = SURVIVORS // 2
        workers = [
            asyncio.create_task(_discloser(d, load, stop, seed)) for seed in range(DISCLOSERS)
        ]
        workers += [
            asyncio.create_task(_revoker(d, load, stop, list(range(half)))),
            asyncio.create_task(_revoker(d, load, stop, list(range(half, SURVIVORS)))),
        ]
        await asyncio.sleep(LOAD_SECONDS)
        await wait_until(lambda: load.in_flight > 0, 2, "requests in flight at kill")
        in_flight_at_kill = load.in_flight
        pid = proc.proc.pid if proc.proc else None
        proc.kill()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), HTTP_TIMEOUT + 5)
        requests_before = load.requests
        assert load.bad == [], load.bad[:5]
        assert load.disclosed and load.revoked_with_data, "the load did real work"
        async with _engine(database_url) as engine:
            at_kill = await _stored(engine)
        pending_notices = [n for n in at_kill.deliveries if n.status == "pending"]
        assert at_kill.pending_ids and pending_notices, "the crash left work in both outboxes"
        assert at_kill.problems() == [], "the crash left nothing half written"

        hook.answer_status = 204
        refused = len(hook.deliveries)
        proc.env = env
        await asyncio.to_thread(proc.start)
        assert proc.proc is not None and proc.proc.pid != pid
        after = await d.officer.post("/v1/disclosures", json=_disclosure_ask(SURVIVORS - 1))
        assert after.status_code in (200, 403), after.text
        drain = await _drained(database_url, 20)

        async with _engine(database_url) as engine:
            stored = await _stored(engine)
        entries = await _verified_export(d)
        lost_disclosures = [
            i
            for i, e in load.disclosed.items()
            if stored.disclosures.get(i) != e or e not in stored.entry_ids
        ]
        lost_changes = [
            (gid, version)
            for gid, version, entry, _ in load.consent_acks
            if entry not in stored.entry_ids or version not in stored.versions.get(gid, [])
        ]
        noticed = {(n.grant_id, n.grant_version) for n in stored.deliveries}
        unnoticed = [r for r in load.revoked_with_data if r not in noticed]
        received = {x["body"] for x in hook.deliveries[refused:]}
        undelivered = [
            n.id for n in stored.deliveries if n.status != "delivered" or n.body not in received
        ]
        checked = len(load.disclosed) + len(load.consent_acks) + len(stored.deliveries)
        lost = len(lost_disclosures) + len(lost_changes) + len(unnoticed) + len(undelivered)
        record(
            "fault",
            f"SIGKILL under load, restart ({backend})",
            tried=checked,
            survived=checked - lost,
            faults=1,
            requests_during_fault=requests_before,
            in_flight_at_kill=in_flight_at_kill,
            cut_off=load.transport_errors,
            acknowledged_disclosures=len(load.disclosed),
            acknowledged_consent_changes=len(load.consent_acks),
            ledger_pending_at_kill=len(at_kill.pending_ids),
            notices_pending_at_kill=len(pending_notices),
            notices_delivered=len(stored.deliveries) - len(undelivered),
            entries_verified=entries,
            drain_seconds=round(drain, 2),
            lost=lost,
        )
        assert stored.problems() == []
        assert stored.pending_ids == set(), "the outbox drained"
        assert entries == len(stored.indices), "the export covers the whole drained ledger"
        assert lost_disclosures == [], "every 200 disclosure is recorded and in the ledger"
        assert lost_changes == [], "every acknowledged consent change is in the ledger"
        assert unnoticed == [], "a notice per acknowledged revocation of disclosed data"
        assert undelivered == [], "every queued notice reached the webhook after the restart"
        await d.aclose()
    finally:
        proc.stop()
        hook.stop()


# =========================================================================== 3. outage


OUTAGE_SECONDS = 2.0


async def _token_request(d: Deployment, load: Load) -> httpx.Response | None:
    """A fresh client-credentials exchange (the token endpoint records the assertion)."""
    officer = d.officer
    assertion = make_client_assertion(
        officer.client_id, officer.private_jwk, officer.token_endpoint
    )
    load.requests += 1
    started = time.monotonic()
    try:
        resp = await officer.http.post(
            "/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
            },
        )
    except httpx.TransportError:
        load.transport_errors += 1
        return None
    finally:
        load.slowest = max(load.slowest, time.monotonic() - started)
    load.statuses[resp.status_code] += 1
    return resp


async def _outage_traffic(d: Deployment, load: Load, stop: asyncio.Event, seed: int) -> None:
    """Disclosures, consent reads, revocations and token requests while the database is
    gone: each must end in 503 problem+json, quickly."""
    rng = random.Random(seed)
    while not stop.is_set():
        n = rng.randrange(len(d.grants))
        kind = rng.choice(["disclose", "read", "revoke", "token"])
        if kind == "token":
            resp = await _token_request(d, load)
        elif kind == "disclose":
            resp = await load.call(d.officer, "POST", "/v1/disclosures", json=_disclosure_ask(n))
        elif kind == "read":
            resp = await load.call(d.advocate, "GET", f"/v1/consents/{d.grants[n]}")
        else:
            resp = await load.call(
                d.advocate, "POST", f"/v1/consents/{d.grants[n]}/revoke", json=_revocation()
            )
        if resp is None:
            load.bad.append(f"{kind}: no answer")
        elif resp.status_code != 503 or resp.headers.get("content-type") != PROBLEM:
            load.bad.append(f"{kind} {resp.status_code}: {resp.text[:200]}")
        else:
            assert "eyJ" not in resp.text


@pytest.mark.postgres_only
async def test_database_outage_under_load_recovers_without_restart(
    database_url: str, tmp_path: Path
) -> None:
    """The test database refuses connections for ~2 s and every connection to it is killed,
    under load. Requests get 503 problem+json (never 500, never a hang); afterwards the
    same process answers 200 again, its sequencer resumes and the ledger verifies."""
    port = free_port()
    env = _env(database_url, tmp_path, port)
    db = _dbname(database_url)
    with _serving(env, tmp_path / "serve.log", port) as proc:
        assert proc.proc is not None
        pid = proc.proc.pid
        d = await _deploy(env, proc.url, tmp_path, 4)
        before = await d.officer.post("/v1/disclosures", json=_disclosure_ask(0))
        assert before.status_code == 200, before.text

        load, stop = Load(), asyncio.Event()
        async with _allow_connections_restored(db):
            await _set_allow_connections(db, False)
            killed = await _terminate_backends(db)
            workers = [
                asyncio.create_task(_outage_traffic(d, load, stop, seed)) for seed in range(3)
            ]
            await asyncio.sleep(OUTAGE_SECONDS)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), HTTP_TIMEOUT + 5)
            await _set_allow_connections(db, True)

        async def serves() -> bool:
            r = await d.officer.post("/v1/disclosures", json=_disclosure_ask(1))
            return r.status_code == 200

        recovered = await wait_until(serves, 15, "200 again after the outage", step=0.2)
        same_process = proc.proc.poll() is None and proc.proc.pid == pid
        after = await d.officer.post("/v1/disclosures", json=_disclosure_ask(2))
        assert after.status_code == 200, after.text
        entry = after.json()["ledger_entry"]

        async def integrated() -> bool:
            async with _pg(_dsn(database_url)) as conn:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM ledger_entries WHERE entry_id = $1", entry
                    )
                )

        resumed = await wait_until(integrated, 15, "background sequencer resumed", step=0.2)
        await _drained(database_url, 15)
        async with _engine(database_url) as engine:
            stored = await _stored(engine)
        entries = await _verified_export(d)
        problems = stored.problems()
        record(
            "fault",
            "PostgreSQL outage under load, no restart",
            tried=load.requests,
            survived=load.statuses[503] if not problems else 0,
            faults=1,
            requests_during_fault=load.requests,
            connections_killed=killed,
            outage_seconds=OUTAGE_SECONDS,
            slowest_answer_seconds=round(load.slowest, 2),
            recovered_seconds=round(recovered, 2),
            sequencer_resumed_seconds=round(resumed, 2),
            entries_verified=entries,
            lost=len(problems),
        )
        assert killed >= 1, "the broker's connections were killed"
        assert load.bad == [], load.bad[:5]
        assert load.statuses[503] == load.requests > 10, load.statuses
        assert load.slowest < HTTP_TIMEOUT / 2, f"slowest answer {load.slowest:.1f}s"
        assert same_process, "recovered without a restart"
        assert problems == []
        assert all(v == [1] for v in stored.versions.values()), "no revocation half done"
        assert before.json()["ledger_entry"] in stored.entry_ids
        assert entries == len(stored.indices)
        await d.aclose()
