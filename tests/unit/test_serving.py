"""The one-write HTTP protocol, served by a real uvicorn on 127.0.0.1.

A subclass counts what reaches the real socket transport, so each test sees how
many ``write`` calls a response took and that clients still read every byte.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from broker.serving import FLUSH_AT, OneWriteHttpToolsProtocol, OneWriteTransport

BIG = b"x" * (3 * FLUSH_AT + 17)
CHUNKS = [b"first,", b"second,", b"third"]


class _Counting:
    """Stands between the socket transport and ``OneWriteTransport``; logs each write."""

    def __init__(self, transport: asyncio.Transport, log: list[bytes]) -> None:
        self._transport = transport
        self._log = log

    def write(self, data: bytes) -> None:
        self._log.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CountingProtocol(OneWriteHttpToolsProtocol):
    writes: ClassVar[list[bytes]] = []

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Counting(transport, self.writes))  # type: ignore[arg-type]


async def _small(request: Request) -> Response:
    return JSONResponse({"ok": True, "n": int(request.query_params.get("n", "0"))})


async def _stream(_: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in CHUNKS:
            yield chunk
            await asyncio.sleep(0.01)

    return StreamingResponse(chunks(), media_type="text/plain")


async def _big(_: Request) -> Response:
    return Response(BIG, media_type="application/octet-stream")


APP = Starlette(routes=[Route("/small", _small), Route("/stream", _stream), Route("/big", _big)])


@pytest.fixture(params=["uvloop", "asyncio"])
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        APP,
        loop=request.param,
        http=CountingProtocol,
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.002)
    CountingProtocol.writes.clear()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(5)
        sock.close()
        assert not thread.is_alive()


def test_each_small_response_is_one_write(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        for n in range(3):  # one keep-alive connection, three responses
            response = client.get("/small", params={"n": n})
            assert response.status_code == 200
            assert response.json() == {"ok": True, "n": n}
    writes = CountingProtocol.writes
    assert len(writes) == 3
    for write in writes:
        head, _, body = write.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert body.startswith(b'{"ok":true')


def test_streamed_chunks_are_not_held_back(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        response = client.get("/stream")
    assert response.content == b"".join(CHUNKS)
    # The app sleeps between chunks, so each chunk leaves on its own turn of the loop.
    assert len(CountingProtocol.writes) >= len(CHUNKS)


def test_large_body_arrives_whole(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        response = client.get("/big")
    assert response.content == BIG
    assert sum(len(w) for w in CountingProtocol.writes) > len(BIG)


def test_connection_close_still_sends_everything(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"GET /small?n=7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK")
    assert received.endswith(b'{"ok":true,"n":7}')


class _Recorder:
    """A transport double for the ordering rules that need no socket."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.events.append(("write", data))

    def close(self) -> None:
        self.events.append(("close", b""))
        self.closing = True

    def abort(self) -> None:
        self.events.append(("abort", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


async def test_close_flushes_first_and_abort_drops() -> None:
    loop = asyncio.get_running_loop()
    raw = _Recorder()
    held = OneWriteTransport(raw, loop)  # type: ignore[arg-type]
    held.write(b"head")
    held.write(b"body")
    assert raw.events == []
    assert held.get_write_buffer_size() == 8
    held.close()
    assert raw.events == [("write", b"headbody"), ("close", b"")]

    raw2 = _Recorder()
    held2 = OneWriteTransport(raw2, loop)  # type: ignore[arg-type]
    held2.write(b"never sent")
    held2.abort()
    await asyncio.sleep(0)  # the scheduled flush finds nothing to send
    assert raw2.events == [("abort", b"")]


async def test_held_writes_leave_on_the_next_turn() -> None:
    raw = _Recorder()
    held = OneWriteTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    held.write(b"a")
    held.write(b"b")
    await asyncio.sleep(0)
    assert raw.events == [("write", b"ab")]
    raw.closing = True
    held.write(b"late")
    await asyncio.sleep(0)
    assert raw.events == [("write", b"ab")]  # nothing is written to a closing transport
