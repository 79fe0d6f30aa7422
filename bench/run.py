"""``make bench``: measure the broker against DESIGN.md §9 and append the table to RESULTS.md.

Usage::

    .venv/bin/python -m bench.run            # full run, under ~10 minutes on 2 cores
    .venv/bin/python -m bench.run --quick    # ~2 minutes: shorter phases, smaller data
    .venv/bin/python -m bench.run --only disclosure --profile /tmp/prof

Sections run one after another, each with its own servers and databases, which
are gone before the next section starts so no two compete for the CPU. A
section that fails is reported in the table (and its traceback on stderr); the
others still run. Ctrl-C stops the run and still cleans up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import infra
from bench.disclosure import DisclosureConfig, baseline, baseline_rows, broker_rows
from bench.load import LoadFigures, LoadParams
from bench.report import Row, append_results, load_average, machine_facts, render

SECTIONS = ("disclosure", "sqlite", "decision", "ledger")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short phases and small data (~2 min)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers, broker and bare")
    p.add_argument("--survivors", type=int, help="survivors seeded (10,000; quick 1,000)")
    p.add_argument("--deposits", type=int, help="held records deposited (2,000; quick 1,000)")
    p.add_argument("--duration", type=float, help="seconds per load phase (15; quick 5)")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop connections")
    p.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="load client: minimal HTTP/1.1 (default) or httpx.AsyncClient (saturates first)",
    )
    p.add_argument("--grants", type=int, help="largest grant table (1,000,000; quick 100,000)")
    p.add_argument(
        "--oracle", type=int, help="denials per existence-oracle stream (400; quick 300)"
    )
    p.add_argument("--entries", type=int, help="ledger size (1,000,000; quick 100,000)")
    p.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections")
    p.add_argument("--profile", type=Path, help="also py-spy one broker worker into this folder")
    p.add_argument("--results", type=Path, default=RESULTS, help="file the run is appended to")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    return p.parse_args(argv)


def _section(rows: list[Row], name: str, body: Callable[[], list[Row]]) -> None:
    try:
        rows += body()
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        traceback.print_exc()
        rows.append(Row(f"{name} section", f"failed: {type(exc).__name__}: {exc}"[:300]))


def _broker(cfg: DisclosureConfig, backend: str, base: LoadFigures) -> Callable[[], list[Row]]:
    # The records-endpoint row runs on PostgreSQL only; SQLite is the second held-store row.
    return lambda: broker_rows(cfg, backend, backend == "postgresql", base, progress)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        progress("interrupted: servers stopped, databases dropped, temporary folders removed")
        return 130


def run(args: argparse.Namespace) -> int:
    infra.sigterm_as_interrupt()
    facts = machine_facts()
    if os.getloadavg()[0] > 0.5:
        progress(f"warning: load average {load_average()} -- other work will skew the figures")
    quick = bool(args.quick)
    sections = set(args.only or SECTIONS)
    duration = args.duration or (5.0 if quick else 15.0)
    load = LoadParams(
        duration=duration,
        warmup=1.0 if quick else 2.0,
        concurrency=args.concurrency,
        unloaded_requests=300,
        max_requests=500_000,
        client=args.client,
    )
    cfg = DisclosureConfig(
        workers=args.workers,
        survivors=args.survivors or (1_000 if quick else 10_000),
        deposits=args.deposits or (1_000 if quick else 2_000),
        load=load,
        profile_dir=args.profile,
        oracle_requests=args.oracle or (300 if quick else 400),
    )
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    grants = args.grants or (100_000 if quick else 1_000_000)
    entries = args.entries or (100_000 if quick else 1_000_000)

    rows: list[Row] = []
    base: list[LoadFigures] = []
    if sections & {"disclosure", "sqlite"}:

        def bare() -> list[Row]:
            base.append(baseline(cfg, progress))
            return baseline_rows(base[0], cfg.workers)

        _section(rows, "bare FastAPI", bare)
    if base and "disclosure" in sections:
        _section(rows, "postgresql", _broker(cfg, "postgresql", base[0]))
    if base and "sqlite" in sections:
        _section(rows, "sqlite", _broker(cfg, "sqlite", base[0]))
    if "decision" in sections:
        from bench.decision import decision_rows

        _section(rows, "decision", lambda: decision_rows(grants, progress))
    if "ledger" in sections:
        from bench.ledger import ledger_rows

        _section(rows, "ledger", lambda: ledger_rows(entries, cfg.workers, progress))

    table = render(rows)
    print(table)
    if not args.no_write:
        facts["load average at end"] = load_average()
        title = (
            f"{'quick' if quick else 'full'} run: {cfg.workers} worker(s), "
            f"{cfg.survivors:,} survivors, {duration:.0f} s phases"
        )
        append_results(args.results, title, facts, table, _notes(cfg, grants, entries))
        progress(f"appended to {args.results}")
    progress("done")
    return 0


def _notes(cfg: DisclosureConfig, grants: int, entries: int) -> str:
    load = cfg.load
    client = (
        "a minimal keep-alive HTTP/1.1 client (httpx.AsyncClient saturates far below the bare "
        "app on this machine)"
        if load.client == "raw"
        else "httpx.AsyncClient (the client may be the bottleneck)"
    )
    lines = [
        "How this was measured (details in each `bench/*.py` docstring):",
        "",
        f"- Servers: `broker serve --workers {cfg.workers}` with BROKER_RATE_LIMIT_PER_SECOND=0, "
        "dev keys in a temp folder and a fresh `bench_*` PostgreSQL database (or SQLite file) "
        "migrated by `broker migrate`; the bare app `bench/baseline_app.py` under uvicorn with "
        "the same worker count; the records endpoint `bench/records_app.py` (verifies the "
        "broker's ES256 request token) under uvicorn.",
        f"- Load: separate `python -m bench.loadgen` processes using {client}. Peak = closed "
        f"loop on {load.concurrency} connections for {load.duration:.0f} s after "
        f"{load.warmup:.0f} s warm-up; half = open loop at 50 % of the measured peak, latency "
        f"from each request's scheduled start; unloaded = {load.unloaded_requests} sequential "
        "requests. Real access tokens (private_key_jwt client assertions).",
        f"- Data: {cfg.survivors:,} survivors, each with 4 agency references and 2 grants; the "
        "first 50 through the broker's service functions, the rest cloned in bulk from "
        f"survivor 0's rows (`bench/clone.py`). Harbor House deposited {cfg.deposits:,} "
        "records over `POST /v1/records` and the police ask for those survivors; legal aid "
        f"asks for any of the {cfg.survivors:,}, whose records the endpoint serves. The "
        "sequencer drained the seeding's ledger entries, then PostgreSQL ran "
        "`VACUUM (ANALYZE)` and `CHECKPOINT`, before measuring. The half-of-peak row "
        "also gives the load generator's own lag against its schedule.",
        f"- Existence oracle (PostgreSQL): {cfg.oracle_requests:,} sequential denials per "
        "stream on one keep-alive connection, a known survivor without consent and an "
        "unknown reference alternating (`bench/oracle.py`), next to an A/A pair of two "
        "unknown streams; compared by the median paired difference and the "
        "Kolmogorov-Smirnov D.",
        "- Decision: `broker.disclosure.decision.decide` vs cedarpy deciding the same grants "
        "written as Cedar policies (pre-parsed `PolicySet` and `Entities`, both engines "
        "checked to agree first); resolve + decide against PostgreSQL grown by `INSERT ... "
        f"SELECT generate_series` to {grants:,} grants.",
        f"- Ledger: {entries:,} entries seeded directly (leaves and nodes by "
        "`broker.ledger.merkle.append_leaves`, COPY into PostgreSQL, one checkpoint signed "
        "with the broker's key); `broker ledger verify` accepting the export confirms the "
        "seeded tree.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
