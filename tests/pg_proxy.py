"""A loopback TCP proxy in front of PostgreSQL that can lose a commit's acknowledgement.

Armed, it forwards the next committing message to the server, withholds every byte
the server sends back, waits until the server has had time to commit, then closes
both sides: the broker sees the connection die mid-commit while the database holds
the committed change. Connect with ``?ssl=disable`` so the protocol stays readable.
Listens on 127.0.0.1 only; ``close()`` stops it and every relayed connection.

The committing message is a simple-protocol query starting with ``cut_on``
(asyncpg sends ``COMMIT`` as a simple query, ``Q``) or, for a statement that
commits on its own in autocommit, the ``Sync`` closing the execution of a prepared
statement whose SQL contains ``cut_on`` (asyncpg parses a statement once per
connection, ``P``, then binds it by name, ``B``, for each execution).

PostgreSQL messages after the startup packet are a type byte and a 4-byte length.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104


class CommitCuttingProxy:
    def __init__(
        self, upstream_port: int = 5432, settle: float = 0.3, cut_on: bytes = b"COMMIT"
    ) -> None:
        self.upstream_port = upstream_port
        self.cut_on = cut_on
        self.settle = settle  # seconds the server gets to finish the COMMIT it was sent
        self.armed = False
        self.cuts = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> CommitCuttingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing the sockets ends every relay by itself (cancelling the tasks instead
        # makes asyncio log the cancelled connection callbacks as errors).
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        self._writers |= {writer, up_writer}
        cut = asyncio.Event()
        down = asyncio.create_task(self._server_to_client(up_reader, writer, cut))
        try:
            await self._client_to_server(reader, up_writer, cut)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            down.cancel()
            with contextlib.suppress(BaseException):
                await down
            for w in (writer, up_writer):
                w.close()
                self._writers.discard(w)
            self._tasks.discard(task)

    async def _client_to_server(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, cut: asyncio.Event
    ) -> None:
        # Startup packets have no type byte; an SSL/GSS request is refused by the server
        # with one byte, after which the real startup packet follows.
        while True:
            head = await reader.readexactly(4)
            (length,) = struct.unpack("!I", head)
            body = await reader.readexactly(length - 4)
            up.write(head + body)
            await up.drain()
            code = struct.unpack("!I", body[:4])[0] if len(body) >= 4 else 0
            if code not in (_SSL_REQUEST, _GSS_REQUEST):
                break
        statements: dict[bytes, bytes] = {}  # prepared statement name -> SQL
        bound = False  # a Bind of a matching statement awaits its Sync
        while True:
            kind = await reader.readexactly(1)
            head = await reader.readexactly(4)
            (length,) = struct.unpack("!I", head)
            body = await reader.readexactly(length - 4)
            if kind == b"P":
                name, _, rest = body.partition(b"\0")
                statements[name] = rest.partition(b"\0")[0]
            elif kind == b"B":
                name = body.split(b"\0", 2)[1]
                bound = self.cut_on in statements.get(name, b"")
            commit = (kind == b"Q" and body.lstrip().upper().startswith(self.cut_on)) or (
                kind == b"S" and bound
            )
            if kind == b"S":
                bound = False
            if commit and self.armed:
                self.armed = False
                cut.set()  # from now on nothing the server says reaches the client
                self.cuts += 1
                up.write(kind + head + body)
                await up.drain()
                await asyncio.sleep(self.settle)
                return  # closing both sides: the acknowledgement is lost
            up.write(kind + head + body)
            await up.drain()

    async def _server_to_client(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: asyncio.Event
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await up.read(65536):
                if cut.is_set():
                    return  # the COMMIT's answer: withheld; _accept closes both sides
                writer.write(data)
                await writer.drain()
            # The server hung up (say after a Terminate): so does the proxy, or a client
            # closing gracefully would wait for an EOF that never comes.
            writer.close()
