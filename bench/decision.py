"""Row 3: the consent decision, against cedarpy and against the size of the grant table.

Part 1 -- the pure function. ``broker.disclosure.decision.decide`` gets the grants
in force for one survivor (an active grant to the police DV unit with one
excluded officer, and a revoked older grant) and the minimisation policy. The
same rules are written as Cedar policies (``cedar_policies``): one ``permit`` per
active grant (recipient, purposes, validity window, granted fields), a
``forbid`` per excluded client, the minimisation policy as one ``forbid`` per
(category, purpose) rule, and the never-disclosable fields as a ``forbid``
unless the request named fields explicitly. Cedar answers allow/deny per
request, so the equivalent of one broker decision (which yields the field set)
is one ``is_authorized_batch`` over the requested fields; a single
``is_authorized`` call is timed too, as cedarpy's floor. Policies and entities
are parsed once into ``PolicySet``/``Entities`` handles outside the timing, and
both engines are checked to agree before anything is timed.

Part 2 -- resolve + decide at scale. A throwaway PostgreSQL database is migrated
and grown to 10, 10,000 and the largest size with ``INSERT ... SELECT
generate_series`` (one survivor, reference, grant head and version per grant);
at each size random survivors are resolved with
``broker.disclosure.repository.resolve`` (the one indexed query the disclosure
path runs) and decided, timed per call in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import cedarpy

from bench import infra
from bench.report import Row, us, verdict_at_most
from bench.world import runtime
from broker.auth.roles import Principal, Role
from broker.catalog import load_catalog
from broker.catalog.policy import Policy
from broker.crypto.keystore import BrokerKeys
from broker.disclosure import repository
from broker.disclosure.decision import Denied, DisclosureRequest, GrantView, decide
from broker.settings import REPO_ROOT, Settings

Progress = Callable[[str], None]
POLICE, HARBOR, OFFICER, EXCLUDED = "agency-police", "agency-harbor", "client-1", "client-9"
GRANTED = frozenset({"intake_date", "bed_status", "safety_plan_on_file", "shelter_location"})


def load_policy() -> tuple[Policy, dict[str, frozenset[str]]]:
    catalog = load_catalog(REPO_ROOT / "schemas", REPO_ROOT / "policies" / "minimisation.yaml")
    fields = {name: frozenset(schema.fields) for name, schema in catalog.schemas.items()}
    return catalog.policy, fields


def sample_grants(now: datetime) -> list[GrantView]:
    common: dict[str, Any] = {
        "recipient_agency_id": POLICE,
        "source_agency_ids": (HARBOR,),
        "purposes": frozenset({"safety_planning", "protective_order"}),
        "valid_from": now - timedelta(days=10),
        "expires_at": now + timedelta(days=80),
        "max_uses": None,
        "uses": 12,
        "data_life_days": 30,
    }
    return [
        GrantView(
            grant_id="grant-active",
            version=2,
            status="active",
            fields={"shelter": GRANTED},
            excluded_client_ids=frozenset({EXCLUDED}),
            **common,
        ),
        GrantView(
            grant_id="grant-old",
            version=3,
            status="revoked",
            fields={"shelter": GRANTED | {"program_type"}},
            excluded_client_ids=frozenset(),
            **common,
        ),
    ]


# --------------------------------------------------------------------------- Cedar


def _q(text: str) -> str:
    return json.dumps(text)


def _field(category: str, name: str) -> str:
    return f"Field::{_q(f'{category}/{name}')}"


def _set(category: str, names: frozenset[str]) -> str:
    return "[" + ", ".join(_field(category, n) for n in sorted(names)) + "]"


def cedar_policies(grants: list[GrantView], policy: Policy, categories: list[str]) -> str:
    """The grants in force plus the minimisation policy, as Cedar."""
    out: list[str] = []
    for g in grants:
        for client in sorted(g.excluded_client_ids):  # deny overrides, as in decide()
            out.append(f"forbid (principal == Client::{_q(client)}, action, resource);")
        if g.status != "active":
            continue  # a paused or revoked version permits nothing
        for category, names in sorted(g.fields.items()):
            purposes = "[" + ", ".join(_q(p) for p in sorted(g.purposes)) + "]"
            limit = f" && context.uses < {g.max_uses}" if g.max_uses is not None else ""
            out.append(
                f"@id({_q(f'{g.grant_id}/v{g.version}/{category}')})\n"
                f"permit (principal in Agency::{_q(g.recipient_agency_id)}, "
                f'action == Action::"disclose", resource in Category::{_q(category)})\n'
                f"when {{ {purposes}.contains(context.purpose) && "
                f"context.now >= {int(g.valid_from.timestamp())} && "
                f"context.now < {int(g.expires_at.timestamp())}{limit} && "
                f"{_set(category, names)}.contains(resource) }};"
            )
    for category in categories:
        for purpose in sorted(policy.purposes):
            allowed = policy.permitted_fields(category, purpose)
            out.append(
                f"forbid (principal, action, resource in Category::{_q(category)}) "
                f"when {{ context.purpose == {_q(purpose)} }} "
                f"unless {{ {_set(category, allowed)}.contains(resource) }};"
            )
        never = policy.never_disclosable(category)
        if never:
            out.append(
                "forbid (principal, action, resource) "
                f"when {{ {_set(category, never)}.contains(resource) && !context.explicit }};"
            )
    return "\n".join(out)


def cedar_entities(fields: dict[str, frozenset[str]]) -> str:
    ents: list[dict[str, Any]] = [
        {"uid": {"type": "Agency", "id": POLICE}, "attrs": {}, "parents": []},
    ]
    for client in (OFFICER, EXCLUDED):
        ents.append(
            {
                "uid": {"type": "Client", "id": client},
                "attrs": {},
                "parents": [{"type": "Agency", "id": POLICE}],
            }
        )
    for category, names in fields.items():
        ents.append({"uid": {"type": "Category", "id": category}, "attrs": {}, "parents": []})
        for name in names:
            ents.append(
                {
                    "uid": {"type": "Field", "id": f"{category}/{name}"},
                    "attrs": {},
                    "parents": [{"type": "Category", "id": category}],
                }
            )
    return json.dumps(ents)


def cedar_requests(req: DisclosureRequest, now: datetime, all_fields: frozenset[str]) -> list[Any]:
    context = {
        "purpose": req.purpose,
        "now": int(now.timestamp()),
        "explicit": req.fields is not None,
        "uses": 12,
    }
    wanted = sorted(req.fields if req.fields is not None else all_fields)
    return [
        {
            "principal": {"type": "Client", "id": req.client_id},
            "action": {"type": "Action", "id": "disclose"},
            "resource": {"type": "Field", "id": f"{req.category}/{name}"},
            "context": context,
        }
        for name in wanted
    ]


def _cedar_disclosed(results: list[cedarpy.AuthzResult], reqs: list[Any]) -> frozenset[str]:
    return frozenset(
        r["resource"]["id"].split("/", 1)[1]
        for r, res in zip(reqs, results, strict=True)
        if res.allowed
    )


def _broker_disclosed(
    req: DisclosureRequest, grants: list[GrantView], policy: Policy, now: datetime
) -> frozenset[str]:
    try:
        return decide(req, grants, policy, now).disclosed
    except Denied:
        return frozenset()


def _per_call(fn: Callable[[], object], n: int) -> tuple[float, float, float]:
    """(mean, p50, p99) seconds per call; mean from one timed loop, quantiles per call."""
    for _ in range(min(n, 1000)):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    mean = (time.perf_counter() - t0) / n
    samples = []
    clock = time.perf_counter
    for _ in range(min(n, 20_000)):
        t = clock()
        fn()
        samples.append(clock() - t)
    samples.sort()
    return mean, samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def pure_rows(progress: Progress) -> list[Row]:
    policy, fields = load_policy()
    now = datetime.now(UTC)
    grants = sample_grants(now)
    categories = sorted(fields)
    policy_set = cedarpy.PolicySet.from_str(cedar_policies(grants, policy, categories))
    entities = cedarpy.Entities.from_json_str(cedar_entities(fields))
    asked = frozenset({"intake_date", "bed_status", "shelter_location"})
    req = DisclosureRequest(POLICE, OFFICER, "shelter", "safety_planning", asked)
    cases = [
        req,
        DisclosureRequest(POLICE, OFFICER, "shelter", "safety_planning", None),
        DisclosureRequest(POLICE, OFFICER, "shelter", "protective_order", asked),
        DisclosureRequest(POLICE, OFFICER, "shelter", "housing_placement", asked),
        DisclosureRequest(POLICE, EXCLUDED, "shelter", "safety_planning", asked),
        DisclosureRequest(POLICE, OFFICER, "medical", "safety_planning", None),
    ]
    for case in cases:
        reqs = cedar_requests(case, now, fields[case.category])
        ours = _broker_disclosed(case, grants, policy, now)
        theirs = _cedar_disclosed(cedarpy.is_authorized_batch(reqs, policy_set, entities), reqs)
        if ours != theirs:
            raise RuntimeError(f"broker and Cedar disagree on {case}: {ours} vs {theirs}")
    progress("decision: broker decide() vs cedarpy (engines agree on 6 cases)")
    reqs = cedar_requests(req, now, fields["shelter"])
    mean, p50, p99 = _per_call(lambda: decide(req, grants, policy, now), 100_000)
    c_mean, c_p50, c_p99 = _per_call(
        lambda: cedarpy.is_authorized(reqs[0], policy_set, entities), 5_000
    )
    b_mean, b_p50, b_p99 = _per_call(
        lambda: cedarpy.is_authorized_batch(reqs, policy_set, entities), 5_000
    )
    ratio = mean / c_mean
    return [
        Row(
            "Consent decision: `decide()`, 2 grants in force, 3 fields asked",
            f"mean {us(mean)} (p50 {us(p50)}, p99 {us(p99)})",
        ),
        Row(
            "Same rules in cedarpy, pre-parsed PolicySet + Entities: 1 `is_authorized`",
            f"mean {us(c_mean)} (p50 {us(c_p50)}, p99 {us(c_p99)}); "
            f"**decide() = {ratio:.1%} of it**",
            "≤ 1/10 of cedarpy",
            verdict_at_most(ratio * 100, 10.0, " %"),
        ),
        Row(
            "cedarpy, the full equivalent (the field set): `is_authorized_batch` x3 fields",
            f"mean {us(b_mean)} (p50 {us(b_p50)}, p99 {us(b_p99)}); "
            f"decide() = {mean / b_mean:.1%} of it",
        ),
    ]


# --------------------------------------------------------------------------- at scale

# Statements with the names of their parameters ($1, $2, ... in that order).
_SEED: list[tuple[str, tuple[str, ...]]] = [
    (
        """INSERT INTO subjects (id, enrolled_by_agency_id, created_at, wrapped_data_key)
        SELECT 's-' || lpad(i::text, 12, '0'), $1, now(), decode(md5('k' || i), 'hex')
        FROM generate_series($2::int, $3::int) AS i""",
        ("harbor", "first", "last"),
    ),
    (
        """INSERT INTO subject_references (id, subject_id, agency_id, reference, created_at)
        SELECT 'r-' || lpad(i::text, 12, '0'), 's-' || lpad(i::text, 12, '0'), $1, 'PD-' || i, now()
        FROM generate_series($2::int, $3::int) AS i""",
        ("police", "first", "last"),
    ),
    (
        """INSERT INTO consent_grants (id, subject_id, managing_agency_id, recipient_agency_id,
                                    latest_version, uses, created_at, updated_at)
        SELECT 'g-' || lpad(i::text, 12, '0'), 's-' || lpad(i::text, 12, '0'), $1, $2, 1, i % 7,
               now(), now()
        FROM generate_series($3::int, $4::int) AS i""",
        ("harbor", "police", "first", "last"),
    ),
    (
        """INSERT INTO consent_versions (grant_id, version, recipient_agency_id,
            source_agency_ids, fields, purposes, valid_from, expires_at, max_uses,
            data_life_days, excluded_client_ids, status, attestation, actor_client_id,
            actor_agency_id, change, reason, created_at)
        SELECT 'g-' || lpad(i::text, 12, '0'), 1, $2, jsonb_build_array($1::text),
            '{"shelter": ["bed_status", "intake_date", "lethality_screen_level",
                          "safety_plan_on_file"]}'::jsonb,
            '["safety_planning"]'::jsonb, now() - interval '1 day', now() + interval '90 days',
            NULL, 30, '[]'::jsonb, 'active',
            '{"method": "written", "signed_at": "2026-01-01T00:00:00.000Z",
              "document_sha256": "00"}'::jsonb,
            'bench-advocate', $1, 'granted', 'Survivor agreed in writing at intake.', now()
        FROM generate_series($3::int, $4::int) AS i""",
        ("harbor", "police", "first", "last"),
    ),
]

_AGENCIES = """
INSERT INTO agencies (id, name, kind, status, encryption_jwks, records_endpoint, webhook_url,
                      created_at, updated_at)
