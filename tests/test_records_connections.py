"""The records-endpoint connection pool (``broker.sources.connections``), over real sockets.

Servers are uvicorn (``tests.records_server``) or, where the server must misbehave at
the connection level, a few lines of asyncio on 127.0.0.1. Connections are counted on
the server's side: one client port per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from broker.sources.connections import AgencyClient, LifoConnectionPool, RecordsTransport
from tests.records_server import RecordsServer, running_records_server

BODY = b'{"subject_ref": "case-1", "category": "shelter"}'


@pytest.fixture(scope="module")
def module_server() -> Iterator[RecordsServer]:
    with running_records_server() as server:
        yield server


@pytest.fixture
def server(module_server: RecordsServer) -> RecordsServer:
    module_server.reset()
    module_server.records["case-1", "shelter"] = {"bed_status": "assigned"}
    return module_server


@contextlib.asynccontextmanager
async def client(
    max_connections: int, *, keepalive_expiry: float = 5.0, pool_timeout: float = 2.0
) -> AsyncIterator[tuple[httpx.AsyncClient, LifoConnectionPool]]:
    transport = RecordsTransport(max_connections=max_connections, keepalive_expiry=keepalive_expiry)
    timeout = httpx.Timeout(5.0, connect=1.0, pool=pool_timeout)
    async with httpx.AsyncClient(transport=transport, timeout=timeout) as http:
        yield http, transport.pool


def ports(server: RecordsServer) -> set[int]:
    return {entry["client"][1] for entry in server.requests}


async def test_sequential_fetches_reuse_one_connection(server: RecordsServer) -> None:
    async with client(4) as (http, pool):
        for _ in range(5):
            response = await http.post(server.url, content=BODY)
            assert response.json() == {"bed_status": "assigned"}
        assert len(server.requests) == 5
        assert len(ports(server)) == 1
        assert (pool.open_connections, pool.idle_connections) == (1, 1)


async def test_the_broker_client_keeps_to_its_connection_limit(server: RecordsServer) -> None:
    server.behaviour, server.delay = "slow", 0.2

    async def status(http: AgencyClient) -> int:
        async with http.post(server.url, BODY, {}) as response:
            await response.aread()
            return response.status_code

    async with AgencyClient(max_connections=1, read_timeout=2, connect_timeout=1) as http:
        assert list(await asyncio.gather(status(http), status(http))) == [200, 200]
    assert len(ports(server)) == 1  # the second waited for the first's connection
    assert server.requests[0]["headers"]["user-agent"] == "consent-broker"


async def test_the_broker_client_passes_its_timeouts_to_the_pool(server: RecordsServer) -> None:
    server.behaviour, server.delay = "slow", 1.0
    fast = httpx.Timeout(2.0, pool=0.1)
    async with (
        AgencyClient(max_connections=1, read_timeout=2, connect_timeout=1) as http,
        http.post(server.url, BODY, {}) as first,
    ):
        with pytest.raises(httpx.PoolTimeout):
            async with http.post(server.url, BODY, {}, timeout=fast):
                pass
        assert first.status_code == 200


async def test_concurrent_fetches_never_exceed_the_limit(server: RecordsServer) -> None:
    server.behaviour, server.delay = "slow", 0.2
    async with client(3) as (http, pool):
        peak = 0

        async def one() -> int:
            nonlocal peak
            response = await http.post(server.url, content=BODY)
            peak = max(peak, pool.open_connections)
            return response.status_code

        statuses = await asyncio.gather(*(one() for _ in range(9)))
        assert statuses == [200] * 9
        assert len(ports(server)) == 3  # three connections, each carried three requests
        assert peak == 3
        assert (pool.open_connections, pool.idle_connections) == (3, 3)


async def test_a_fetch_waits_for_a_connection_at_most_the_pool_timeout(
    server: RecordsServer,
) -> None:
    server.behaviour, server.delay = "slow", 1.0
    async with client(1, pool_timeout=0.2) as (http, pool):
        first = asyncio.create_task(http.post(server.url, content=BODY))
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.PoolTimeout):
            await http.post(server.url, content=BODY)
        assert (await first).status_code == 200
        server.behaviour = "normal"
        assert (await http.post(server.url, content=BODY)).status_code == 200
        assert pool.open_connections == 1


async def test_a_cancelled_fetch_frees_its_slot(server: RecordsServer) -> None:
    server.behaviour, server.delay = "slow", 2.0
    async with client(1, pool_timeout=0.5) as (http, pool):
        stuck = asyncio.create_task(http.post(server.url, content=BODY))
        await asyncio.sleep(0.2)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert pool.open_connections == 0  # the half-used connection was closed
        server.behaviour = "normal"
        assert (await http.post(server.url, content=BODY)).status_code == 200


async def test_an_unread_body_closes_its_connection(server: RecordsServer) -> None:
    server.behaviour, server.huge_bytes = "huge", 256 * 1024
    async with client(2) as (http, pool):
        async with http.stream("POST", server.url, content=BODY) as response:
            assert response.status_code == 200  # walk away without reading the body
        assert (pool.open_connections, pool.idle_connections) == (0, 0)
        server.behaviour = "normal"
        await http.post(server.url, content=BODY)
        assert len(ports(server)) == 2


async def test_an_idle_connection_past_its_keep_alive_is_not_reused(
    server: RecordsServer,
) -> None:
    async with client(4, keepalive_expiry=0.05) as (http, pool):
        await http.post(server.url, content=BODY)
        await asyncio.sleep(0.1)
        await http.post(server.url, content=BODY)
        assert len(ports(server)) == 2
        assert pool.open_connections == 1


async def test_a_stale_connection_is_retired_when_another_returns(
    server: RecordsServer,
) -> None:
    """A burst's surplus connections lie under the one in use: each return retires one."""
    server.behaviour, server.delay = "slow", 0.1
    async with client(4, keepalive_expiry=0.5) as (http, pool):
        await asyncio.gather(*(http.post(server.url, content=BODY) for _ in range(3)))
        assert pool.idle_connections == 3
        server.behaviour = "normal"
        await asyncio.sleep(0.3)
        await http.post(server.url, content=BODY)  # the top one, still fresh
        assert pool.idle_connections == 3
        await asyncio.sleep(0.3)  # the two below it are now stale, the top one is not
        await http.post(server.url, content=BODY)
        assert pool.idle_connections == 2
        await http.post(server.url, content=BODY)
        assert pool.idle_connections == 1
        assert len(ports(server)) == 3


