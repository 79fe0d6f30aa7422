"""A real records endpoint for tests: a Starlette app served by uvicorn on 127.0.0.1.

It plays a holding agency (see ``broker.sources.endpoint`` for the protocol) so the broker's
fetcher is tested over real sockets rather than against a mocked httpx. uvicorn runs in its own
thread with its own event loop, so it never competes with pytest-asyncio's session loop, starts
and stops in a fraction of a second, and any number can run side by side.

Usage::

    with running_records_server() as server:
        server.records["case-1", "shelter"] = {"bed_status": "assigned"}
        server.behaviour = "slow"; server.delay = 1.0
        ...

``async with async_running_records_server()`` in async fixtures (start/stop run off the
event loop), or ``server = start_records_server()`` / ``server.stop()`` (``reset()`` between
tests when one server is shared by a module). ``server.requests`` lists what arrived (headers,
body, verified claims); set ``verify_with`` to the broker's public JWKS to make it refuse
unauthenticated calls with 401, as a real agency must.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Self

import uvicorn
from jwcrypto import jwk, jws
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "BEHAVIOURS",
    "RecordsServer",
    "RequestNotAuthentic",
    "async_running_records_server",
    "running_records_server",
    "start_records_server",
    "verify_records_request",
]

BEHAVIOURS = frozenset(
    {
        "normal",  # the stored record, or 404 when there is none
        "slow",  # sleep ``delay`` seconds, then answer normally
        "trickle",  # headers (with Content-Length), then one byte every ``delay`` seconds
        "huge",  # a ``huge_bytes`` JSON object with Content-Length
        "huge_chunked",  # the same, chunked: no Content-Length
        "redirect",  # 302 to /elsewhere on this server (which counts its hits)
        "status_500",
        "wrong_content_type",  # the record, labelled text/html
        "not_json",
        "json_array",  # [record]
        "wrong_types",  # every field of the record with a value of the wrong type
        "extra_fields",  # the record plus ``extra_fields`` (unknown to the schema)
        "not_found",  # always 404
        "compressed",  # the record, gzip-encoded although the broker asked for identity
    }
)
REQUEST_TYP = "records-request+jwt"
WRONG_TYPE_STRING = "wrong-type-value"
WRONG_TYPE_NUMBER = 987654


class RequestNotAuthentic(Exception):
    """The broker's bearer token is missing or does not verify; the message says which check."""


def _b64json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def verify_records_request(
    authorization: str | None,
    body: bytes,
    jwks: dict[str, Any],
    audience: str,
    *,
    issuer: str | None = None,
    holder: str | None = None,
    seen_jti: set[str] | None = None,
    leeway: int = 5,
) -> dict[str, Any]:
    """Verify a records request as a holding agency would; return the JWT claims.

    Written with jwcrypto rather than the broker's joserfc helpers, so passing it shows an
    independent JOSE implementation accepts what the broker sends.
    """
    if not authorization or not authorization.startswith("Bearer "):
        raise RequestNotAuthentic("missing bearer token")
    token = authorization[len("Bearer ") :]
    try:
        header = _b64json(token.split(".", 1)[0])
    except Exception:
        raise RequestNotAuthentic("malformed token") from None
    if not isinstance(header, dict) or header.get("alg") != "ES256":
        raise RequestNotAuthentic("alg must be ES256")
    if header.get("typ") != REQUEST_TYP:
        raise RequestNotAuthentic("wrong typ")
    keyset = jwk.JWKSet.from_json(json.dumps(jwks))
    key = keyset.get_key(header.get("kid")) if isinstance(header.get("kid"), str) else None
    if key is None:
        raise RequestNotAuthentic("unknown kid")
    signed = jws.JWS()
    try:
        signed.deserialize(token)
        signed.verify(key, alg="ES256")
    except Exception:
        raise RequestNotAuthentic("bad signature") from None
    claims = json.loads(signed.payload)
    if not isinstance(claims, dict):
        raise RequestNotAuthentic("claims are not a JSON object")
    now = time.time()
    if claims.get("aud") != audience:
        raise RequestNotAuthentic("wrong aud")
    if claims.get("req") != hashlib.sha256(body).hexdigest():
        raise RequestNotAuthentic("req digest does not match the body")
    if issuer is not None and claims.get("iss") != issuer:
        raise RequestNotAuthentic("wrong iss")
    if holder is not None and claims.get("sub") != holder:
        raise RequestNotAuthentic("wrong sub")
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int) or not isinstance(iat, int) or exp - iat > 300:
        raise RequestNotAuthentic("bad iat/exp")
    if exp < now - leeway or iat > now + leeway:
        raise RequestNotAuthentic("token expired or not yet valid")
    try:
        if json.loads(body).get("category") != claims.get("category"):
            raise RequestNotAuthentic("category differs from the body")
    except (ValueError, AttributeError):
        raise RequestNotAuthentic("body is not a JSON object") from None
    if seen_jti is not None:
        jti = claims.get("jti")
        if not isinstance(jti, str) or jti in seen_jti:
            raise RequestNotAuthentic("replayed jti")
        seen_jti.add(jti)
    return dict(claims)


