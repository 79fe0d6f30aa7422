"""Row 4: the ledger -- integration rate, proofs at a million entries, offline verification.

Seeding (the API would need hours for a million disclosures): entry bodies shaped
like the broker's ``disclosure.permitted`` entries are built with fresh ids and
real subject commitments and serialised with ``orjson`` (sorted keys, compact),
which for these ASCII/int values is byte-identical to RFC 8785 -- every
thousandth body is checked against ``rfc8785.dumps``. Leaves and every stored
subtree node come from ``broker.ledger.merkle.append_leaves``; entries, nodes and
one checkpoint signed with the broker's key (``sign_checkpoint``) are written
with PostgreSQL ``COPY`` in chunks. The export and ``broker ledger verify``
then check that this tree is exactly what the broker's sequencer would build.

Measured on that database:

* integrated appends/s -- ``append_entry`` writes a batch into the outbox, then
  ``broker.ledger.sequencer.integrate_until_empty`` is timed in-process;
* inclusion and consistency proofs -- over HTTP as an auditor (sequential
  requests from a loadgen process), and as the in-process service call;
* offline verification -- the export is downloaded from ``GET /v1/ledger/export``
  and ``broker ledger verify FILE --vkey ...`` is timed as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import orjson
import rfc8785
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from bench import infra
from bench.clone import Collector
from bench.load import loadgen
from bench.loadgen import Plan
from bench.report import Row, ms, us, verdict_at_least, verdict_at_most
from bench.world import bootstrap_client, fetch_token, runtime
from broker.auth.roles import Principal, Role
from broker.crypto.commitment import subject_commitment
from broker.crypto.keystore import BrokerKeys
from broker.ledger import service
from broker.ledger.checkpoint import Checkpoint, sign_checkpoint
from broker.ledger.entries import append_entry, iso_now
from broker.ledger.merkle import Node, append_leaves, root_from_frontier
from broker.ledger.sequencer import integrate_until_empty
from broker.models import LedgerPending
from broker.settings import Settings

Progress = Callable[[str], None]
CHUNK = 100_000
APPENDS = 20_000
ENTRY_TYPE = "disclosure.permitted"
PROOFS = 300


def _entries(
    start: int, count: int, hmac_key: bytes, now: datetime
) -> Iterator[tuple[str, str, str, str]]:
    """(entry_id, agency_id, subject commitment, canonical body) of entries ``start ...``."""
    agencies = [str(uuid.UUID(int=k + 1)) for k in range(8)]
    policy = "sha256:" + hashlib.sha256(b"policy").hexdigest()
    commitments = [subject_commitment(hmac_key, f"subject-{k}") for k in range(5000)]
    at = iso_now(now)
    for i in range(start, start + count):
        entry_id = str(uuid.uuid4())
        requester = agencies[i % 8]
        subject = commitments[i % 5000]
        body: dict[str, Any] = {
            "v": 1,
            "id": entry_id,
            "type": ENTRY_TYPE,
            "at": at,
            "actor": {"client_id": agencies[(i + 3) % 8], "agency_id": requester, "role": "agency"},
            "agency_id": requester,
            "subject": subject,
            "disclosure_id": str(uuid.uuid4()),
            "outcome": "permitted",
            "reason": "permitted",
            "category": "shelter",
            "purpose": "safety_planning",
            "fields_requested": ["bed_status", "intake_date", "shelter_location"],
            "fields_disclosed": ["bed_status", "intake_date"],
            "fields_withheld": ["shelter_location"],
            "grant_id": agencies[(i + 5) % 8],
            "grant_version": 1 + i % 3,
            "policy_version": policy,
            "source_agency_id": agencies[(i + 1) % 8],
            "payload_sha256": hashlib.sha256(entry_id.encode()).hexdigest(),
            "subject_known": True,
            "dropped_unknown_fields": 0,
        }
        text = orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()
        if i % 1000 == 0 and rfc8785.dumps(body).decode() != text:
            raise RuntimeError("orjson output is not RFC 8785 canonical for a seeded entry")
        yield entry_id, requester, subject, text


_ENTRY_COLUMNS = [
    "idx",
    "entry_id",
    "entry_type",
    "agency_id",
    "subject_commitment",
    "body",
    "leaf_hash",
    "created_at",
    "integrated_at",
]


async def seed_ledger(
    dsn: str, keys: BrokerKeys, origin: str, total: int, progress: Progress
) -> None:
    """COPY ``total`` entries, their subtree nodes and one signed checkpoint.

    The plain (non-unique) secondary indexes of ``ledger_entries`` are dropped for
    the load and rebuilt from their own definitions afterwards, which is several
    times faster than maintaining them row by row; the table ends up as migrated.
    """
    conn = await asyncpg.connect(dsn, timeout=10)
    now = datetime.now(UTC)
    frontier: dict[Node, bytes] = {}
    size = 0
    sha256 = hashlib.sha256
    try:
        indexes = await conn.fetch(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i "
            "JOIN pg_class c ON c.relname = i.indexname JOIN pg_index x ON x.indexrelid = c.oid "
            "WHERE i.tablename = 'ledger_entries' AND NOT x.indisunique"
        )
        for row in indexes:
            await conn.execute(f'DROP INDEX "{row["indexname"]}"')
        while size < total:
            count = min(CHUNK, total - size)
            entries: list[tuple[object, ...]] = []
            leaves: list[bytes] = []
            for entry_id, agency, subject, body in _entries(size, count, keys.subject_hmac, now):
                leaf = sha256(b"\x00" + body.encode()).digest()
                leaves.append(leaf)
                idx = size + len(entries)
                entries.append((idx, entry_id, ENTRY_TYPE, agency, subject, body, leaf, now, now))
            created, frontier = append_leaves(size, frontier, leaves)
            await conn.copy_records_to_table(
                "ledger_entries", records=entries, columns=_ENTRY_COLUMNS
            )
            await conn.copy_records_to_table(
                "ledger_nodes", records=created, columns=["level", "idx", "hash"]
            )
            size += count
            progress(f"ledger: {size:,} of {total:,} entries copied")
        for row in indexes:
            await conn.execute(row["indexdef"])
        root = root_from_frontier(size, frontier)
        note = sign_checkpoint(Checkpoint(origin, size, root), origin, keys.checkpoint_signing)
        await conn.execute(
            "INSERT INTO ledger_checkpoints (tree_size, root_hash, note, created_at) "
            "VALUES ($1, $2, $3, $4)",
            size,
            root,
            note,
            now,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def append_rate(settings: Settings, count: int) -> tuple[int, float]:
    """Queue ``count`` entries with ``append_entry``, then time the sequencer draining them."""
    actor = Principal(
        client_id=str(uuid.uuid4()),
        agency_id=str(uuid.uuid4()),
        role=Role.agency,
        scopes=frozenset(),
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    async with runtime(settings) as rt:
        collector = Collector()
        for i in range(count):
            await append_entry(
                cast(AsyncSession, collector),
                hmac_key=rt.keys.subject_hmac,
                entry_type="disclosure.denied",
                actor=actor,
                agency_id=actor.agency_id,
                subject_id=f"subject-{i % 997}",
                fields={
                    "disclosure_id": str(uuid.uuid4()),
                    "outcome": "denied",
                    "reason": "no_grant",
                },
            )
        rows = collector.rows
        async with rt.sessionmaker() as session, session.begin():
            for start in range(0, len(rows), 5000):
                await session.execute(insert(LedgerPending), rows[start : start + 5000])
        t = time.perf_counter()
        added = await integrate_until_empty(rt)
        return added, time.perf_counter() - t


async def in_process_proofs(
    settings: Settings, size: int, samples: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(p50, p99) seconds of ``service.inclusion`` and ``service.consistency`` calls."""
    rng = random.Random(3)
    inc: list[float] = []
    con: list[float] = []
    async with runtime(settings) as rt, rt.sessionmaker() as session:
        for n in range(samples + 50):
            t = time.perf_counter()
            await service.inclusion(session, rng.randrange(size), size)
            a = time.perf_counter() - t
            t = time.perf_counter()
            await service.consistency(session, rng.randint(1, size - 1), size)
            b = time.perf_counter() - t
            if n >= 50:
                inc.append(a)
                con.append(b)
    inc.sort()
    con.sort()
    return (inc[len(inc) // 2], inc[int(len(inc) * 0.99)]), (
        con[len(con) // 2],
        con[int(len(con) * 0.99)],
    )


def ledger_rows(total: int, workers: int, progress: Progress) -> list[Row]:
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        tmp = infra.temp_dir(stack, "ledger")
        name = infra.postgres_database(stack, "ledger")
        url = infra.pg_url(name)
        infra.migrate(url, tmp)
        key_dir = tmp / "keys"
        keys = BrokerKeys.generate(key_dir)
        port = infra.free_port()
        base = f"http://127.0.0.1:{port}"
        settings = Settings(
            environment="dev",
            database_url=url,
            key_dir=key_dir,
            public_url=base,
            run_background_workers=False,
        )
        progress(f"ledger: seeding {total:,} entries (append_leaves + COPY)")
        t = time.perf_counter()
        asyncio.run(seed_ledger(infra.pg_dsn(name), keys, settings.ledger_origin, total, progress))
        seeded = time.perf_counter() - t
        auditor = asyncio.run(bootstrap_client(settings, Role.auditor, "bench-auditor"))

        progress(f"ledger: {APPENDS:,} entries through the outbox, then integrate_until_empty")
        added, spent = asyncio.run(append_rate(settings, APPENDS))
        rate = added / spent
        rows.append(
            Row(
                f"Ledger: integrated appends ({added:,} entries onto {total:,}, "
                f"batches of {settings.sequencer_batch_size:,})",
                f"{rate:,.0f} appends/s ({spent:.2f} s)",
                "≥ 5,000/s",
                verdict_at_least(rate, 5000.0, "/s"),
            )
        )
        size = total + added
        env = {
            "BROKER_ENVIRONMENT": "dev",
            "BROKER_DATABASE_URL": url,
            "BROKER_KEY_DIR": str(key_dir),
            "BROKER_PUBLIC_URL": base,
            "BROKER_RATE_LIMIT_PER_SECOND": "0",
        }
        argv = [str(infra.VENV_BIN / "broker"), "serve", "--host", "127.0.0.1", "--port"]
        argv += [str(port), "--workers", str(workers), "--log-level", "warning"]
        server = infra.start_server(
            stack,
            "broker-ledger",
            argv,
            env=infra.clean_env(env),
            port=port,
            log_dir=tmp,
            ready_path="/v1/ledger/key",
        )
        token = fetch_token(base, auditor)
        rng = random.Random(5)
        inclusion_paths = [
            f"/v1/ledger/proofs/inclusion?index={rng.randrange(size)}&tree_size={size}"
            for _ in range(PROOFS)
        ]
        consistency_paths = [
            f"/v1/ledger/proofs/consistency?first={rng.randint(1, size - 1)}&second={size}"
            for _ in range(PROOFS)
        ]
        progress("ledger: inclusion and consistency proofs over HTTP and in-process")
        http_figures = []
        for paths in (inclusion_paths, consistency_paths):
            result = loadgen(
                Plan(
                    host="127.0.0.1",
                    port=server.port,
                    path="",
                    bodies=[],
                    method="GET",
                    paths=paths,
                    headers={"Authorization": f"Bearer {token}"},
                    mode="sequential",
                    duration=120.0,
                    max_requests=PROOFS,
                )
            )
            if result.ok != PROOFS:
                raise RuntimeError(f"proofs: {result.ok} ok, errors {result.errors}")
            http_figures.append(result)
        (ip50, ip99), (cp50, cp99) = asyncio.run(in_process_proofs(settings, size, PROOFS))
        inc, con = http_figures
        rows += [
            Row(
                f"Inclusion proof at {size:,} entries, HTTP as auditor ({PROOFS} sequential)",
                f"p50 {ms(inc.p50_ms)}, p99 {ms(inc.p99_ms)}",
                "≤ 2 ms",
                verdict_at_most(inc.p50_ms, 2.0, " ms") + " (p50)",
            ),
            Row(
                "Inclusion proof, in-process `broker.ledger.service.inclusion`",
                f"p50 {us(ip50)}, p99 {us(ip99)}",
            ),
            Row(
                f"Consistency proof at {size:,} entries, HTTP as auditor ({PROOFS} sequential)",
                f"p50 {ms(con.p50_ms)}, p99 {ms(con.p99_ms)}",
            ),
            Row(
                "Consistency proof, in-process `broker.ledger.service.consistency`",
                f"p50 {us(cp50)}, p99 {us(cp99)}",
            ),
        ]

        progress("ledger: downloading GET /v1/ledger/export")
        export = tmp / "ledger.jsonl"
        t = time.perf_counter()
        with (
            httpx.Client(base_url=base, timeout=300.0, trust_env=False) as http,
            export.open("wb") as fh,
        ):
            vkey = str(http.get("/v1/ledger/key").raise_for_status().json()["verifier_key"])
            headers = {"Authorization": f"Bearer {token}"}
            with http.stream("GET", "/v1/ledger/export", headers=headers) as resp:
                resp.raise_for_status()
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
        downloaded = time.perf_counter() - t
        progress(f"ledger: broker ledger verify ({export.stat().st_size / 1e6:,.0f} MB export)")
        verify_seconds, verdict_text = _verify(export, vkey, tmp)
        rows += [
            Row(
                f"Ledger export download, {size:,} entries (GET /v1/ledger/export)",
                f"{downloaded:.1f} s, {export.stat().st_size / 1e6:,.0f} MB",
            ),
            Row(
                f"`broker ledger verify` of the {size:,}-entry export (subprocess, wall clock)",
                f"{verify_seconds:.1f} s — {verdict_text}",
                "≤ 10 s for 1,000,000",
                verdict_at_most(verify_seconds * 1_000_000 / size, 10.0, " s")
                + ("" if size >= 1_000_000 else " (scaled to 1M)"),
            ),
            Row(
                f"Ledger seeding, {total:,} entries (not a target)",
                f"{seeded:.1f} s (append_leaves + COPY)",
            ),
        ]
    return rows


def _verify(export: Path, vkey: str, tmp: Path) -> tuple[float, str]:
    key_file = tmp / "ledger.vkey"
    key_file.write_text(vkey + "\n")
    t = time.perf_counter()
    out = subprocess.run(
        [str(infra.VENV_BIN / "broker"), "ledger", "verify", str(export), "--vkey", f"@{key_file}"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp,
        env=infra.clean_env({}),
    )
    elapsed = time.perf_counter() - t
    first = (out.stdout.strip().splitlines() or [out.stderr.strip()[-200:]])[0]
    if out.returncode != 0:
        raise RuntimeError(f"broker ledger verify failed ({out.returncode}): {first}")
    return elapsed, first
