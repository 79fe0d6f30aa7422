"""Paired unloaded A/B: two brokers on one seeded database, requests alternating.

On a shared VM the unloaded p50 drifts by 10-25 % between runs minutes apart,
more than most single changes move it, so back-to-back ``bench.run`` results
cannot tell a 5 % gain from noise. Here one seeded PostgreSQL database and one
key folder serve two ``broker serve`` processes -- this tree's code and another
tree's (``--other``, a ``git worktree`` say) -- and one client sends sequential
held-record disclosures to each in turn, so whatever the host does hits both
alike. It prints each side's latency and server CPU per request, and the median
of the paired differences. Not part of ``make bench``; a tool for deciding
whether a change to the request path is worth keeping.

    .venv/bin/python -m bench.paired --other /tmp/wt_base --requests 3000
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

from bench import infra
from bench.disclosure import DisclosureConfig, _held_bodies, serve_broker, start_broker
from bench.load import LoadParams, loadgen
from bench.loadgen import Plan, percentile
from bench.sequential import KeepAliveConn
from bench.world import fetch_token
from broker.settings import Settings


def _serve(
    stack: contextlib.ExitStack, settings: Settings, tree: Path, log_dir: Path
) -> infra.Server:
    """``broker serve`` from ``tree``'s code on the seeded database, without background loops."""
    extra = {"BROKER_RUN_BACKGROUND_WORKERS": "false", "PYTHONPATH": str(tree)}
    return serve_broker(
        stack,
        f"broker-{tree.name}",
        settings.database_url,
        settings.key_dir,
        infra.free_port(),
        1,
        log_dir=log_dir,
        extra_env=extra,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--other", type=Path, required=True, help="tree whose broker is side B")
    p.add_argument("--requests", type=int, default=2000, help="per side (at most 20,000)")
    p.add_argument("--survivors", type=int, default=1000)
    p.add_argument(
        "--peak",
        type=int,
        default=0,
        metavar="N",
        help="then N alternating 3 s closed-loop bursts per side (32 connections, at most 20)",
    )
    args = p.parse_args(argv)
    requests = min(max(args.requests, 100), 20_000)
    other = args.other.resolve()
    if not (other / "broker" / "cli.py").is_file():
        p.error(f"{other} holds no broker/ tree")
    infra.sigterm_as_interrupt()
    load = LoadParams(duration=1, warmup=0, concurrency=1, unloaded_requests=1, max_requests=1)
    cfg = DisclosureConfig(1, args.survivors, args.survivors, load, None)
    with contextlib.ExitStack() as stack:
        setup = start_broker(stack, cfg, "postgresql", False, lambda m: print(m, flush=True))
        # Both sides are fresh servers with the ledger sequencer off: with it on, the
        # two would race for every batch and one side's CPU would carry the other's.
        log_dir = infra.temp_dir(stack, "paired")
        police = setup.world.clients["police"]
        sides: dict[str, tuple[infra.Server, KeepAliveConn]] = {}
        for name, tree in (("A (this tree)", infra.REPO), (f"B ({other})", other)):
            server = _serve(stack, setup.settings, tree, log_dir)
            sides[name] = (server, KeepAliveConn(server.port, fetch_token(server.url, police)))
        bodies = _held_bodies(setup.world, setup.deposited)
        names = list(sides)
        for i in range(100):  # warm both: caches, prepared statements, pools
            for name in names:
                sides[name][1].post(bodies[i % len(bodies)])
        lat: dict[str, list[float]] = {n: [] for n in names}
        cpu0 = {n: infra.cpu_seconds(sides[n][0].worker_pids()) for n in names}
        for i in range(requests):
            order = names if i % 2 == 0 else names[::-1]  # neither side always goes first
            for name in order:
                status, elapsed = sides[name][1].post(bodies[i % len(bodies)])
                if status != 200:
                    raise RuntimeError(f"{name}: disclosure answered {status}")
                lat[name].append(elapsed * 1000)
        cpu = {
            n: (infra.cpu_seconds(sides[n][0].worker_pids()) - cpu0[n]) * 1000 / requests
            for n in names
        }
        for name in names:
            v = sorted(lat[name])
            print(
                f"{name}: p50 {percentile(v, 0.5):.3f} ms, p90 {percentile(v, 0.9):.3f}, "
                f"p99 {percentile(v, 0.99):.3f}, mean {statistics.fmean(v):.3f}; "
                f"server CPU {cpu[name]:.3f} ms/request"
            )
        diffs = [a - b for a, b in zip(lat[names[0]], lat[names[1]], strict=True)]
        print(
            f"A - B, median of {requests:,} paired differences: {statistics.median(diffs):+.3f} ms"
        )
        if args.peak:
            _peak(sides, bodies, min(args.peak, 20))
    return 0


def _peak(
    sides: dict[str, tuple[infra.Server, KeepAliveConn]], bodies: list[str], rounds: int
) -> None:
    """Closed-loop bursts, sides alternating: throughput, server CPU per request, and
    the latency spread (a change can keep throughput and starve some requests)."""
    names = list(sides)
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    p50: dict[str, list[float]] = {n: [] for n in names}
    p99: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            server, conn = sides[name]
            plan = Plan(
                host="127.0.0.1",
                port=server.port,
                path="/v1/disclosures",
                bodies=bodies,
                headers={"Authorization": f"Bearer {conn.token}"},
                mode="closed",
                concurrency=32,
                duration=3.0,
                warmup=0.5,
                max_requests=50_000,
            )
            before = infra.cpu_seconds(server.worker_pids())
            result = loadgen(plan)
            used = infra.cpu_seconds(server.worker_pids()) - before
            if (
                result.ok == 0 or result.errors
            ):  # requests still in flight at the end are not errors
                raise RuntimeError(f"{name}: {result.ok} ok, errors {result.errors}")
            rates[name].append(result.throughput)
            cpu[name].append(used * 1000 / max(result.sent, 1))
            p50[name].append(result.p50_ms)
            p99[name].append(result.p99_ms)
    for name in names:
        print(
            f"{name} peak: median {statistics.median(rates[name]):,.0f} req/s "
            f"(runs {', '.join(f'{r:,.0f}' for r in rates[name])}); "
            f"server CPU median {statistics.median(cpu[name]):.3f} ms/request; "
            f"latency medians p50 {statistics.median(p50[name]):.1f} ms, "
            f"p99 {statistics.median(p99[name]):.1f} ms"
        )
    ratios = [a / b for a, b in zip(rates[names[0]], rates[names[1]], strict=True)]
    print(f"A / B throughput, median of {rounds} paired bursts: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    sys.exit(main())