class RecordsServer:
    """One holding agency's records endpoint; attributes may be changed between requests."""

    def __init__(self, path: str = "/records") -> None:
        self.path = path
        self.url = ""  # set by start(): e.g. http://127.0.0.1:54321/records
        self.base_url = ""
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.redirect_target_hits = 0
        self._lock = threading.Lock()
        self._seen_jti: set[str] = set()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()
        self.app = Starlette(
            routes=[
                Route(path, self._records, methods=["POST"]),
                Route("/elsewhere", self._elsewhere, methods=["GET", "POST"]),
            ]
        )

    # ------------------------------------------------------------------ configuration

    def reset(self) -> None:
        """Back to a fresh server (records, log, behaviour, verification), keeping the port."""
        self.records.clear()
        self.requests.clear()
        self._behaviour = "normal"
        self.delay = 0.0
        self.content_type = "application/json"
        self.huge_bytes = 1024 * 1024
        self.extra_fields: dict[str, Any] = {
            "internal_case_notes": "unknown-field-1",
            "caseworker_extension": 4711,
        }
        self.verify_with: dict[str, Any] | None = None
        self.expect_issuer: str | None = None
        self.expect_holder: str | None = None
        self.redirect_target_hits = 0
        self._seen_jti.clear()

    @property
    def behaviour(self) -> str:
        return self._behaviour

    @behaviour.setter
    def behaviour(self, value: str) -> None:
        if value not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {value!r}; one of {sorted(BEHAVIOURS)}")
        self._behaviour = value

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 5.0) -> Self:
        """Bind a free port, serve in a daemon thread and return once uvicorn accepts."""
        if self._thread is not None:
            raise RuntimeError("already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.url = self.base_url + self.path
        config = uvicorn.Config(
            self.app,
            loop="asyncio",
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,  # leave the test process's logging alone
            log_level="warning",
            access_log=False,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"records-{port}", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError("records server did not start")
            time.sleep(0.002)
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop at once: in-flight (slow, trickling) responses are cancelled, not awaited."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        server.force_exit = True
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("records server did not stop")
        self._server = self._thread = None

    def __enter__(self) -> RecordsServer:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ handlers

    async def _records(self, request: Request) -> Response:
        behaviour, delay = self._behaviour, self.delay  # as configured when the call arrived
        body = await request.body()
        entry: dict[str, Any] = {
            "method": request.method,
            "path": request.url.path,
            "headers": dict(request.headers),
            "body": body,
            "client": request.client,  # (host, port): one port per connection
            "claims": None,
            "auth_error": None,
        }
        with self._lock:
            self.requests.append(entry)
        if self.verify_with is not None:
            try:
                with self._lock:
                    entry["claims"] = verify_records_request(
                        request.headers.get("authorization"),
                        body,
                        self.verify_with,
                        self.url,
                        issuer=self.expect_issuer,
                        holder=self.expect_holder,
                        seen_jti=self._seen_jti,
                    )
            except RequestNotAuthentic as exc:
                entry["auth_error"] = str(exc)
                return JSONResponse({"error": "invalid_token"}, status_code=401)
        try:
            query = json.loads(body)
            key = (str(query["subject_ref"]), str(query["category"]))
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "bad request"}, status_code=400)
        record = self.records.get(key)
        return await self._answer(behaviour, delay, record)

    async def _answer(
        self, behaviour: str, delay: float, record: dict[str, Any] | None
    ) -> Response:
        if behaviour == "not_found":
            return Response(status_code=404)
        if behaviour == "status_500":
            return JSONResponse({"error": "internal"}, status_code=500)
        if behaviour == "redirect":
            return RedirectResponse(self.base_url + "/elsewhere", status_code=302)
        if behaviour == "not_json":
            return Response(b"{not json", media_type=self.content_type)
        if behaviour == "huge":
            return Response(_padding(self.huge_bytes), media_type=self.content_type)
        if behaviour == "huge_chunked":
            return StreamingResponse(
                _chunks(_padding(self.huge_bytes), 16 * 1024), media_type=self.content_type
            )
        if behaviour == "slow":
            await asyncio.sleep(delay)
        if record is None:
            return Response(status_code=404)
        if behaviour == "json_array":
            return self._json([record])
        if behaviour == "wrong_content_type":
            return Response(json.dumps(record).encode(), media_type="text/html")
        if behaviour == "wrong_types":
            return self._json({k: _wrong_type(v) for k, v in record.items()})
        if behaviour == "compressed":
            return Response(
                gzip.compress(json.dumps(record).encode()),
                media_type=self.content_type,
                headers={"content-encoding": "gzip"},
            )
        if behaviour == "extra_fields":
            return self._json({**record, **self.extra_fields})
        if behaviour == "trickle":
            data = json.dumps(record).encode()
            return StreamingResponse(
                _trickle(data, delay),
                media_type=self.content_type,
                headers={"content-length": str(len(data))},
            )
        return self._json(record)

    def _json(self, value: object) -> Response:
        return Response(json.dumps(value).encode(), media_type=self.content_type)

    async def _elsewhere(self, request: Request) -> Response:
        """A redirect target that must never be reached: the broker contacts only the URL."""
        with self._lock:
            self.redirect_target_hits += 1
        return JSONResponse({"bed_status": "assigned"})


def _padding(size: int) -> bytes:
    return b'{"pad":"' + b"x" * max(size - 10, 0) + b'"}'


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _trickle(data: bytes, delay: float) -> AsyncIterator[bytes]:
    for index in range(len(data)):
        yield data[index : index + 1]
        await asyncio.sleep(delay)


def _wrong_type(value: object) -> object:
    return WRONG_TYPE_NUMBER if isinstance(value, str) else WRONG_TYPE_STRING


def start_records_server(path: str = "/records") -> RecordsServer:
    """A started server; call ``.stop()`` when done."""
    return RecordsServer(path).start()


@contextlib.contextmanager
def running_records_server(path: str = "/records") -> Iterator[RecordsServer]:
    """A started server for the ``with`` block, stopped on the way out."""
    server = start_records_server(path)
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def async_running_records_server(path: str = "/records") -> AsyncIterator[RecordsServer]:
    """Like ``running_records_server`` for async fixtures: start and stop off the event loop."""
    server = await asyncio.to_thread(start_records_server, path)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)
