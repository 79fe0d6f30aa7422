"""Rows 1, 2 and 5: end-to-end ``POST /v1/disclosures`` next to a bare FastAPI endpoint.

The broker runs as ``broker serve`` (rate limiter off, dev keys in a temp folder,
a fresh database migrated by ``broker migrate``); the world of ``bench.world``
is seeded; the records of Harbor House are deposited over HTTP; then
``bench.load`` drives two request streams against the same broker:

* held -- the police DV unit asks Harbor House's deposited (encrypted) records;
* endpoint -- legal aid asks Eastside Shelter's records, which the broker
  fetches from ``bench.records_app`` on loopback for every request.

Before measuring, one disclosure of each kind is opened with the recipient's
private key, so the numbers are for complete, correct disclosures.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from bench import infra
from bench.load import LoadFigures, LoadParams, loadgen, measure, profile
from bench.loadgen import Mode, Plan
from bench.report import Row, ms, verdict_at_least, verdict_at_most
from bench.world import (
    Credential,
    World,
    deposit_bodies,
    fetch_token,
    register_cast,
    seed_survivors,
)
from bench.world import wait_ledger_drained as drained
from broker.crypto.keystore import BrokerKeys
from broker.crypto.payload import open_payload
from broker.settings import Settings

Progress = Callable[[str], None]
BROKER_READY = "/.well-known/oauth-authorization-server"


@dataclass(frozen=True)
class DisclosureConfig:
    workers: int
    survivors: int
    deposits: int  # survivors whose Harbor House record is deposited (and then asked for)
    load: LoadParams
    profile_dir: Path | None
    #: Requests per stream of the existence-oracle timing (``bench.oracle``).
    oracle_requests: int = 400


# --------------------------------------------------------------------------- baseline


def baseline(cfg: DisclosureConfig, progress: Progress) -> LoadFigures:
    body = orjson.dumps(
        {
            "subject_ref": "PD-000001",
            "category": "shelter",
            "purpose": "safety_planning",
            "fields": ["intake_date", "bed_status", "shelter_location"],
        }
    ).decode()
    with contextlib.ExitStack() as stack:
        tmp = infra.temp_dir(stack, "baseline")
        port = infra.free_port()
        server = infra.start_server(
            stack,
            "baseline",
            infra.uvicorn_argv("bench.baseline_app:app", port, cfg.workers),
            env=infra.clean_env({}),
            port=port,
            log_dir=tmp,
            ready_path="/health",
        )
        return measure(
            server, "/v1/disclosures", [body], lambda: {}, cfg.load, label="bare", progress=progress
        )


def baseline_rows(base: LoadFigures, workers: int) -> list[Row]:
    name = f"Bare FastAPI POST, pydantic body, uvicorn {workers} worker(s)"
    return [
        Row(
            f"{name}: peak (closed loop)",
            f"{base.peak.throughput:,.0f} req/s; p50 {ms(base.peak.p50_ms)}, "
            f"p99 {ms(base.peak.p99_ms)}",
        ),
        Row(
            f"{name}: half of peak (open loop {base.half_rate:,.0f}/s)",
            f"p50 {ms(base.half.p50_ms)}, p99 {ms(base.half.p99_ms)}",
        ),
        Row(
            f"{name}: unloaded ({base.unloaded.ok} sequential)",
            f"p50 {ms(base.unloaded.p50_ms)}, p99 {ms(base.unloaded.p99_ms)}; "
            f"server CPU {base.peak_cpu_ms:.2f} ms/request at peak, "
            f"{base.unloaded_cpu_ms:.2f} unloaded",
        ),
        *budget_row(name, base, base.peak.throughput, postgres=False),
    ]


# --------------------------------------------------------------------------- broker


@dataclass
class BrokerSetup:
    server: infra.Server
    settings: Settings
    world: World
    deposited: int
    records: infra.Server | None  # the agencies' records endpoint, if started


def _bearer(url: str, cred: Credential) -> Callable[[], dict[str, str]]:
    return lambda: {"Authorization": "Bearer " + fetch_token(url, cred)}


def serve_broker(
    stack: contextlib.ExitStack,
    name: str,
    database_url: str,
    key_dir: Path,
    port: int,
    workers: int,
    *,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
) -> infra.Server:
    """``broker serve`` on 127.0.0.1:``port``, dev keys, no rate limit; stopped with ``stack``."""
    env = {
        "BROKER_ENVIRONMENT": "dev",
        "BROKER_DATABASE_URL": database_url,
        "BROKER_KEY_DIR": str(key_dir),
        "BROKER_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "BROKER_RATE_LIMIT_PER_SECOND": "0",
        **(extra_env or {}),
    }
    argv = [str(infra.VENV_BIN / "broker"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", str(workers), "--log-level", "warning"]
    return infra.start_server(
        stack,
        name,
        argv,
        env=infra.clean_env(env),
        port=port,
        log_dir=log_dir,
        ready_path=BROKER_READY,
    )


def start_broker(
    stack: contextlib.ExitStack,
    cfg: DisclosureConfig,
    backend: str,
    with_endpoint: bool,
    progress: Progress,
) -> BrokerSetup:
    """A migrated, seeded broker behind ``broker serve``, torn down with ``stack``."""
    tmp = infra.temp_dir(stack, f"broker-{backend}")
    dbname = None
    if backend == "postgresql":
        dbname = infra.postgres_database(stack, "disclosure")
        database_url = infra.pg_url(dbname)
    else:
        database_url = f"sqlite+aiosqlite:///{tmp / 'broker.db'}"
    progress(f"{backend}: migrating a fresh database")
    infra.migrate(database_url, tmp)
    key_dir = tmp / "keys"
    BrokerKeys.generate(key_dir)
    port = infra.free_port()
    url = f"http://127.0.0.1:{port}"
    records_endpoint = None
    records = None
    if with_endpoint:
        rport = infra.free_port()
        records_endpoint = f"http://127.0.0.1:{rport}/records"
        env = {"BENCH_BROKER_URL": url, "BENCH_RECORDS_URL": records_endpoint}
        records = infra.start_server(
            stack,
            "records",
            infra.uvicorn_argv("bench.records_app:app", rport, 1),
            env=infra.clean_env(env),
            port=rport,
            log_dir=tmp,
            ready_path="/health",
        )
    server = serve_broker(
        stack, f"broker-{backend}", database_url, key_dir, port, cfg.workers, log_dir=tmp
    )
    settings = Settings(
        environment="dev",
        database_url=database_url,
        key_dir=key_dir,
        public_url=url,
        rate_limit_per_second=0,
        run_background_workers=False,
    )
    progress(f"{backend}: registering agencies and clients over HTTP")
    world = asyncio.run(register_cast(settings, url, cfg.survivors, records_endpoint))
    progress(f"{backend}: seeding {cfg.survivors:,} survivors (services, then bulk clone)")
    asyncio.run(seed_survivors(settings, world))
    count = min(cfg.deposits, cfg.survivors)
    progress(f"{backend}: Harbor House deposits {count:,} records (POST /v1/records)")
    deposits = loadgen(
        Plan(
            host="127.0.0.1",
            port=port,
            path="/v1/records",
            bodies=deposit_bodies(world, count),
            headers=_bearer(url, world.clients["harbor"])(),
            mode="closed",
            concurrency=8 if backend == "postgresql" else 2,  # SQLite: one writer at a time
            duration=600.0,
            warmup=0.0,
            max_requests=count,
            expect_status=201,
        )
    )
    if deposits.ok != count:
        raise RuntimeError(f"deposits: {deposits.ok} stored, errors {deposits.errors}")
    progress(f"{backend}: waiting for the sequencer to integrate the seeding's ledger entries")
    left = asyncio.run(drained(settings))
    if left:
        progress(f"{backend}: {left} ledger entries still pending; measuring anyway")
    if dbname is not None:
        # Measure the broker, not the seeding's aftermath: without this, autovacuum of
        # the freshly loaded tables and a checkpoint of their WAL land in the phases.
        progress(f"{backend}: VACUUM (ANALYZE) and CHECKPOINT after seeding")
        asyncio.run(infra.settle_postgres(dbname))
    return BrokerSetup(server, settings, world, count, records)


def _held_bodies(world: World, deposited: int) -> list[str]:
    """The police ask for survivors whose record Harbor House deposited, in random order."""
    order = list(range(deposited))
    random.Random(7).shuffle(order)
    return [
        orjson.dumps(
            {
                "subject_ref": world.ref("police", i),
                "category": "shelter",
                "purpose": "safety_planning",
                "fields": ["intake_date", "bed_status", "shelter_location"],
            }
        ).decode()
        for i in order
    ]


def _endpoint_bodies(world: World) -> list[str]:
    order = list(range(world.survivors))
    random.Random(11).shuffle(order)
    return [
        orjson.dumps(
            {
                "subject_ref": world.ref("legal", i),
                "category": "shelter",
                "purpose": "legal_representation",
            }
        ).decode()
        for i in order
    ]


def _check_one(setup: BrokerSetup, requester: str, body: str, expect: set[str]) -> None:
    """One disclosure, opened with the recipient's private key: the bench measures real ones."""
    world = setup.world

    async def run() -> dict[str, Any]:
        client = world.clients[requester].client(world.url)
        try:
            resp = await client.post(
                "/v1/disclosures", content=body, headers={"Content-Type": "application/json"}
            )
            if resp.status_code != 200:
                raise RuntimeError(f"sanity disclosure -> {resp.status_code}: {resp.text[:300]}")
            jwks = (await client.http.get("/.well-known/jwks.json")).json()
            claims: dict[str, Any] = open_payload(
                resp.json()["payload"], world.agencies[requester].enc_private, jwks
            )
            return claims
        finally:
            await client.aclose()

    claims = asyncio.run(run())
    if set(claims["data"]) != expect:
        raise RuntimeError(f"sanity disclosure released {sorted(claims['data'])}")


