"""A blocking keep-alive HTTP/1.1 connection for sequential requests, timed one by one.

The load generator measures throughput; this measures single requests, with nothing
between the client and the socket that could add its own jitter.
"""

from __future__ import annotations

import socket
import time


class KeepAliveConn:
    """One keep-alive HTTP/1.1 connection, blocking: the simplest client is the fairest."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.token = token
        self.last_body = b""
        self.head = (
            "POST /v1/disclosures HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        )

    def post(self, body: str) -> tuple[int, float]:
        data = body.encode()
        request = f"{self.head}Content-Length: {len(data)}\r\n\r\n".encode() + data
        began = time.perf_counter()
        self.sock.sendall(request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            rest += chunk
        elapsed = time.perf_counter() - began
        self.last_body = rest[:length]
        return int(head.split(b" ", 2)[1]), elapsed
