"""Keep-alive connections to records endpoints: O(1) per request, bounded, asyncio only.

httpcore's own pool re-examines every connection it holds, twice per request (when
the request arrives and when its response closes), and each examination of an idle
connection is a ``poll`` system call. With the few dozen connections that concurrent
fetches to one agency keep open, that scan took a quarter of the CPU of a
records-endpoint disclosure in the bench profile. This pool keeps each origin's idle
connections on a stack instead: a request takes the most recently used one, and
only that one is examined. httpx's client, its timeouts and its exception mapping
are unchanged (``RecordsTransport`` only swaps the pool under ``AsyncHTTPTransport``).

Limits, as httpcore's: at most ``max_connections`` connections are open (busy or
idle) and at most that many requests are in flight; a request that finds none free
waits at most the request's pool timeout, then fails with ``httpcore.PoolTimeout``.
An idle connection past its keep-alive, or one the server has closed, is never
reused; each returning connection also retires its origin's oldest idle one once
that has expired, so a burst's surplus does not linger.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpcore
import httpx

__all__ = ["AgencyClient", "LifoConnectionPool", "RecordsTransport"]


class LifoConnectionPool:
    """An httpcore-style request interface holding HTTP/1.1 keep-alive connections per origin."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._max = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._slots = asyncio.Semaphore(max_connections)  # requests in flight
        # Per origin, oldest first: (connection, when it went idle).
        self._idle: dict[_Key, list[tuple[httpcore.AsyncHTTPConnection, float]]] = {}
        self._idle_count = 0
        self._busy = 0  # connections carrying a request (their response not yet closed)
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections open or being opened: busy plus idle."""
        return self._busy + self._idle_count

    @property
    def idle_connections(self) -> int:
        return self._idle_count

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._closed:
            raise RuntimeError("the records connection pool is closed")
        if request.url.scheme not in (b"http", b"https"):
            raise httpcore.UnsupportedProtocol("records endpoints are http or https URLs")
        await self._take_slot(request.extensions.get("timeout", {}).get("pool"))
        connection: httpcore.AsyncHTTPConnection | None = None
        try:
            for fresh in (False, True):
                connection = await self._checkout(request.url.origin, fresh=fresh)
                try:
                    response = await connection.handle_async_request(request)
                except httpcore.ConnectionNotAvailable:
                    # A kept-alive connection that closed between the check and the
                    # send: nothing was written, so one new connection may try.
                    await self._discard(connection)
                    connection = None
                    if fresh:
                        raise
                    continue
                break
        except BaseException:
            if connection is not None:
                await self._discard(connection)
            self._slots.release()
            raise
        assert connection is not None
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=_ReturningStream(response.stream, self, connection, request.url.origin),
            extensions=response.extensions,
        )

    async def _take_slot(self, wait_at_most: float | None) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # free: returns without suspending
            return
        try:
            async with asyncio.timeout(wait_at_most):
                await self._slots.acquire()
        except TimeoutError:
            raise httpcore.PoolTimeout("no records-endpoint connection came free") from None

    async def _checkout(
        self, origin: httpcore.Origin, *, fresh: bool
    ) -> httpcore.AsyncHTTPConnection:
        """The origin's most recently used live idle connection, else a new one."""
        stack = self._idle.get(_key(origin))
        while stack and not fresh:
            connection, since = stack.pop()
            self._idle_count -= 1
            # has_expired() also polls the socket: a server that closed it is seen here.
            if self._stale(since) or connection.is_closed() or connection.has_expired():
                await _close(connection)
                continue
            self._busy += 1
            return connection
        if self.open_connections >= self._max:
            await self._evict_one()
        self._busy += 1
        return httpcore.AsyncHTTPConnection(
            origin=origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            http1=True,
            http2=False,
        )

    async def _evict_one(self) -> None:
        """Close the oldest idle connection of the origin with the most idle ones.

        Reached only with every slot's connection open: as at most ``max`` requests
        are in flight and this one holds a slot, at least one connection is idle.
        """
        stack = max(self._idle.values(), key=len, default=None)
        if not stack:
            return
        self._idle_count -= 1
        await _close(stack.pop(0)[0])

    def _stale(self, since: float) -> bool:
        return time.monotonic() - since > self._keepalive_expiry

    async def _checkin(
        self, connection: httpcore.AsyncHTTPConnection, origin: httpcore.Origin
    ) -> None:
        """A response was closed: keep its connection if it can carry another request."""
        self._busy -= 1
        try:
            if self._closed or not connection.is_idle():  # closed, or the body unread
                await _close(connection)
                return
            stack = self._idle.setdefault(_key(origin), [])
            stack.append((connection, time.monotonic()))
            self._idle_count += 1
            if len(stack) > 1 and self._stale(stack[0][1]):
                self._idle_count -= 1
                await _close(stack.pop(0)[0])
        finally:
            self._slots.release()

    async def _discard(self, connection: httpcore.AsyncHTTPConnection) -> None:
        self._busy -= 1
        await _close(connection)

    async def __aenter__(self) -> LifoConnectionPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the idle connections; busy ones close as their responses do."""
        self._closed = True
        stacks, self._idle, self._idle_count = list(self._idle.values()), {}, 0
        for stack in stacks:
            for connection, _ in stack:
                await _close(connection)


_Key = tuple[bytes, bytes, int]


def _key(origin: httpcore.Origin) -> _Key:
    return origin.scheme, origin.host, origin.port


async def _close(connection: httpcore.AsyncHTTPConnection) -> None:
    # httpcore shields its own close from cancellation; a failing close of a dead
    # socket changes nothing for the pool.
    with contextlib.suppress(Exception):
        await connection.aclose()


class _ReturningStream:
    """A response body that hands its connection back to the pool when closed."""

    def __init__(
        self,
        stream: Any,
        pool: LifoConnectionPool,
        connection: httpcore.AsyncHTTPConnection,
        origin: httpcore.Origin,
    ) -> None:
        self._stream = stream
        self._pool = pool
        self._connection = connection
        self._origin = origin
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if hasattr(self._stream, "aclose"):
                await self._stream.aclose()  # shielded by httpcore; readies or closes
        finally:
            await self._pool._checkin(self._connection, self._origin)


class RecordsTransport(httpx.AsyncHTTPTransport):
    """httpx's transport (request building, exception mapping) over ``LifoConnectionPool``.

    HTTP/1.1 only, no proxy, no environment settings: records endpoints are called
    directly at the URL an agency registered.
    """

    def __init__(self, *, max_connections: int, keepalive_expiry: float = 5.0) -> None:
        # One TLS context (loading the CA bundle takes ~25 ms), for httpx's own pool
        # (never used) and this one.
        ssl_context = httpx.create_ssl_context(trust_env=False)
        super().__init__(
            verify=ssl_context, trust_env=False, limits=httpx.Limits(max_connections=1)
        )
        self._pool = LifoConnectionPool(  # type: ignore[assignment]
            max_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
            ssl_context=ssl_context,
        )

    @property
    def pool(self) -> LifoConnectionPool:
        pool = self._pool
        assert isinstance(pool, LifoConnectionPool)
        return pool


_DEFAULT_HEADERS = {"User-Agent": "consent-broker", "Accept-Encoding": "identity"}


class AgencyClient:
    """HTTP to agencies (records endpoints, webhooks): httpx's transport, called directly.

    ``httpx.AsyncClient`` wraps the transport in cookies, auth flows, redirect handling,
    event hooks and URL merging: about 0.3 ms of CPU per request in a micro-benchmark
    against a local endpoint, none of it needed here. The broker never follows a
    redirect and signs its own requests. Requests go out as httpx builds them, with
    httpx's timeouts and exceptions, through ``RecordsTransport``.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        read_timeout: float,
        connect_timeout: float,
        keepalive_expiry: float = 5.0,
    ) -> None:
        self.transport = RecordsTransport(
            max_connections=max_connections, keepalive_expiry=keepalive_expiry
        )
        # The pool timeout is the read one: a fetch waits at most that for a connection.
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)

    @contextlib.asynccontextmanager
    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        timeout: httpx.Timeout | None = None,  # noqa: ASYNC109 - per-phase, as httpx
    ) -> AsyncIterator[httpx.Response]:
        """POST ``body``; the response's body is left unread for the caller to stream."""
        request = httpx.Request(
            "POST",
            url,
            content=body,
            headers={**_DEFAULT_HEADERS, **headers},
            extensions={"timeout": (timeout or self.timeout).as_dict()},
        )
        response = await self.transport.handle_async_request(request)
        try:
            yield response
        finally:
            await response.aclose()  # back to the pool, or closed if the body was not read

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> AgencyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
