"""The load generator, run as its own process: ``python -m bench.loadgen < plan.json``.

It reads one ``Plan`` as JSON on stdin, drives a server on loopback and prints one
``Result`` as JSON on stdout. Keeping it out of the benchmark's own process means
the client never shares an interpreter (or a GIL) with anything it measures.

Three shapes of load:

* ``closed`` -- ``concurrency`` keep-alive connections, each sending its next
  request as soon as the previous answer arrives: the peak throughput.
* ``open`` -- requests start on a fixed schedule at ``rate`` per second whatever
  the server does, on as many connections as needed. Latency is measured from the
  *scheduled* start, so a stalled server cannot hide its queueing (no coordinated
  omission).
* ``sequential`` -- one connection, one request at a time: unloaded latency.

Every run is bounded twice: by ``duration`` seconds and by ``max_requests``.

Two clients: ``raw``, a minimal HTTP/1.1 keep-alive client on an asyncio
protocol (the default), and ``httpx``, ``httpx.AsyncClient``. On a 2-core machine
httpx tops out below what a bare FastAPI worker serves, so measuring the
baseline with it would measure httpx; ``raw`` costs a few microseconds per
request and is what the ratios are taken with. Both send the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, cast

Mode = Literal["closed", "open", "sequential"]


@dataclass
class Plan:
    """What to send: ``POST path`` with ``bodies`` in turn, or ``GET`` each of ``paths``."""

    host: str
    port: int
    path: str
    bodies: list[str]
    headers: dict[str, str] = field(default_factory=dict)
    method: Literal["POST", "GET"] = "POST"
    paths: list[str] = field(default_factory=list)
    mode: Mode = "closed"
    concurrency: int = 32
    rate: float = 0.0
    duration: float = 10.0
    warmup: float = 1.0
    max_requests: int = 100_000
    max_connections: int = 512
    expect_status: int = 200
    client: Literal["raw", "httpx"] = "raw"


@dataclass
class Result:
    mode: str
    sent: int
    measured: int
    ok: int
    errors: dict[str, int]
    elapsed: float
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    #: Open loop: how late the load generator began requests against their schedule.
    lag_p99_ms: float
    lag_max_ms: float
    connections: int
    capped: bool


# --------------------------------------------------------------------------- clients


class Connection(Protocol):
    async def request(self, payload: bytes) -> int: ...

    def close(self) -> None: ...


class _RawProtocol(asyncio.Protocol):
    """Parses one response at a time; every server here sends Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's; both have write() and close().
        self.transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        marker = head.find(b"\r\ncontent-length:")
        if marker < 0:
            self._fail(ConnectionError("response without Content-Length"))
            return
        stop = head.find(b"\r\n", marker + 2)
        length = int(head[marker + 17 : stop if stop >= 0 else None])
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        del self.buffer[:total]
        status = int(head[9:12])
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result(status)
        if b"\r\nconnection: close" in head:
            self.closed = True

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("connection lost"))


class RawConnection:
    def __init__(self, protocol: _RawProtocol) -> None:
        self._p = protocol

    @classmethod
    async def open(cls, host: str, port: int) -> RawConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_RawProtocol, host, port)
        return cls(protocol)

    @property
    def usable(self) -> bool:
        return not self._p.closed

    async def request(self, payload: bytes) -> int:
        p = self._p
        if p.closed or p.transport is None:
            raise ConnectionError("connection closed")
        p.waiter = asyncio.get_running_loop().create_future()
        p.transport.write(payload)
        return await p.waiter

    def close(self) -> None:
        if self._p.transport is not None:
            self._p.transport.close()


def _raw_request(plan: Plan, path: str, body: str | None) -> bytes:
    data = b"" if body is None else body.encode()
    lines = [
        f"{plan.method} {path} HTTP/1.1",
        f"Host: {plan.host}:{plan.port}",
        "Accept: application/json",
        *(f"{k}: {v}" for k, v in plan.headers.items()),
    ]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class HttpxConnection:
    """One httpx client with a single keep-alive connection, used like a raw one."""

    def __init__(self, plan: Plan) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            base_url=f"http://{plan.host}:{plan.port}",
            headers={"Content-Type": "application/json", **plan.headers},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=30.0,
            trust_env=False,
        )
        self._path = plan.path
        self._get = plan.method == "GET"
        self.usable = True

    async def request(self, payload: bytes) -> int:
        # For httpx the "payload" is the body (POST) or the path (GET).
        if self._get:
            return (await self._client.get(payload.decode())).status_code
        resp = await self._client.post(self._path, content=payload)
        return resp.status_code

    def close(self) -> None:
        self.usable = False

    async def aclose(self) -> None:
        await self._client.aclose()


