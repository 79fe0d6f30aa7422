"""Test helpers: a small world of agencies, clients and survivors built through the API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from joserfc.jwk import ECKey, OKPKey
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from broker.agencies.service import issue_operator_client
from broker.auth.roles import Role
from broker.runtime import Runtime
from broker.sdk import BrokerClient

BASE_URL = "http://broker.test"


def sig_keypair(curve: str = "P-256") -> tuple[dict[str, Any], dict[str, Any]]:
    key: ECKey | OKPKey = (
        OKPKey.generate_key("Ed25519", auto_kid=True)
        if curve == "Ed25519"
        else ECKey.generate_key("P-256", auto_kid=True)
    )
    private = key.as_dict(private=True)
    public = key.as_dict(private=False)
    public["use"] = "sig"
    return private, {"keys": [public]}


def enc_keypair(curve: str = "X25519") -> tuple[dict[str, Any], dict[str, Any]]:
    key: ECKey | OKPKey = (
        OKPKey.generate_key("X25519", auto_kid=True)
        if curve == "X25519"
        else ECKey.generate_key("P-256", auto_kid=True)
    )
    private = key.as_dict(private=True)
    public = key.as_dict(private=False)
    public["use"] = "enc"
    public["alg"] = "ECDH-ES+A256KW"
    return private, {"keys": [public]}


def attestation(method: str = "written") -> dict[str, Any]:
    return {
        "method": method,
        "signed_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
        "document_sha256": hashlib.sha256(b"signed consent form").hexdigest(),
    }


def in_days(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


def checked_out(engine: AsyncEngine) -> int:
    """Connections of ``engine``'s pool in use now (the broker's engines use a QueuePool)."""
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool), type(pool)
    return pool.checkedout()


@dataclass
class AgencyHandle:
    id: str
    name: str
    enc_private: dict[str, Any]
    enc_jwks: dict[str, Any]


@dataclass
class World:
    app: FastAPI
    http: httpx.AsyncClient
    tmp: Path
    admin: BrokerClient | None = None
    ops_agency_id: str = ""
    clients: list[BrokerClient] = field(default_factory=list)

    @property
    def rt(self) -> Runtime:
        rt: Runtime = self.app.state.runtime
        return rt

    def client_for(self, client_id: str, private_jwk: dict[str, Any]) -> BrokerClient:
        c = BrokerClient(BASE_URL, client_id, private_jwk, http=self.http)
        self.clients.append(c)
        return c

    async def bootstrap(self) -> None:
        """The first admin is made from the shell (no API caller yet), as the CLI does."""
        private, public = sig_keypair()
        async with self.rt.sessionmaker() as session, session.begin():
            client = await issue_operator_client(
                session, self.rt, role=Role.admin, name="ops", jwks=public
            )
            self.ops_agency_id = client.agency_id
            admin_id = client.id
        self.admin = self.client_for(admin_id, private)

    async def agency(
        self,
        name: str = "Harbor House",
        kind: str = "shelter",
        *,
        enc_curve: str = "X25519",
        records_endpoint: str | None = None,
        webhook_url: str | None = None,
    ) -> AgencyHandle:
        assert self.admin is not None
        enc_private, enc_jwks = enc_keypair(enc_curve)
        resp = await self.admin.post(
            "/v1/agencies",
            json={
                "name": name,
                "kind": kind,
                "encryption_jwks": enc_jwks,
                "records_endpoint": records_endpoint,
                "webhook_url": webhook_url,
            },
        )
        assert resp.status_code == 201, resp.text
        return AgencyHandle(resp.json()["id"], name, enc_private, resp.json()["encryption_jwks"])

    async def client(self, agency_id: str, role: str, name: str = "client") -> BrokerClient:
        assert self.admin is not None
        private, public = sig_keypair()
        resp = await self.admin.post(
            "/v1/clients", json={"agency_id": agency_id, "role": role, "name": name, "jwks": public}
        )
        assert resp.status_code == 201, resp.text
        return self.client_for(resp.json()["client_id"], private)

    async def subject(self, advocate: BrokerClient, refs: dict[str, str] | None = None) -> str:
        resp = await advocate.post("/v1/subjects", json={})
        assert resp.status_code == 201, resp.text
        subject_id: str = resp.json()["subject_id"]
        for agency_id, ref in (refs or {}).items():
            r = await advocate.post(
                f"/v1/subjects/{subject_id}/references",
                json={"agency_id": agency_id, "reference": ref},
            )
            assert r.status_code == 201, r.text
        return subject_id

    async def grant(self, advocate: BrokerClient, **terms: Any) -> dict[str, Any]:
        resp = await advocate.post("/v1/consents", json=consent_body(**terms))
        assert resp.status_code == 201, resp.text
        body: dict[str, Any] = resp.json()
        return body


def consent_body(**terms: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "fields": {"shelter": ["intake_date", "bed_status"]},
        "purposes": ["safety_planning"],
        "expires_at": in_days(30),
        "data_life_days": 30,
        "max_uses": None,
        "excluded_client_ids": [],
        "attestation": attestation(),
        "reason": "Survivor agreed in writing at intake.",
    }
    body.update(terms)
    return body


@dataclass
class Story:
    """Story 1's cast: Harbor House (shelter), Eastside PD DV Unit, an advocate."""

    shelter: AgencyHandle
    police: AgencyHandle
    advocate: BrokerClient
    officer: BrokerClient
    subject_id: str
    police_ref: str