def broker_rows(
    cfg: DisclosureConfig,
    backend: str,
    with_endpoint: bool,
    base: LoadFigures,
    progress: Progress,
) -> list[Row]:
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        setup = start_broker(stack, cfg, backend, with_endpoint, progress)
        url = setup.world.url
        streams = [
            (
                "held records",
                "police",
                _held_bodies(setup.world, setup.deposited),
                {"intake_date", "bed_status"},
            )
        ]
        if with_endpoint:
            expect = {"intake_date", "advocate_assigned", "language_preference"}
            streams.append(("records endpoint", "legal", _endpoint_bodies(setup.world), expect))
        for source, requester, bodies, expect in streams:
            _check_one(setup, requester, bodies[0], expect)
            label = f"{backend}, {source}"
            figures = measure(
                setup.server,
                "/v1/disclosures",
                bodies,
                _bearer(url, setup.world.clients[requester]),
                cfg.load,
                label=label,
                progress=progress,
                # The records endpoint's CPU counts where the requests use it.
                others=[setup.records] if setup.records and source != "held records" else [],
            )
            rows += _rows(label, figures, base, backend == "postgresql", cfg.workers)
            if cfg.profile_dir is not None and backend == "postgresql":
                modes: tuple[tuple[Mode, str], ...] = (("closed", ""), ("sequential", "-unloaded"))
                for mode, suffix in modes:
                    out = cfg.profile_dir / f"profile-{source.replace(' ', '-')}{suffix}.txt"
                    progress(f"{label}: py-spy profile of one worker ({mode}) -> {out}")
                    if not profile(
                        setup.server,
                        "/v1/disclosures",
                        bodies,
                        _bearer(url, setup.world.clients[requester])(),
                        cfg.load,
                        out,
                        mode,
                    ):
                        progress("no profile: install py-spy (.venv/bin/pip install py-spy)")
        if backend == "postgresql":  # the grid is the endpoint's, whatever the database
            from bench.oracle import oracle_rows

            rows += oracle_rows(setup, backend, cfg.oracle_requests, progress)
        hwm = max(infra.rss_mb(pid)[0] for pid in setup.server.worker_pids())
        rss = max(infra.rss_mb(pid)[1] for pid in setup.server.worker_pids())
        rows.append(
            Row(
                f"Broker worker resident memory after the {backend} load (max over workers)",
                f"VmHWM {hwm:.0f} MB, VmRSS {rss:.0f} MB",
                "≤ 250 MB" if backend == "postgresql" else "",
                verdict_at_most(hwm, 250.0, " MB") if backend == "postgresql" else "",
            )
        )
    return rows