class _Pool:
    """Connections on demand: reuse an idle one, else open a new one up to a cap."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.idle: deque[RawConnection | HttpxConnection] = deque()
        self.all: list[RawConnection | HttpxConnection] = []
        self.slots = asyncio.Semaphore(plan.max_connections)
        self.failures = 0
        self.answered = 0
        if plan.method == "GET":
            self.payloads = [
                p.encode() if plan.client == "httpx" else _raw_request(plan, p, None)
                for p in plan.paths
            ]
        else:
            self.payloads = [
                b.encode() if plan.client == "httpx" else _raw_request(plan, plan.path, b)
                for b in plan.bodies
            ]

    async def _new(self) -> RawConnection | HttpxConnection:
        conn: RawConnection | HttpxConnection
        if self.plan.client == "httpx":
            conn = HttpxConnection(self.plan)
        else:
            conn = await RawConnection.open(self.plan.host, self.plan.port)
        self.all.append(conn)
        return conn

    async def send(self, index: int) -> int:
        async with self.slots:
            conn = self.idle.pop() if self.idle else await self._new()
            try:
                status = await conn.request(self.payloads[index % len(self.payloads)])
            except (ConnectionError, OSError):
                conn.close()
                self.failures += 1
                if self.failures >= 200 and self.failures > self.answered:
                    raise RuntimeError("the server keeps dropping connections") from None
                return -1
            self.answered += 1
            if conn.usable:
                self.idle.append(conn)
            return status

    async def close(self) -> None:
        for conn in self.all:
            conn.close()
            if isinstance(conn, HttpxConnection):
                await conn.aclose()


# --------------------------------------------------------------------------- load shapes


@dataclass
class _Log:
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    #: When the client got round to the request: later than ``start`` in an open loop
    #: when the load generator itself was held up (descheduled, a GC pause).
    began: list[float] = field(default_factory=list)

    def add(self, start: float, end: float, status: int, began: float | None = None) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.statuses.append(status)
        self.began.append(start if began is None else began)


async def _closed(plan: Plan, pool: _Pool, log: _Log, deadline: float) -> None:
    counter = iter(range(plan.max_requests))

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() >= deadline:
                return
            start = time.perf_counter()
            status = await pool.send(i)
            log.add(start, time.perf_counter(), status)

    await asyncio.gather(*(worker() for _ in range(plan.concurrency)))


async def _open(plan: Plan, pool: _Pool, log: _Log, t0: float, deadline: float) -> None:
    interval = 1.0 / plan.rate
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, scheduled: float) -> None:
        began = time.perf_counter()
        status = await pool.send(i)
        log.add(scheduled, time.perf_counter(), status, began)

    for i in range(plan.max_requests):
        scheduled = t0 + i * interval
        if scheduled >= deadline:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def _sequential(plan: Plan, pool: _Pool, log: _Log, deadline: float) -> None:
    for i in range(plan.max_requests):
        if time.perf_counter() >= deadline:
            return
        start = time.perf_counter()
        status = await pool.send(i)
        log.add(start, time.perf_counter(), status)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def _summarise(plan: Plan, log: _Log, t0: float, t_end: float, conns: int) -> Result:
    cut = t0 + (plan.warmup if plan.mode != "sequential" else 0.0)
    window_end = min(t_end, t0 + plan.duration)
    latencies: list[float] = []
    lags: list[float] = []
    errors: Counter[str] = Counter()
    measured = ok = 0
    rows = zip(log.starts, log.ends, log.statuses, log.began, strict=True)
    for start, end, status, began in rows:
        if start < cut:
            continue
        measured += 1
        if status == plan.expect_status:
            ok += 1
            latencies.append((end - start) * 1000.0)
            lags.append((began - start) * 1000.0)
        else:
            errors[str(status)] += 1
    latencies.sort()
    lags.sort()
    if plan.mode == "sequential":
        elapsed = t_end - t0
        rate = ok / elapsed
    else:
        # Completions inside the measuring window, over the window's length.
        elapsed = max(window_end - cut, 1e-9)
        done = sum(
            1
            for end, status in zip(log.ends, log.statuses, strict=True)
            if status == plan.expect_status and cut <= end <= window_end
        )
        rate = done / elapsed
    sent = len(log.statuses)
    return Result(
        mode=plan.mode,
        sent=sent,
        measured=measured,
        ok=ok,
        errors=dict(errors),
        elapsed=round(elapsed, 3),
        throughput=round(rate, 1),
        p50_ms=round(percentile(latencies, 0.50), 3),
        p90_ms=round(percentile(latencies, 0.90), 3),
        p99_ms=round(percentile(latencies, 0.99), 3),
        max_ms=round(latencies[-1], 3) if latencies else float("nan"),
        mean_ms=round(sum(latencies) / len(latencies), 3) if latencies else float("nan"),
        lag_p99_ms=round(percentile(lags, 0.99), 3),
        lag_max_ms=round(lags[-1], 3) if lags else float("nan"),
        connections=conns,
        capped=sent >= plan.max_requests,
    )


async def run(plan: Plan) -> Result:
    pool = _Pool(plan)
    log = _Log()
    # Open the closed-loop connections before the clock starts.
    if plan.mode == "closed":
        for _ in range(plan.concurrency):
            pool.idle.append(await pool._new())
    elif plan.mode == "sequential":
        pool.idle.append(await pool._new())
    t0 = time.perf_counter()
    deadline = t0 + plan.duration
    try:
        if plan.mode == "closed":
            await _closed(plan, pool, log, deadline)
        elif plan.mode == "open":
            if plan.rate <= 0:
                raise ValueError("open-loop load needs a rate")
            await _open(plan, pool, log, t0, deadline)
        else:
            await _sequential(plan, pool, log, deadline)
    finally:
        t_end = time.perf_counter()
        await pool.close()
    return _summarise(plan, log, t0, t_end, len(pool.all))


def main() -> int:
    raw: dict[str, Any] = json.load(sys.stdin)
    plan = Plan(**raw)
    factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(run(plan))
    json.dump(asdict(result), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