async def story_one(world: World, **shelter_kwargs: Any) -> Story:
    shelter = await world.agency("Harbor House", "shelter", **shelter_kwargs)
    police = await world.agency("Eastside Police DV Unit", "law_enforcement")
    advocate = await world.client(shelter.id, "advocate", "hotline advocate")
    officer = await world.client(police.id, "agency", "DV unit case system")
    subject_id = await world.subject(
        advocate, {police.id: "PD-24-0193", shelter.id: "HH-2024-0042"}
    )
    return Story(shelter, police, advocate, officer, subject_id, "PD-24-0193")


HELD_RECORD = {"intake_date": "2024-03-02", "bed_status": "assigned"}
#: Story 1's request: the DV Unit asks for M.'s shelter data under its own case number.
POLICE_ASK = {"subject_ref": "PD-24-0193", "category": "shelter", "purpose": "safety_planning"}


async def story_with_held_record(world: World) -> Story:
    """Story 1 with Harbor House's record deposited and M.'s grant to the DV Unit in force."""
    s = await story_one(world)
    depositor = await world.client(s.shelter.id, "agency", "shelter case system")
    deposit = {"subject_ref": "HH-2024-0042", "category": "shelter", "record": HELD_RECORD}
    r = await depositor.post("/v1/records", json=deposit)
    assert r.status_code == 201, r.text
    terms = consent_body(
        subject_id=s.subject_id, source_agency_ids=[s.shelter.id], recipient_agency_id=s.police.id
    )
    await world.grant(s.advocate, **terms)
    return s


async def revoke_by_phone(world: World, s: Story) -> dict[str, Any]:
    """Story 4: M. tells her advocate by phone to stop sharing; the new version's body."""
    from sqlalchemy import select

    from broker.models import ConsentGrant

    async with world.rt.sessionmaker() as session:
        grant_id = await session.scalar(
            select(ConsentGrant.id).where(ConsentGrant.subject_id == s.subject_id)
        )
    oral = {"attestation": attestation("verbal"), "reason": "M. asked by phone to stop."}
    revoked = await s.advocate.post(f"/v1/consents/{grant_id}/revoke", json=oral)
    assert revoked.status_code == 200, revoked.text
    body: dict[str, Any] = revoked.json()
    return body


async def count_rows(rt: Runtime, model: type[Any]) -> int:
    """Rows of ``model``'s table now."""
    from sqlalchemy import func, select

    async with rt.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def queued_entries(rt: Runtime, entry_type: str) -> list[dict[str, Any]]:
    """Bodies of the ledger entries of ``entry_type`` still in the outbox (tests run no
    sequencer), oldest first."""
    import orjson
    from sqlalchemy import select

    from broker.models import LedgerPending

    async with rt.sessionmaker() as session:
        bodies = await session.scalars(
            select(LedgerPending.body)
            .where(LedgerPending.entry_type == entry_type)
            .order_by(LedgerPending.seq)
        )
        return [orjson.loads(body) for body in bodies]


@contextlib.asynccontextmanager
async def broker_process(
    world: World, key_dir: Path, **settings: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """Another broker process on the world's database, with ``key_dir`` as its key folder."""
    from broker.app import create_app

    app = create_app(world.rt.settings.model_copy(update={"key_dir": key_dir, **settings}))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http,
    ):
        yield app, http


def runtime_of(app: FastAPI) -> Runtime:
    rt: Runtime = app.state.runtime
    return rt


def same_client(client: BrokerClient, http: httpx.AsyncClient) -> BrokerClient:
    """The same credential, talking to another process."""
    return BrokerClient(BASE_URL, client.client_id, client.private_jwk, http=http)


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]], within: float, what: str, step: float = 0.02
) -> float:
    """Poll ``check`` until it holds; the seconds it took. Fails after ``within`` seconds:
    a bound on waiting for something another task or process does, not a timing check."""
    started = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"timed out after {within}s: {what}"
        await asyncio.sleep(step)
