"""Load phases against one running server, each driven by a separate loadgen process.

For every server the same three phases run, in this order:

1. peak -- closed loop on ``concurrency`` keep-alive connections;
2. half -- open loop at 50 % of the throughput phase 1 measured, latency from the
   scheduled start (what a caller at that steady rate would see);
3. unloaded -- ``unloaded_requests`` sequential requests on one connection.

"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.infra import REPO, Server, cpu_seconds, database_cpu_seconds, machine_cpu_seconds
from bench.loadgen import Mode, Plan, Result


@dataclass(frozen=True)
class LoadParams:
    duration: float
    warmup: float
    concurrency: int
    unloaded_requests: int
    max_requests: int
    client: str = "raw"  # "httpx" to drive the phases with httpx.AsyncClient instead


@dataclass(frozen=True)
class CpuBudget:
    """CPU per request at peak, of the server and of what shares its machine.

    When the cores are nearly all busy, the ceiling is the machine's, not the server's:
    a faster server alone would then gain little.
    """

    server_ms: float
    database_ms: float | None  # None: PostgreSQL is not on this machine (or not used)
    client_ms: float
    others_ms: float  # other services the request uses (an agency's records endpoint)
    busy: float  # share of all the machine's cores busy during the phase
    cores: int
    workers: int

    @property
    def total_ms(self) -> float:
        return self.server_ms + (self.database_ms or 0.0) + self.client_ms + self.others_ms

    def ceiling(self) -> float:
        """Requests/s this CPU per request allows: the server's workers, or all cores."""
        by_workers = self.workers * 1000.0 / self.server_ms
        return min(by_workers, self.cores * 1000.0 / self.total_ms)


class _Meter:
    """CPU counters read before and after one phase."""

    def __init__(self, pids: list[int], other_pids: list[int]) -> None:
        self.pids, self.other_pids = pids, other_pids
        self.server = cpu_seconds(pids)
        self.others = cpu_seconds(other_pids)
        self.database = database_cpu_seconds()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished loadgens
        self.client = usage.ru_utime + usage.ru_stime
        self.busy, self.total = machine_cpu_seconds()

    def budget(self, requests: int, workers: int) -> CpuBudget:
        after = _Meter(self.pids, self.other_pids)
        per = 1000.0 / max(requests, 1)
        database = None
        if self.database is not None and after.database is not None:
            database = (after.database - self.database) * per
        total = after.total - self.total
        return CpuBudget(
            server_ms=(after.server - self.server) * per,
            database_ms=database,
            client_ms=(after.client - self.client) * per,
            others_ms=(after.others - self.others) * per,
            busy=(after.busy - self.busy) / total if total > 0 else 0.0,
            cores=os.cpu_count() or 1,
            workers=workers,
        )


@dataclass
class LoadFigures:
    peak: Result
    half: Result
    half_rate: float
    unloaded: Result
    #: Server CPU per request sent in the peak and unloaded phases (ms): steadier than
    #: throughput on a shared machine, since time the server was not scheduled is not in it.
    peak_cpu_ms: float = 0.0
    unloaded_cpu_ms: float = 0.0
    #: Where the machine's CPU went at peak, per request: PostgreSQL's processes (None
    #: if it runs elsewhere) and the load generator, and the share of all cores busy.
    budget: CpuBudget | None = None


def loadgen(plan: Plan) -> Result:
    """Run one plan in a fresh ``python -m bench.loadgen`` process."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=json.dumps(asdict(plan)),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=plan.duration + 180,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return Result(**json.loads(proc.stdout))


def _checked(result: Result, what: str, server: Server) -> Result:
    bad = sum(result.errors.values())
    if result.ok == 0 or bad > 0.01 * max(result.measured, 1):
        raise RuntimeError(
            f"{what}: {result.ok} ok, errors {result.errors}; server log:\n{server.log_tail()}"
        )
    return result


def measure(
    server: Server,
    path: str,
    bodies: list[str],
    headers: Callable[[], dict[str, str]],
    params: LoadParams,
    *,
    label: str,
    progress: Callable[[str], None],
    others: list[Server] | None = None,
) -> LoadFigures:
    """Peak, half-of-peak and unloaded figures for ``POST path`` on ``server``.

    ``headers`` is called before each phase so access tokens are always fresh.
    ``others`` are services the requests use, metered into the peak's CPU budget.
    """

    def plan(**kw: object) -> Plan:
        base: dict[str, object] = {
            "host": "127.0.0.1",
            "port": server.port,
            "path": path,
            "bodies": bodies,
            "headers": headers(),
            "duration": params.duration,
            "warmup": params.warmup,
            "max_requests": params.max_requests,
            "concurrency": params.concurrency,
            "client": params.client,
        }
        base.update(kw)
        return Plan(**base)  # type: ignore[arg-type]

    pids = server.worker_pids()
    progress(f"{label}: peak, closed loop x{params.concurrency}, {params.duration:.0f} s")
    meter = _Meter(pids, [pid for other in others or [] for pid in other.worker_pids()])
    peak = _checked(loadgen(plan(mode="closed")), f"{label} peak", server)
    budget = meter.budget(peak.sent, len(pids))
    rate = peak.throughput / 2.0
    progress(f"{label}: {peak.throughput:,.0f} req/s; half of peak, open loop at {rate:,.0f}/s")
    cap = min(params.max_requests, int(rate * params.duration) + 1)
    half = _checked(loadgen(plan(mode="open", rate=rate, max_requests=cap)), label, server)
    progress(f"{label}: unloaded, {params.unloaded_requests} sequential requests")
    time.sleep(0.5)  # let the sequencer and the pool settle after the open-loop tail
    cpu = cpu_seconds(pids)
    unloaded = _checked(
        loadgen(plan(mode="sequential", max_requests=params.unloaded_requests, duration=300.0)),
        f"{label} unloaded",
        server,
    )
    unloaded_cpu_ms = (cpu_seconds(pids) - cpu) * 1000 / max(unloaded.sent, 1)
    return LoadFigures(peak, half, rate, unloaded, budget.server_ms, unloaded_cpu_ms, budget)


def profile(
    server: Server,
    path: str,
    bodies: list[str],
    headers: dict[str, str],
    params: LoadParams,
    out: Path,
    mode: Mode = "closed",
) -> Path | None:
    """Sample one broker worker with py-spy under load (not a measured phase).

    ``closed`` is the peak load; ``sequential`` one request at a time, where the
    worker's CPU per request is higher than at peak and the latency target applies.
    ``BENCH_PROFILE_NATIVE=1`` adds C frames (py-spy ``--native``): the kernel's share
    then shows as libc's ``write``/``read``.
    """
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        return None
    pid = server.worker_pids()[0]
    seconds = max(5, int(params.duration))
    argv = [str(py_spy), "record", "-d", str(seconds), "-p", str(pid), "-o", str(out)]
    native = os.environ.get("BENCH_PROFILE_NATIVE") == "1"
    spy = subprocess.Popen(
        [*argv, "--format", "raw", "--rate", "200", *(["--native"] if native else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        loadgen(
            Plan(
                host="127.0.0.1",
                port=server.port,
                path=path,
                bodies=bodies,
                headers=headers,
                mode=mode,
                concurrency=params.concurrency if mode == "closed" else 1,
                duration=seconds + 2,
                warmup=0,
                max_requests=params.max_requests,
            )
        )
        spy.wait(timeout=seconds + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    return out if out.exists() else None