async def test_a_full_pool_makes_room_for_another_agency(server: RecordsServer) -> None:
    with running_records_server() as other:
        other.records["case-1", "shelter"] = {"bed_status": "waitlisted"}
        async with client(1, pool_timeout=0.2) as (http, pool):
            assert (await http.post(server.url, content=BODY)).json()["bed_status"] == "assigned"
            # No free slot for a connection to ``other``: the idle one to ``server`` goes.
            assert (await http.post(other.url, content=BODY)).json()["bed_status"] == "waitlisted"
            assert pool.open_connections == 1


class OneShotServer:
    """Answers each connection's first request, then closes it: keep-alive gone server-side."""

    def __init__(self) -> None:
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> OneShotServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/records"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        # Advertises keep-alive (no "Connection: close"), then hangs up anyway.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: 2\r\n\r\n{}")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()


async def test_a_connection_the_server_closed_is_not_reused() -> None:
    async with OneShotServer() as server, client(2) as (http, pool):
        for _ in range(3):
            response = await http.post(server.url, content=BODY)
            assert response.status_code == 200
            await asyncio.sleep(0.15)  # the server hangs up meanwhile
        assert server.connections == 3
        assert pool.open_connections == 1


async def test_a_closed_pool_refuses_requests(server: RecordsServer) -> None:
    transport = RecordsTransport(max_connections=1)
    async with httpx.AsyncClient(transport=transport) as http:
        await http.post(server.url, content=BODY)
    assert transport.pool.open_connections == 0
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(httpx.Request("POST", server.url, content=BODY))


def test_the_pool_needs_a_connection() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LifoConnectionPool(max_connections=0)
