"""A realistic world to disclose from: agencies, credentials, survivors, grants, records.

How it is built (and why):

* The first admin is bootstrapped in the database exactly as ``broker clients
  add --role admin`` does; everything an operator does after that (agencies with
  fresh encryption keys, clients with fresh signing keys) goes over HTTP with
  real ``private_key_jwt`` tokens.
* The first ``SERVICE_SEEDED`` survivors are enrolled, their case references
  linked and their consents granted **in-process through the broker's own
  service functions** (``broker.subjects.service``, ``broker.consent.service``)
  against the same database: the rows, ledger entries and validation are the
  ones the API writes. The rest are cloned from survivor 0's rows in bulk
  (``bench.clone``), because the services cost ~35 ms per survivor here.
* Held records are deposited by the holding agency over HTTP
  (``POST /v1/records``), driven by the load generator.

Cast: Harbor House (shelter, deposits records), Eastside Shelter (shelter with a
records endpoint), Eastside PD DV Unit (asks Harbor House's records), Legal Aid
of the Valley (asks Eastside Shelter's records), and St. Mary's clinic, which
holds no grant and is there so queries see more than the parties they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from joserfc.jwk import ECKey, OKPKey
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from bench.clone import Template, clone_survivors
from bench.data import ENDPOINT_FIELDS, HELD_FIELDS, shelter_record
from broker.agencies.service import issue_operator_client
from broker.auth.roles import ROLE_SCOPES, Principal, Role
from broker.consent.schemas import Attestation, AttestationMethod, ConsentCreate
from broker.consent.service import grant
from broker.models import LedgerPending, SubjectReference
from broker.runtime import Runtime, build_runtime
from broker.sdk import BrokerClient
from broker.settings import Settings
from broker.subjects.schemas import ReferenceCreate
from broker.subjects.service import enrol, link_reference

SERVICE_SEEDED = 50
CLONE_BATCH = 500


def sig_keypair() -> tuple[dict[str, Any], dict[str, Any]]:
    key = ECKey.generate_key("P-256", auto_kid=True)
    public = key.as_dict(private=False) | {"use": "sig"}
    return key.as_dict(private=True), {"keys": [public]}


def enc_keypair() -> tuple[dict[str, Any], dict[str, Any]]:
    key = OKPKey.generate_key("X25519", auto_kid=True)
    public = key.as_dict(private=False) | {"use": "enc", "alg": "ECDH-ES+A256KW"}
    return key.as_dict(private=True), {"keys": [public]}


@dataclass
class Credential:
    client_id: str
    private_jwk: dict[str, Any]

    def client(self, url: str) -> BrokerClient:
        return BrokerClient(url, self.client_id, self.private_jwk)


def fetch_token(url: str, cred: Credential) -> str:
    """A fresh access token for ``cred`` from the broker at ``url`` (blocking)."""

    async def fetch() -> str:
        client = cred.client(url)
        try:
            return await client.fetch_token()
        finally:
            await client.aclose()

    return asyncio.run(fetch())


@dataclass
class AgencyHandle:
    id: str
    name: str
    enc_private: dict[str, Any]


@dataclass
class World:
    url: str
    survivors: int
    admin: Credential
    agencies: dict[str, AgencyHandle] = field(default_factory=dict)
    clients: dict[str, Credential] = field(default_factory=dict)

    def ref(self, agency: str, i: int) -> str:
        prefix = {"harbor": "HH", "eastside": "ES", "police": "PD", "legal": "LA"}[agency]
        return f"{prefix}-{i:06d}"


# --------------------------------------------------------------------------- bootstrap


@contextlib.asynccontextmanager
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """The broker's runtime in this process, against the benchmark's database."""
    rt = build_runtime(settings)
    try:
        yield rt
    finally:
        await rt.aclose()


async def bootstrap_client(
    settings: Settings, role: Role = Role.admin, name: str = "bench-ops"
) -> Credential:
    """A credential made in the database as ``broker clients add --role ROLE`` does."""
    private, public = sig_keypair()
    async with runtime(settings) as rt, rt.sessionmaker() as session, session.begin():
        client = await issue_operator_client(session, rt, role=role, name=name, jwks=public)
        return Credential(client.id, private)


def _ok(resp: httpx.Response, status: int) -> dict[str, Any]:
    if resp.status_code != status:
        raise RuntimeError(f"{resp.request.url.path} -> {resp.status_code}: {resp.text[:500]}")
    body: dict[str, Any] = resp.json()
    return body


async def register_cast(
    settings: Settings, url: str, survivors: int, records_endpoint: str | None
) -> World:
    """Agencies and clients through the admin API, as an operator would."""
    world = World(url=url, survivors=survivors, admin=await bootstrap_client(settings))
    admin = world.admin.client(url)
    try:
        cast = [
            ("harbor", "Harbor House", "shelter", None),
            ("eastside", "Eastside Shelter", "shelter", records_endpoint),
            ("police", "Eastside PD DV Unit", "law_enforcement", None),
            ("legal", "Legal Aid of the Valley", "legal_aid", None),
            ("clinic", "St. Mary's clinic", "medical", None),
        ]
        for key, name, kind, endpoint in cast:
            if key == "eastside" and endpoint is None:
                continue
            enc_private, enc_public = enc_keypair()
            body = {
                "name": name,
                "kind": kind,
                "encryption_jwks": enc_public,
                "records_endpoint": endpoint,
            }
            made = _ok(await admin.post("/v1/agencies", json=body), 201)
            world.agencies[key] = AgencyHandle(made["id"], name, enc_private)
        roles = [
            ("advocate", "harbor", "advocate"),
            ("harbor", "harbor", "agency"),
            ("police", "police", "agency"),
            ("legal", "legal", "agency"),
        ]
        auditor_home = world.agencies["clinic"].id
        for key, agency, role in roles:
            world.clients[key] = await _issue(admin, world.agencies[agency].id, role, key)
        world.clients["auditor"] = await _issue(admin, auditor_home, "auditor", "auditor")
    finally:
        await admin.aclose()
    return world


async def _issue(admin: BrokerClient, agency_id: str, role: str, name: str) -> Credential:
    private, public = sig_keypair()
    body = {"agency_id": agency_id, "role": role, "name": f"bench {name}", "jwks": public}
    made = _ok(await admin.post("/v1/clients", json=body), 201)
    return Credential(made["client_id"], private)


# --------------------------------------------------------------------------- survivors


def _attestation(now: datetime) -> Attestation:
    return Attestation(
        method=AttestationMethod.written,
        signed_at=now - timedelta(minutes=5),
        document_sha256=hashlib.sha256(b"signed consent form").hexdigest(),
    )


async def _seed_one(
    rt: Runtime, session: AsyncSession, actor: Principal, world: World, i: int
) -> None:
    now = datetime.now(UTC)
    subject = await enrol(session, rt, actor)
    a = world.agencies
    links = [("harbor", "harbor"), ("police", "police")]
    if "eastside" in a:
        links += [("eastside", "eastside"), ("legal", "legal")]
    for agency, ref_kind in links:
        await link_reference(
            session,
            rt,
            actor,
            subject.id,
            ReferenceCreate(agency_id=a[agency].id, reference=world.ref(ref_kind, i)),
        )
    terms: dict[str, Any] = {
        "purposes": ["safety_planning"],
        "expires_at": now + timedelta(days=90),
        "data_life_days": 30,
        "attestation": _attestation(now),
        "reason": "Survivor agreed in writing at intake.",
    }
    await grant(
        session,
        rt,
        actor,
        ConsentCreate(
            subject_id=subject.id,
            source_agency_ids=[a["harbor"].id],
            recipient_agency_id=a["police"].id,
            fields={"shelter": HELD_FIELDS},
            **terms,
        ),
    )
    if "eastside" in a:
        terms["purposes"] = ["legal_representation"]
        await grant(
            session,
            rt,
            actor,
            ConsentCreate(
                subject_id=subject.id,
                source_agency_ids=[a["eastside"].id],
                recipient_agency_id=a["legal"].id,
                fields={"shelter": ENDPOINT_FIELDS},
                **terms,
            ),
        )


async def seed_survivors(settings: Settings, world: World) -> None:
    """Survivors through the broker's services, then cloned in bulk (see ``bench.clone``)."""
    advocate = Principal(
        client_id=world.clients["advocate"].client_id,
        agency_id=world.agencies["harbor"].id,
        role=Role.advocate,
        scopes=frozenset(ROLE_SCOPES[Role.advocate]),
        expires_at=datetime.now(UTC) + timedelta(hours=2),
    )
    by_id = {a.id: key for key, a in world.agencies.items()}
    through_services = min(world.survivors, SERVICE_SEEDED)
    async with runtime(settings) as rt:
        async with rt.sessionmaker() as session, session.begin():
            for i in range(through_services):
                await _seed_one(rt, session, advocate, world, i)
        async with rt.sessionmaker() as session:
            first = await session.scalar(
                select(SubjectReference.subject_id).where(
                    SubjectReference.agency_id == world.agencies["harbor"].id,
                    SubjectReference.reference == world.ref("harbor", 0),
                )
            )
            assert first is not None
            template = await Template.load(session, rt, first)
        for start in range(through_services, world.survivors, CLONE_BATCH):
            batch = range(start, min(start + CLONE_BATCH, world.survivors))
            async with rt.sessionmaker() as session, session.begin():
                await clone_survivors(
                    session, rt, template, batch, lambda agency, i: world.ref(by_id[agency], i)
                )


def deposit_bodies(world: World, count: int) -> list[str]:
    """``POST /v1/records`` bodies for Harbor House's held store, survivors ``0 .. count-1``."""
    return [
        orjson.dumps(
            {
                "subject_ref": world.ref("harbor", i),
                "category": "shelter",
                "record": shelter_record(i),
            }
        ).decode()
        for i in range(count)
    ]


async def wait_ledger_drained(settings: Settings, limit_seconds: float = 600.0) -> int:
    """Wait until the broker's sequencer has integrated the seeding's entries; returns the rest."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_seconds
    async with runtime(settings) as rt:
        while True:
            async with rt.sessionmaker() as session:
                count = await session.scalar(select(func.count()).select_from(LedgerPending))
            left = int(count or 0)
            if left == 0 or loop.time() > deadline:
                return left
            await asyncio.sleep(0.5)