VALUES ($1, 'Harbor House', 'shelter', 'active', '{"keys": []}', NULL, NULL, now(), now()),
       ($2, 'Eastside PD DV Unit', 'law_enforcement', 'active', '{"keys": []}', NULL, NULL,
        now(), now())
"""
# The officer whose standing the resolve statement reads alongside the survivor.
_CLIENT = """
INSERT INTO clients (id, agency_id, role, name, jwks, status, created_at)
VALUES ($1, $2, 'agency', 'Officer', '{"keys": []}', 'active', now())
"""


@dataclass
class ScalePoint:
    grants: int
    seed_seconds: float
    p50: float
    p99: float
    mean: float


async def _grow(dsn: str, first: int, last: int) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        if first == 1:
            await conn.execute(_AGENCIES, HARBOR, POLICE)
            await conn.execute(_CLIENT, OFFICER, POLICE)
        # Bulk load without firing the foreign-key triggers row by row (every reference
        # is generated consistent); the indexes are maintained as the broker's are.
        await conn.execute("SET session_replication_role = replica")
        params: dict[str, object] = {"harbor": HARBOR, "police": POLICE}
        params |= {"first": first, "last": last}
        for statement, names in _SEED:
            await conn.execute(statement, *(params[n] for n in names))
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def _measure(settings: Settings, size: int, lookups: int) -> tuple[float, float, float]:
    policy, _ = load_policy()
    asked = frozenset({"intake_date", "bed_status", "shelter_location"})
    rng = random.Random(size)
    samples: list[float] = []
    now = datetime.now(UTC)
    caller = Principal(
        client_id=OFFICER, agency_id=POLICE, role=Role.agency, scopes=frozenset(), expires_at=now
    )
    async with runtime(settings) as rt, rt.sessionmaker() as session:
        for n in range(lookups + 200):
            ref = f"PD-{rng.randint(1, size)}"
            req = DisclosureRequest(POLICE, OFFICER, "shelter", "safety_planning", asked)
            t = time.perf_counter()
            resolved = await repository.resolve(session, caller, ref, "shelter")
            permit = decide(req, resolved.grants, policy, datetime.now(UTC))
            elapsed = time.perf_counter() - t
            session.expunge_all()
            if permit.disclosed != {"intake_date", "bed_status"}:
                raise RuntimeError(f"unexpected decision for {ref}: {permit}")
            if n >= 200:  # the first ones warm the pool and statement caches
                samples.append(elapsed)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)], statistics.mean(samples)


def scale_rows(largest: int, progress: Progress) -> list[Row]:
    sizes = [s for s in (10, 10_000, largest) if s <= largest]
    points: list[ScalePoint] = []
    with contextlib.ExitStack() as stack:
        tmp = infra.temp_dir(stack, "grants")
        name = infra.postgres_database(stack, "grants")
        url = infra.pg_url(name)
        infra.migrate(url, tmp)
        key_dir = tmp / "keys"
        BrokerKeys.generate(key_dir)
        settings = Settings(
            environment="dev",
            database_url=url,
            key_dir=Path(key_dir),
            run_background_workers=False,
        )
        have = 0
        for size in sizes:
            progress(f"decision: growing the grant table to {size:,} (generate_series)")
            t = time.perf_counter()
            asyncio.run(_grow(infra.pg_dsn(name), have + 1, size))
            seeded = time.perf_counter() - t
            have = size
            p50, p99, mean = asyncio.run(_measure(settings, size, 2000))
            points.append(ScalePoint(size, seeded, p50, p99, mean))
    rows = [
        Row(
            f"resolve + decide, PostgreSQL, {p.grants:,} grants stored (2,000 random survivors)",
            f"p50 {us(p.p50)}, p99 {us(p.p99)} (seeded in {p.seed_seconds:.1f} s)",
        )
        for p in points
    ]
    flat = points[-1].p50 / points[0].p50
    rows.append(
        Row(
            f"Decision time flat from 10 to {points[-1].grants:,} grants?",
            f"p50 at {points[-1].grants:,} = {flat:.2f}x p50 at 10",
            "flat (taken as ≤ 1.5x)",
            verdict_at_most(flat, 1.5, "x"),
        )
    )
    return rows


def decision_rows(largest: int, progress: Progress) -> list[Row]:
    return pure_rows(progress) + scale_rows(largest, progress)
