"""uvicorn's httptools protocol, sending each response's head and body in one write.

uvicorn writes a response's status line and headers, then its body, as two
``transport.write`` calls, so two ``send`` system calls and two segments the
client must read. On loopback and in small VMs a ``send`` that wakes the peer
costs 10-35 µs; a disclosure answer is a few hundred bytes, so the second call
was pure overhead on both sides. Writes here are held and sent together when the
response completes, or at the latest on the event loop's next turn (streamed
bodies), or at once past ``FLUSH_AT`` bytes. Nothing else about the protocol
changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["FLUSH_AT", "OneWriteHttpToolsProtocol", "OneWriteTransport", "http_protocol"]

#: What ``broker serve`` passes to uvicorn as ``http`` when the subclass fits.
ONE_WRITE_PROTOCOL = "broker.serving:OneWriteHttpToolsProtocol"

#: Held bytes past which a write goes out at once, so a large body is not copied twice.
FLUSH_AT = 64 * 1024


class OneWriteTransport:
    """A transport that joins the writes of one event-loop turn into one ``write``.

    Held bytes always go out before the transport is closed or has EOF written, and
    never after it was aborted or has started closing.
    """

    __slots__ = ("_held", "_held_bytes", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))
        self._held_bytes += len(data)
        if self._held_bytes >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held.clear()
        self._held_bytes = 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._held_bytes + self._transport.get_write_buffer_size()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        # Anything else a transport offers (set_protocol, is_reading, buffer limits...).
        return getattr(self._transport, name)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` over a ``OneWriteTransport``; flushed as each response ends."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        wrapped = OneWriteTransport(transport, self.loop)
        super().connection_made(wrapped)  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        transport = self.transport
        if isinstance(transport, OneWriteTransport):
            transport.flush()
        super().on_response_complete()


def http_protocol() -> tuple[str, str | None]:
    """uvicorn's ``http`` setting for ``broker serve``, and a warning if it is not ours.

    ``OneWriteHttpToolsProtocol`` overrides two methods of uvicorn's own protocol
    class, which is not a public API. A uvicorn release that renamed them would leave
    the subclass serving subtly wrong; the stock protocol is served instead (one more
    ``send`` per response), with a warning.
    """
    own = HttpToolsProtocol.__dict__
    if all(callable(own.get(name)) for name in ("connection_made", "on_response_complete")):
        return ONE_WRITE_PROTOCOL, None
    return "httptools", (
        "warning: this uvicorn's httptools protocol is not the one broker.serving was "
        "written for; serving uvicorn's own (responses take two writes)"
    )
