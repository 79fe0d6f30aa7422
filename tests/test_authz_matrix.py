"""Authorization matrix: every route of the app × every caller, from the app's own route table.

``EXPECTED`` is the contract, written out by hand: for each (method, path template)
the status each caller must get — anonymous, admin, agency, advocate, auditor — and,
where the path names a resource an agency owns, what a caller with the right role
but from *another* agency gets (404, the same bytes as for an id that does not
exist: no existence oracle). The route table is read from the app, so a new route
without a row fails ``test_every_route_has_a_row``, and a row whose route is gone
fails ``test_every_row_has_a_route``.

Each column runs as one test per backend against a shared scene (story 1 plus an
auditor and a rival shelter); routes that change state get fresh resources per
call. Every caller holds a real ``private_key_jwt`` token. After each column the
ledger is drained, exported and verified.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from broker.app import create_app
from broker.ledger.sequencer import integrate_until_empty, tree_size
from broker.sdk import ASSERTION_TYPE, BrokerClient, make_client_assertion
from broker.settings import Settings
from tests.ledger_check import check_ledger
from tests.reliability import record
from tests.support import (
    BASE_URL,
    Story,
    World,
    attestation,
    consent_body,
    enc_keypair,
    sig_keypair,
    story_one,
)

Expect = int | frozenset[int]
Op = tuple[str, str]

U, F, N = 401, 403, 404  # unauthenticated, wrong role, not yours (uniform not-found)
OK, NEW = 200, 201


@dataclass(frozen=True)
class Row:
    anonymous: Expect
    admin: Expect
    agency: Expect
    advocate: Expect
    auditor: Expect
    other: tuple[str, Expect] | None = None
    """(role, expected) for a caller holding that role in another agency."""


PUBLIC = Row(OK, OK, OK, OK, OK)
ADMIN = Row(U, OK, F, F, F)
ADMIN_NEW = Row(U, NEW, F, F, F)
AUDITOR = Row(U, F, F, F, OK)

# fmt: off
EXPECTED: dict[Op, Row] = {
    # method, path template                                  anon admin agency advocate auditor  other agency
    ("GET", "/openapi.json"):                                PUBLIC,
    ("GET", "/docs"):                                        PUBLIC,
    ("GET", "/docs/oauth2-redirect"):                        PUBLIC,
    ("GET", "/redoc"):                                       PUBLIC,
    ("POST", "/oauth/token"):                                PUBLIC,  # each caller presents its own assertion
    ("GET", "/.well-known/oauth-authorization-server"):      PUBLIC,
    ("GET", "/.well-known/jwks.json"):                       PUBLIC,
    ("GET", "/v1/ledger/key"):                               PUBLIC,
    ("GET", "/livez"):                                       PUBLIC,
    ("GET", "/readyz"):                                      PUBLIC,
    ("GET", "/v1/agencies"):                                 ADMIN,
    ("POST", "/v1/agencies"):                                ADMIN_NEW,
    ("GET", "/v1/agencies/{agency_id}"):                     ADMIN,
    ("PATCH", "/v1/agencies/{agency_id}"):                   ADMIN,
    ("POST", "/v1/clients"):                                 ADMIN_NEW,
    ("DELETE", "/v1/clients/{client_id}"):                   ADMIN,
    ("POST", "/v1/subjects"):                                Row(U, F, F, NEW, F),
    ("GET", "/v1/subjects/{subject_id}"):                    Row(U, F, F, OK, F, other=("advocate", N)),
    ("DELETE", "/v1/subjects/{subject_id}"):                 Row(U, F, F, OK, F, other=("advocate", N)),
    ("POST", "/v1/subjects/{subject_id}/references"):        Row(U, F, F, NEW, F, other=("advocate", N)),
    ("GET", "/v1/subjects/{subject_id}/disclosures"):        Row(U, F, F, OK, F, other=("advocate", N)),
    ("POST", "/v1/consents"):                                Row(U, F, F, NEW, F, other=("advocate", N)),
    ("GET", "/v1/consents/{grant_id}"):                      Row(U, F, F, OK, F, other=("advocate", N)),
    ("POST", "/v1/consents/{grant_id}/versions"):            Row(U, F, F, NEW, F, other=("advocate", N)),
    ("GET", "/v1/consents/{grant_id}/versions"):             Row(U, F, F, OK, F, other=("advocate", N)),
    ("GET", "/v1/consents/{grant_id}/versions/{number}"):    Row(U, F, F, OK, F, other=("advocate", N)),
    ("POST", "/v1/consents/{grant_id}/pause"):               Row(U, F, F, OK, F, other=("advocate", N)),
    ("POST", "/v1/consents/{grant_id}/resume"):              Row(U, F, F, OK, F, other=("advocate", N)),
    ("POST", "/v1/consents/{grant_id}/revoke"):              Row(U, F, F, OK, F, other=("advocate", N)),
    ("GET", "/v1/consents/{grant_id}/notices"):              Row(U, F, F, OK, F, other=("advocate", N)),
    ("GET", "/v1/consents/{grant_id}/fhir"):                 Row(U, F, F, OK, F, other=("advocate", N)),
    # Another agency asking about the survivor gets the uniform disclosure denial.
    ("POST", "/v1/disclosures"):                             Row(U, F, OK, F, F, other=("agency", F)),
    # Only her enrolling agency or a source of her grants may deposit (the police are
    # neither): anyone else, known reference or not, gets the same 404.
    ("POST", "/v1/records"):                                 Row(U, F, N, F, F, other=("agency", N)),
    ("GET", "/v1/disclosures/{disclosure_id}/receipt"):      Row(U, F, OK, F, OK, other=("agency", N)),  # integrated first
    ("GET", "/v1/audit/denials"):                            AUDITOR,
    ("GET", "/v1/ledger/checkpoint"):                        AUDITOR,
    ("GET", "/v1/ledger/entries"):                           AUDITOR,
    ("GET", "/v1/ledger/proofs/inclusion"):                  AUDITOR,
    ("GET", "/v1/ledger/proofs/consistency"):                AUDITOR,
    ("GET", "/v1/ledger/export"):                            AUDITOR,
}
# fmt: on

COLUMNS = ("anonymous", "admin", "agency", "advocate", "auditor", "other")

SHELTER_RECORD = {"intake_date": "2024-03-02", "bed_status": "assigned"}
ASK = {"subject_ref": "PD-24-0193", "category": "shelter", "purpose": "safety_planning"}


# --- the route table ---------------------------------------------------------------------------


def route_table(app: FastAPI) -> tuple[set[Op], list[str]]:
    """(method, path) of every HTTP route, recursing into included routers.

    FastAPI ≥ 0.130 keeps included routers as wrapper objects in ``app.routes``;
    ``iter_route_contexts`` flattens them. Anything that still has no path and
    methods (a Mount, a websocket, an unknown wrapper) is returned as unreadable,
    so the test fails instead of silently missing routes.
    """
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        routes: list[Any] = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    ops: set[Op] = set()
    unreadable: list[str] = []
    for route in routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if not isinstance(path, str) or not methods:
            unreadable.append(repr(route))
            continue
        names = set(methods)
        if "GET" in names:
            names.discard("HEAD")  # Starlette answers HEAD for every GET route
        ops.update((m, path) for m in names)
    return ops, unreadable


def openapi_ops(app: FastAPI) -> set[Op]:
    return {(m.upper(), p) for p, item in app.openapi()["paths"].items() for m in item}


@pytest.fixture
def bare_app(key_dir: Path, tmp_path: Path) -> FastAPI:
    """The app as configured, not started: enough to read its routes."""
    return create_app(
        Settings(
            environment="dev",
            database_url=f"sqlite+aiosqlite:///{tmp_path}/routes.db",
            key_dir=key_dir,
            public_url=BASE_URL,
            run_background_workers=False,
        )
    )


def test_route_table_is_complete(bare_app: FastAPI) -> None:
    ops, unreadable = route_table(bare_app)
    assert not unreadable, f"routes the matrix cannot enumerate: {unreadable}"
    missed = openapi_ops(bare_app) - ops
    assert not missed, f"the route-table walk missed documented operations: {sorted(missed)}"


def test_every_route_has_a_row(bare_app: FastAPI) -> None:
    ops, _ = route_table(bare_app)
    missing = sorted(ops - EXPECTED.keys())
    assert not missing, (
        "routes without a row in EXPECTED (add them with their roles): "
        + ", ".join(f"{m} {p}" for m, p in missing)
    )


def test_every_row_has_a_route(bare_app: FastAPI) -> None:
    ops, _ = route_table(bare_app)
    stale = sorted(EXPECTED.keys() - ops)
    assert not stale, "rows in EXPECTED for routes the app does not have: " + ", ".join(
        f"{m} {p}" for m, p in stale
    )


def test_drift_is_detected(bare_app: FastAPI) -> None:
    """The checks above would notice a route added through a nested, prefixed router."""
    inner = APIRouter(prefix="/things")

    @inner.get("/{thing_id}")
    async def get_thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    outer = APIRouter(prefix="/v1")
    outer.include_router(inner)
    bare_app.include_router(outer)
    ops, unreadable = route_table(bare_app)
    assert not unreadable
    assert ops - EXPECTED.keys() == {("GET", "/v1/things/{thing_id}")}


def test_every_row_has_a_request() -> None:
    assert EXPECTED.keys() == BUILDERS.keys(), sorted(EXPECTED.keys() ^ BUILDERS.keys())


# --- the scene ---------------------------------------------------------------------------------


@dataclass
class Scene:
    world: World
    story: Story
    auditor: BrokerClient
    rival_advocate: BrokerClient
    rival_agency: BrokerClient
    grant_id: str
    disclosure_id: str
    _n: int = field(default=0)

    def unique(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n}-{uuid.uuid4().hex[:6]}"

    @property
    def admin(self) -> BrokerClient:
        assert self.world.admin is not None
        return self.world.admin

    async def fresh_subject(self) -> str:
        return await self.world.subject(self.story.advocate)

    async def fresh_grant(self) -> str:
        subject_id = await self.fresh_subject()
        grant = await self.world.grant(
            self.story.advocate,
            **consent_body(
                subject_id=subject_id,
                source_agency_ids=[self.story.shelter.id],
                recipient_agency_id=self.story.police.id,
            ),
        )
        return str(grant["id"])

    async def size(self) -> int:
        await integrate_until_empty(self.world.rt)
        async with self.world.rt.sessionmaker() as session:
            return await tree_size(session)


async def build_scene(world: World) -> Scene:
    s = await story_one(world)
    depositor = await world.client(s.shelter.id, "agency", "shelter case system")
    r = await depositor.post(
        "/v1/records",
        json={"subject_ref": "HH-2024-0042", "category": "shelter", "record": SHELTER_RECORD},
    )
    assert r.status_code == 201, r.text
    grant = await world.grant(
        s.advocate,
        **consent_body(
            subject_id=s.subject_id,
            source_agency_ids=[s.shelter.id],
            recipient_agency_id=s.police.id,
        ),
    )
    d = await s.officer.post("/v1/disclosures", json=ASK)
    assert d.status_code == 200, d.text
    oversight = await world.agency("State oversight office", "oversight")
    auditor = await world.client(oversight.id, "auditor", "oversight auditor")
    rival = await world.agency("Rival Shelter", "shelter")
    rival_advocate = await world.client(rival.id, "advocate", "rival advocate")
    rival_agency = await world.client(rival.id, "agency", "rival case system")
    await integrate_until_empty(world.rt)
    return Scene(
        world, s, auditor, rival_advocate, rival_agency, str(grant["id"]), d.json()["disclosure_id"]
    )


# --- one realistic request per route -----------------------------------------------------------


@dataclass(frozen=True)
class Call:
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    data: dict[str, str] | None = None


# ``ghost`` asks for the same request naming resources that do not exist (for oracle checks).
Builder = Callable[[Scene, BrokerClient | None, bool], Awaitable[Call]]
BUILDERS: dict[Op, Builder] = {}


def builds(method: str, path: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        BUILDERS[(method, path)] = fn
        return fn

    return register


def _ghost_id() -> str:
    return str(uuid.uuid4())


def _lifecycle() -> dict[str, Any]:
    return {"attestation": attestation(), "reason": "Survivor asked in person."}


def _simple(method: str, path: str) -> None:
    async def build(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
        return Call(path)

    builds(method, path)(build)


for _op in [
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/.well-known/oauth-authorization-server"),
    ("GET", "/.well-known/jwks.json"),
    ("GET", "/v1/ledger/key"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/v1/agencies"),
    ("GET", "/v1/audit/denials"),
    ("GET", "/v1/ledger/checkpoint"),
    ("GET", "/v1/ledger/export"),
]:
    _simple(*_op)


@builds("POST", "/oauth/token")
async def _token(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    who = caller or scene.auditor  # anonymous: a client that is not yet holding a token
    assertion = make_client_assertion(who.client_id, who.private_jwk, f"{BASE_URL}/oauth/token")
    return Call(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
    )


@builds("POST", "/v1/agencies")
async def _agency_create(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    _, enc_jwks = enc_keypair()
    return Call(
        "/v1/agencies",
        json={
            "name": scene.unique("Matrix Clinic"),
            "kind": "medical",
            "encryption_jwks": enc_jwks,
        },
    )


@builds("GET", "/v1/agencies/{agency_id}")
async def _agency_get(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    return Call(f"/v1/agencies/{scene.story.shelter.id}")


@builds("PATCH", "/v1/agencies/{agency_id}")
async def _agency_patch(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    target = await scene.world.agency(scene.unique("Patch Target"), "legal_aid")
    return Call(f"/v1/agencies/{target.id}", json={"name": scene.unique("Renamed")})


@builds("POST", "/v1/clients")
async def _client_create(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    _, jwks = sig_keypair()
    return Call(
        "/v1/clients",
        json={"agency_id": scene.story.shelter.id, "role": "agency", "name": "m", "jwks": jwks},
    )


@builds("DELETE", "/v1/clients/{client_id}")
async def _client_delete(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    victim = await scene.world.client(scene.story.shelter.id, "agency", "to withdraw")
    return Call(f"/v1/clients/{victim.client_id}")


@builds("POST", "/v1/subjects")
async def _subject_create(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    return Call("/v1/subjects", json={})


@builds("GET", "/v1/subjects/{subject_id}")
async def _subject_get(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    return Call(f"/v1/subjects/{_ghost_id() if ghost else scene.story.subject_id}")


@builds("DELETE", "/v1/subjects/{subject_id}")
async def _subject_erase(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    subject_id = _ghost_id() if ghost else await scene.fresh_subject()
    return Call(f"/v1/subjects/{subject_id}", json=_lifecycle())


@builds("POST", "/v1/subjects/{subject_id}/references")
async def _reference(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    subject_id = _ghost_id() if ghost else scene.story.subject_id
    return Call(
        f"/v1/subjects/{subject_id}/references",
        json={"agency_id": scene.story.police.id, "reference": scene.unique("PD")},
    )


@builds("GET", "/v1/subjects/{subject_id}/disclosures")
async def _accounting(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    return Call(f"/v1/subjects/{_ghost_id() if ghost else scene.story.subject_id}/disclosures")


@builds("POST", "/v1/consents")
async def _consent_create(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    body = consent_body(
        subject_id=_ghost_id() if ghost else scene.story.subject_id,
        source_agency_ids=[scene.story.shelter.id],
        recipient_agency_id=scene.story.police.id,
    )
    return Call("/v1/consents", json=body)


def _grant_read(suffix: str) -> Builder:
    async def build(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
        return Call(f"/v1/consents/{_ghost_id() if ghost else scene.grant_id}{suffix}")

    return build


for _suffix in ["", "/versions", "/versions/1", "/notices", "/fhir"]:
    _template = "/versions/{number}" if _suffix == "/versions/1" else _suffix
    builds("GET", f"/v1/consents/{{grant_id}}{_template}")(_grant_read(_suffix))


@builds("POST", "/v1/consents/{grant_id}/versions")
async def _revise(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    grant_id = _ghost_id() if ghost else await scene.fresh_grant()
    body = consent_body(source_agency_ids=[scene.story.shelter.id], purposes=["housing_placement"])
    return Call(f"/v1/consents/{grant_id}/versions", json=body)


def _lifecycle_call(change: str, *, paused_first: bool = False) -> Builder:
    async def build(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
        if ghost:
            return Call(f"/v1/consents/{_ghost_id()}/{change}", json=_lifecycle())
        grant_id = await scene.fresh_grant()
        if paused_first:
            r = await scene.story.advocate.post(f"/v1/consents/{grant_id}/pause", json=_lifecycle())
            assert r.status_code == 200, r.text
        return Call(f"/v1/consents/{grant_id}/{change}", json=_lifecycle())

    return build


builds("POST", "/v1/consents/{grant_id}/pause")(_lifecycle_call("pause"))
builds("POST", "/v1/consents/{grant_id}/resume")(_lifecycle_call("resume", paused_first=True))
builds("POST", "/v1/consents/{grant_id}/revoke")(_lifecycle_call("revoke"))


@builds("POST", "/v1/disclosures")
async def _disclose(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    return Call("/v1/disclosures", json=ASK | {"subject_ref": scene.unique("PD")} if ghost else ASK)


@builds("POST", "/v1/records")
async def _deposit(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    ref = scene.unique("REF") if ghost else scene.story.police_ref
    return Call(
        "/v1/records", json={"subject_ref": ref, "category": "shelter", "record": SHELTER_RECORD}
    )


@builds("GET", "/v1/disclosures/{disclosure_id}/receipt")
async def _receipt(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    await integrate_until_empty(scene.world.rt)
    return Call(f"/v1/disclosures/{_ghost_id() if ghost else scene.disclosure_id}/receipt")


@builds("GET", "/v1/ledger/entries")
async def _entries(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    await integrate_until_empty(scene.world.rt)
    return Call("/v1/ledger/entries", params={"from_index": 0, "limit": 10})


@builds("GET", "/v1/ledger/proofs/inclusion")
async def _inclusion(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    return Call("/v1/ledger/proofs/inclusion", params={"index": 0, "tree_size": await scene.size()})


@builds("GET", "/v1/ledger/proofs/consistency")
async def _consistency(scene: Scene, caller: BrokerClient | None, ghost: bool) -> Call:
    return Call("/v1/ledger/proofs/consistency", params={"first": 1, "second": await scene.size()})


# --- running the cells -------------------------------------------------------------------------


def _allowed(expect: Expect) -> frozenset[int]:
    return expect if isinstance(expect, frozenset) else frozenset({expect})


def _caller(scene: Scene, column: str, row: Row) -> BrokerClient | None:
    match column:
        case "anonymous":
            return None
        case "admin":
            return scene.admin
        case "agency":
            return scene.story.officer
        case "advocate":
            return scene.story.advocate
        case "auditor":
            return scene.auditor
    assert row.other is not None
    return scene.rival_advocate if row.other[0] == "advocate" else scene.rival_agency


async def _send(
    scene: Scene, caller: BrokerClient | None, method: str, call: Call
) -> httpx.Response:
    kwargs: dict[str, Any] = {"params": call.params}
    if call.json is not None:
        kwargs["json"] = call.json
    if call.data is not None:
        kwargs["data"] = call.data
    if caller is None:
        return await scene.world.http.request(method, call.path, **kwargs)
    return await caller.request(method, call.path, **kwargs)


def _problem_shape(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    return {k: body.get(k) for k in ("type", "title", "status", "detail")}


async def _run_cell(scene: Scene, column: str, op: Op, row: Row) -> str | None:
    """None if the cell holds, else a description of the mismatch."""
    expect = row.other[1] if column == "other" and row.other else getattr(row, column)
    method, template = op
    caller = _caller(scene, column, row)
    call = await BUILDERS[op](scene, caller, False)
    resp = await _send(scene, caller, method, call)
    label = f"{column:9} {method} {template}"
    if resp.status_code not in _allowed(expect):
        return f"{label}: expected {sorted(_allowed(expect))}, got {resp.status_code} {resp.text[:200]}"
    if resp.status_code >= 400 and resp.headers.get("content-type") != "application/problem+json":
        return f"{label}: {resp.status_code} is not application/problem+json"
    if column == "other":
        # No existence oracle: another agency's resource and no resource look the same.
        ghost = await _send(scene, caller, method, await BUILDERS[op](scene, caller, True))
        if ghost.status_code != resp.status_code or _problem_shape(ghost) != _problem_shape(resp):
            return (
                f"{label}: another agency's resource ({resp.status_code} {_problem_shape(resp)}) "
                f"differs from a missing one ({ghost.status_code} {_problem_shape(ghost)})"
            )
    return None


@pytest.mark.parametrize("column", COLUMNS)
async def test_matrix(world: World, backend: str, column: str) -> None:
    scene = await build_scene(world)
    ops, _ = route_table(world.app)
    cells = [(op, row) for op, row in EXPECTED.items() if op in ops]
    if column == "other":
        cells = [(op, row) for op, row in cells if row.other is not None]
    assert cells, "no cells to run"
    failures = [f for op, row in cells if (f := await _run_cell(scene, column, op, row))]

    ledger = await check_ledger(world.rt, world.http, scene.auditor)
    record(
        "matrix",
        column,
        tried=len(cells),
        survived=len(cells) - len(failures),
        backend=backend,
        oracle_checks=len(cells) if column == "other" else 0,
    )
    record(
        "ledger",
        f"after matrix column {column}",
        tried=ledger.stored,
        survived=ledger.entries if ledger.ok else 0,
        backend=backend,
        pending=ledger.pending,
    )
    assert not failures, f"{len(failures)} of {len(cells)} cells failed:\n" + "\n".join(failures)
    assert ledger.ok, f"ledger after the matrix: {ledger}"
