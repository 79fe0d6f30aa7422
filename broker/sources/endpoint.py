"""Fetch a survivor's record at request time from the holding agency's records endpoint.

The broker keeps no copy of records held by agencies that run an endpoint: it asks for the
record only when a consented disclosure needs it, then minimises and encrypts it. Everything the
endpoint sends is untrusted, so the exchange is bounded in time, size and shape, and failures
carry only a short reason code -- never a record value or the survivor's reference.

Records-endpoint protocol (what a holding agency implements)
------------------------------------------------------------
Request -- ``POST <records_endpoint>`` (exactly the URL the agency registered)::

    Authorization: Bearer <JWT>
    Accept: application/json
    Accept-Encoding: identity
    Content-Type: application/json

    {"subject_ref": "<the holding agency's own case reference>", "category": "shelter"}

The reference travels in the body, never the URL, so it does not land in access logs.

The JWT is a compact JWS signed ES256 with the broker's token key; its header carries ``kid``
and ``typ: "records-request+jwt"``. Claims:

=============  ==================================================================
``iss``        the broker's issuer URL
``aud``        the records endpoint URL, exactly as registered
``sub``        the holding agency's id at the broker
``iat``        issue time (seconds); ``exp`` = ``iat`` + 60
``jti``        a UUID4, unique per request
``category``   the requested category (same as in the body)
``req``        SHA-256 (lowercase hex) of the exact request body bytes
=============  ==================================================================

The agency verifies the signature against the broker's ``/.well-known/jwks.json`` (select by
``kid``, accept only ES256; the token key rotates, so fetch the JWKS again, at most every
few seconds, when a ``kid`` is not in the copy held), then checks ``typ``, ``iss``, ``aud``
(its own URL), ``sub`` (its own id), ``exp``/``iat`` (allowing a little clock skew), that
``req`` matches the SHA-256 of the raw body *before* parsing it -- so a token cannot be
replayed with another body -- and ideally that ``jti`` was not seen within the token's
lifetime. It answers:

* ``200`` with ``Content-Type: application/json`` (parameters such as ``charset`` are fine) and
  a JSON object holding the record's fields. Fields the category schema does not know are
  dropped and counted (send only what the schema lists); known fields must match the schema.
* ``404`` when it has no record of that category for that reference.
* Anything else is a failure. Redirects are never followed (only the registered URL is ever
  contacted), compressed bodies are refused, and bodies over the broker's ``records_max_bytes``
  are cut off. JSON must be strict (no NaN/Infinity); with a duplicate key the last one wins,
  so agencies must not send duplicates.

Failure reasons (``SourceFailure.reason``, also written to the ledger): ``source_timeout``
(504: a connect/read/pool timeout, or the whole exchange passed its wall-clock deadline, which
stops a server trickling bytes), ``source_unreachable``, ``source_status``, ``source_redirect``,
``source_content_type``, ``source_too_large``, ``source_malformed`` and
``source_invalid_record`` (all 502).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

import httpx
import orjson
from joserfc.jwk import ECKey

from broker.catalog import CategorySchema, RecordInvalid
from broker.crypto.payload import sign_claims
from broker.crypto.randomness import random_id
from broker.errors import BrokerError, UpstreamError, UpstreamTimeout
from broker.sources.connections import AgencyClient

__all__ = [
    "REASONS",
    "REQUEST_TOKEN_LIFETIME",
    "REQUEST_TOKEN_TYP",
    "FetchResult",
    "SourceFailure",
    "fetch_record",
]

REQUEST_TOKEN_TYP: Final = "records-request+jwt"  # noqa: S105 - a JWT type, not a secret
REQUEST_TOKEN_LIFETIME: Final = 60
"""Seconds: long enough for clock skew, short enough that a leaked token is soon useless."""

# What the endpoint did, completing "The holding agency's records endpoint ...".
_WHAT: Final[dict[str, str]] = {
    "source_timeout": "did not answer in time",
    "source_unreachable": "could not be reached",
    "source_status": "answered with an unexpected HTTP status",
    "source_redirect": "answered with a redirect, which the broker never follows",
    "source_content_type": "answered with a content type other than application/json",
    "source_too_large": "answered with a body larger than the broker accepts",
    "source_malformed": "answered with a body that is not a JSON object",
    "source_invalid_record": "answered with a record that does not fit the category's schema",
}
REASONS: Final = frozenset(_WHAT)

_DRAIN_LIMIT = 8 * 1024
"""A 404 body up to this size is read so the keep-alive connection can be reused."""

log = logging.getLogger("broker.sources.endpoint")


@dataclass(frozen=True, slots=True)
class FetchResult:
    """A record as cleaned by the category schema, or ``None`` when the holder has none."""

    record: dict[str, Any] | None
    dropped_fields: int
    status: int


class SourceFailure(Exception):
    """The records endpoint could not supply a usable answer.

    ``reason`` is a short code for the ledger, ``http_status`` the broker's answer (502/504).
    The message holds only the reason, an HTTP status or exception class name, and field names
    from our own schema (``fields``): never a record value, the reference or the URL.
    """

    reason: str
    http_status: int

    def __init__(
        self,
        reason: str,
        note: str | None = None,
        *,
        upstream_status: int | None = None,
        fields: frozenset[str] = frozenset(),
    ) -> None:
        if reason not in _WHAT:
            raise ValueError(f"unknown source failure reason {reason!r}")
        self.reason = reason
        self.http_status = 504 if reason == "source_timeout" else 502
        self.upstream_status = upstream_status
        self.fields = fields
        super().__init__(f"{reason}: {note or _WHAT[reason]}")

    def to_broker_error(self) -> BrokerError:
        """The client-facing problem: reason code (and upstream status), nothing from the body."""
        what = _WHAT[self.reason]
        if self.reason == "source_status" and self.upstream_status is not None:
            what = f"answered HTTP {self.upstream_status}"
        detail = f"The holding agency's records endpoint {what} ({self.reason})."
        if self.reason == "source_timeout":
            return UpstreamTimeout(detail)
        return UpstreamError(detail)


async def fetch_record(
    http: AgencyClient,
    *,
    url: str,
    signing_key: ECKey,
    issuer: str,
    holder_agency_id: str,
    subject_ref: str,
    category: str,
    schema: CategorySchema,
    max_bytes: int,
    timeout: httpx.Timeout | None = None,  # noqa: ASYNC109 - per-phase, besides the deadline
    total_deadline: float = 10.0,
) -> FetchResult:
    """POST a signed request to ``url`` and return the cleaned record (``None`` on 404).

    ``timeout`` overrides the client's per-phase timeouts; ``total_deadline`` caps the whole
    exchange, which per-phase timeouts alone cannot do against a server sending bytes slowly.
    Raises ``SourceFailure``.
    """
    if schema.name != category:
        raise ValueError("schema does not belong to the requested category")
    body = orjson.dumps({"subject_ref": subject_ref, "category": category})
    token = _request_token(signing_key, issuer, url, holder_agency_id, category, body)
    headers = {
        "Authorization": "Bearer " + token,
        "Accept": "application/json",
        "Accept-Encoding": "identity",
        "Content-Type": "application/json",
    }
    # Failures are raised outside the ``except`` blocks so they carry no ``__context__``:
    # upstream exceptions (e.g. a JSONDecodeError's ``doc``) may hold the record itself.
    failure: SourceFailure
    try:
        async with asyncio.timeout(total_deadline):
            return await _exchange(http, url, body, headers, schema, max_bytes, timeout)
    except SourceFailure as exc:
        failure = exc
    except TimeoutError:
        failure = SourceFailure("source_timeout", "total deadline passed")
    except httpx.TimeoutException as exc:
        failure = SourceFailure("source_timeout", type(exc).__name__)
    except (httpx.TransportError, httpx.InvalidURL) as exc:
        failure = SourceFailure("source_unreachable", type(exc).__name__)
    log.warning(
        "records endpoint failed: holder=%s category=%s reason=%s status=%s",
        holder_agency_id,
        category,
        failure.reason,
        failure.upstream_status,
    )
    raise failure


def _request_token(
    key: ECKey, issuer: str, url: str, holder: str, category: str, body: bytes
) -> str:
    """The bearer JWT; ``req`` binds it to these exact body bytes."""
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": url,
        "sub": holder,
        "iat": now,
        "exp": now + REQUEST_TOKEN_LIFETIME,
        "jti": random_id(),
        "category": category,
        "req": hashlib.sha256(body).hexdigest(),
    }
    return sign_claims(claims, key, typ=REQUEST_TOKEN_TYP)


async def _exchange(
    http: AgencyClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    schema: CategorySchema,
    max_bytes: int,
    phase_timeout: httpx.Timeout | None,
) -> FetchResult:
    async with http.post(url, body, headers, timeout=phase_timeout) as response:
        status = response.status_code
        if status == 404:
            await _drain_small(response)
            return FetchResult(record=None, dropped_fields=0, status=404)
        if 300 <= status < 400:
            raise SourceFailure("source_redirect", f"HTTP {status}", upstream_status=status)
        if status != 200:
            raise SourceFailure("source_status", f"HTTP {status}", upstream_status=status)
        if not _is_json(response.headers.get("content-type")):
            raise SourceFailure("source_content_type", upstream_status=status)
        encoding = response.headers.get("content-encoding")
        if encoding is not None and encoding.strip().lower() != "identity":
            # We asked for identity; decoding would let a small body inflate past the cap.
            raise SourceFailure("source_malformed", "compressed body", upstream_status=status)
        data = await _read_capped(response, max_bytes)

    value = _loads(data)
    if not isinstance(value, dict):
        raise SourceFailure("source_malformed", upstream_status=status)
    problems: frozenset[str]
    try:
        record, dropped = schema.clean_record(value)
    except RecordInvalid as exc:
        problems = exc.fields  # names from our own schema, never values
    else:
        return FetchResult(record=record, dropped_fields=dropped, status=status)
    note = "invalid fields: " + ", ".join(sorted(problems)) if problems else None
    raise SourceFailure("source_invalid_record", note, upstream_status=status, fields=problems)


def _is_json(content_type: str | None) -> bool:
    return (
        content_type is not None
        and content_type.partition(";")[0].strip().lower() == "application/json"
    )


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    """Read the body, refusing it as soon as it is known to exceed ``max_bytes``."""
    declared = response.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise SourceFailure("source_malformed", "bad Content-Length")
        if int(declared) > max_bytes:
            raise SourceFailure("source_too_large", "Content-Length over the limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > max_bytes:
            raise SourceFailure("source_too_large", "body over the limit")
        chunks.append(chunk)
    # One chunk is the common case for small records: no copy.
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _drain_small(response: httpx.Response) -> None:
    """Read a short 404 body so the connection goes back to the pool instead of closing."""
    declared = response.headers.get("content-length")
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and int(declared) <= _DRAIN_LIMIT
    ):
        async for _ in response.aiter_raw():
            pass


def _loads(data: bytes) -> object:
    """Parse strict JSON; ``None`` for anything unparsable (callers then want a dict)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