def budget_row(name: str, figures: LoadFigures, bare: float, *, postgres: bool) -> list[Row]:
    """Where the machine's CPU went per request at peak, and the ceiling that sets.

    PostgreSQL's share is left out (and out of the total) for servers that do not use it.
    """
    b = figures.budget
    if b is None:
        return []
    if not postgres:
        b = replace(b, database_ms=None)
    database = "" if b.database_ms is None else f" + PostgreSQL {b.database_ms:.2f} ms"
    if b.others_ms:
        database += f" + records endpoint {b.others_ms:.2f} ms"
    ceiling = b.ceiling()
    return [
        Row(
            f"{name}: CPU per request at peak (whole machine)",
            f"server {b.server_ms:.2f} ms{database} + load generator {b.client_ms:.2f} ms "
            f"= {b.total_ms:.2f} ms; {b.busy:.0%} of {b.cores} cores busy; "
            f"ceiling at this CPU {ceiling:,.0f} req/s = {ceiling / bare:.1%} of bare",
        )
    ]


def _rows(label: str, f: LoadFigures, base: LoadFigures, targeted: bool, workers: int) -> list[Row]:
    ratio = f.peak.throughput / base.peak.throughput
    name = f"Disclosure, {label}, {workers} worker(s)"
    return [
        Row(
            f"{name}: peak (closed loop, {f.peak.connections} conns)",
            f"{f.peak.throughput:,.0f} req/s = **{ratio:.1%} of bare** "
            f"({base.peak.throughput:,.0f}); p50 {ms(f.peak.p50_ms)}, p99 {ms(f.peak.p99_ms)}",
            "≥ 25 % of bare" if targeted else "(PostgreSQL only)",
            verdict_at_least(ratio * 100, 25.0, " %") if targeted else "",
        ),
        Row(
            f"{name}: half of peak (open loop {f.half_rate:,.0f}/s)",
            f"p50 {ms(f.half.p50_ms)}, p99 {ms(f.half.p99_ms)} (max {ms(f.half.max_ms)}; "
            f"client's own lag p99 {ms(f.half.lag_p99_ms)}, max {ms(f.half.lag_max_ms)})",
            "p99 ≤ 25 ms" if targeted else "",
            verdict_at_most(f.half.p99_ms, 25.0, " ms") if targeted else "",
        ),
        Row(
            f"{name}: unloaded ({f.unloaded.ok} sequential)",
            f"p50 {ms(f.unloaded.p50_ms)}, p99 {ms(f.unloaded.p99_ms)}; "
            f"server CPU {f.peak_cpu_ms:.2f} ms/request at peak, "
            f"{f.unloaded_cpu_ms:.2f} unloaded",
            "p50 ≤ 1.5 ms" if targeted else "",
            verdict_at_most(f.unloaded.p50_ms, 1.5, " ms") if targeted else "",
        ),
        # Only PostgreSQL is targeted, and only it has a database process to meter.
        *budget_row(name, f, base.peak.throughput, postgres=targeted),
    ]
