"""A holding agency's records endpoint for the benchmark (Eastside Shelter).

It implements the protocol in ``broker.sources.endpoint`` the way a careful agency
would -- it verifies the broker's ES256 request token against the broker's
published JWKS (``typ``, ``iss``, ``aud``, ``exp``/``iat``, and ``req`` = SHA-256 of
the raw body) -- so the records-endpoint row pays the real cost of a verifying
peer, on the same machine. ``sub`` is not pinned: the agency id exists only
after this server is already running and registered. Records are generated
from the reference (``ES-000042`` -> survivor 42), so the agency needs no store.

Environment: ``BENCH_BROKER_URL`` (JWKS and issuer) and ``BENCH_RECORDS_URL``
(this endpoint's registered URL, the token's audience).
Serve with ``uvicorn bench.records_app:app``.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import httpx
import orjson
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.data import shelter_record

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "http://127.0.0.1:8000")
AUDIENCE = os.environ.get("BENCH_RECORDS_URL", "")
TYP = "records-request+jwt"
LEEWAY = 5


class _Keys:
    """The broker's JWKS, fetched on first use (the broker starts after this server)."""

    keyset: KeySet | None = None

    @classmethod
    async def get(cls) -> KeySet:
        if cls.keyset is None:
            async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
                resp = await client.get(f"{BROKER_URL}/.well-known/jwks.json")
                resp.raise_for_status()
                cls.keyset = KeySet.import_key_set(resp.json())
        return cls.keyset


def _denied() -> Response:
    return JSONResponse({"error": "invalid_token"}, status_code=401)


async def records(request: Request) -> Response:
    body = await request.body()
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer "):
        return _denied()
    try:
        token = jwt.decode(header[7:], await _Keys.get(), algorithms=["ES256"])
    except (JoseError, ValueError):
        return _denied()
    claims: dict[str, Any] = token.claims
    now = time.time()
    if (
        token.header.get("typ") != TYP
        or claims.get("iss") != BROKER_URL
        or claims.get("aud") != AUDIENCE
        or claims.get("req") != hashlib.sha256(body).hexdigest()
        or not isinstance(claims.get("exp"), int)
        or claims["exp"] < now - LEEWAY
        or claims.get("iat", now + 3600) > now + LEEWAY
    ):
        return _denied()
    try:
        query = orjson.loads(body)
        ref, category = str(query["subject_ref"]), str(query["category"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return JSONResponse({"error": "bad request"}, status_code=400)
    if category != "shelter" or not ref.startswith("ES-") or not ref[3:].isdigit():
        return Response(status_code=404)
    return Response(orjson.dumps(shelter_record(int(ref[3:]))), media_type="application/json")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/records", records, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
)
