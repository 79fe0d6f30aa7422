"""One error family, rendered as RFC 9457 ``application/problem+json``.

Every refusal the broker makes is a ``BrokerError`` with a stable ``type`` slug, so
clients branch on the slug, never on the human text. Handlers also cover FastAPI's
own 404/405/422 and anything unexpected, which is logged without request data and
answered with a bare 500 problem: no stack trace or input ever reaches the client.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

PROBLEM_BASE = "urn:consent-broker:problem:"
PROBLEM_MEDIA_TYPE = "application/problem+json"

log = logging.getLogger("broker.errors")


class BrokerError(Exception):
    """Base of every client-visible error."""

    status_code = 400
    slug = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra

    def to_problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status_code,
            "detail": self.detail,
        }
        body.update(self.extra)
        return body


class InvalidRequest(BrokerError):
    status_code = 422
    slug = "invalid-request"
    title = "The request is not valid"


class NotFound(BrokerError):
    status_code = 404
    slug = "not-found"
    title = "Not found"


class Conflict(BrokerError):
    status_code = 409
    slug = "conflict"
    title = "Conflict"


class Unauthenticated(BrokerError):
    status_code = 401
    slug = "unauthenticated"
    title = "Authentication required"


class Forbidden(BrokerError):
    status_code = 403
    slug = "forbidden"
    title = "Forbidden"


class NotPermitted(BrokerError):
    """The uniform disclosure denial: same status, shape and text whatever the reason."""

    status_code = 403
    slug = "not-permitted"
    title = "Not permitted"


class PayloadTooLarge(BrokerError):
    status_code = 413
    slug = "payload-too-large"
    title = "Request body too large"


class RateLimited(BrokerError):
    status_code = 429
    slug = "rate-limited"
    title = "Too many requests"


class UpstreamError(BrokerError):
    status_code = 502
    slug = "source-error"
    title = "The holding agency's records endpoint failed"


class UpstreamTimeout(BrokerError):
    status_code = 504
    slug = "source-timeout"
    title = "The holding agency's records endpoint timed out"


class ServiceUnavailable(BrokerError):
    status_code = 503
    slug = "unavailable"
    title = "Service temporarily unavailable"


class CommitUnconfirmed(ServiceUnavailable):
    """The connection died after COMMIT was sent: the outcome is unknown, not 'nothing'."""

    slug = "commit-unconfirmed"
    title = "Outcome unknown: the commit was not confirmed"


class OAuthError(BrokerError):
    """Token endpoint errors: RFC 6749 §5.2 ``error`` codes inside a problem document."""

    status_code = 400
    slug = "oauth-error"
    title = "Token request refused"

    def __init__(self, error: str, detail: str, status_code: int = 400) -> None:
        super().__init__(detail, error=error, error_description=detail)
        self.status_code = status_code


def problem_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    return Response(
        content=orjson.dumps(body),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def broker_error_response(exc: BrokerError) -> Response:
    """The problem response of a ``BrokerError``, with the headers its kind calls for."""
    headers = (
        {"WWW-Authenticate": 'Bearer error="invalid_token"'} if exc.status_code == 401 else None
    )
    if isinstance(exc, OAuthError):
        headers = {"Cache-Control": "no-store"}
    if "retry_after" in exc.extra:
        headers = {"Retry-After": str(exc.extra["retry_after"])}
    return problem_response(exc.status_code, exc.to_problem(), headers)


def error_responses(*errors: type[BrokerError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the errors a route may raise."""
    out: dict[int | str, dict[str, Any]] = {}
    for err in errors:
        out[err.status_code] = {
            "description": err.title,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    return out


_HTTP_SLUGS = {
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    413: ("payload-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Only location and message: pydantic's ``input`` may hold personal data.
    return [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": e.get("type"),
        }
        for e in exc.errors()[:50]
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BrokerError)
    async def _broker_error(_: Request, exc: BrokerError) -> Response:
        return broker_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        err = InvalidRequest("The request body or parameters failed validation.")
        body = err.to_problem()
        body["errors"] = _validation_errors(exc)
        return problem_response(422, body)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            # FastAPI's "error parsing the body" (e.g. JSON that is not UTF-8): the same
            # documented 422 as any other body that is not valid JSON.
            return problem_response(
                422, InvalidRequest("The request body could not be parsed.").to_problem()
            )
        slug, title = _HTTP_SLUGS.get(exc.status_code, ("http-error", "HTTP error"))
        body = {
            "type": PROBLEM_BASE + slug,
            "title": title,
            "status": exc.status_code,
            "detail": exc.detail if isinstance(exc.detail, str) else title,
        }
        return problem_response(exc.status_code, body, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error: %s", type(exc).__name__)
        body = {
            "type": PROBLEM_BASE + "internal",
            "title": "Internal error",
            "status": 500,
            "detail": "The broker could not complete the request; nothing was disclosed.",
        }
        return problem_response(500, body)


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
    "required": ["type", "title", "status"],
}
