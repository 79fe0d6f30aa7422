"""Token endpoint and discovery documents."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Form, Request
from starlette.responses import Response

from broker.auth.assertions import ASSERTION_TYPE, SIGNING_ALGORITHMS, authenticate_client
from broker.auth.roles import ALL_SCOPES, ROLE_SCOPES, Role
from broker.auth.tokens import issue_access_token
from broker.db import SessionDep
from broker.errors import (
    InvalidRequest,
    OAuthError,
    RateLimited,
    Unauthenticated,
    error_responses,
)

router = APIRouter(tags=["auth"])


@router.post(
    "/oauth/token",
    summary="OAuth 2.0 client credentials with a private_key_jwt client assertion",
    responses=error_responses(OAuthError, Unauthenticated, InvalidRequest, RateLimited),
)
async def token(
    request: Request,
    session: SessionDep,
    grant_type: Annotated[str, Form(max_length=64)],
    client_assertion_type: Annotated[str | None, Form(max_length=128)] = None,
    client_assertion: Annotated[str | None, Form(max_length=8192)] = None,
    scope: Annotated[str | None, Form(max_length=512)] = None,
    client_id: Annotated[str | None, Form(max_length=64)] = None,
) -> Response:
    if grant_type != "client_credentials":
        raise OAuthError(
            "unsupported_grant_type", "Only grant_type=client_credentials is supported."
        )
    if client_assertion_type != ASSERTION_TYPE or not client_assertion:
        raise OAuthError(
            "invalid_client",
            "Authenticate with a private_key_jwt client assertion (RFC 7523).",
            status_code=401,
        )
    rt = request.app.state.runtime
    rt.limiter.hit(f"token-endpoint:{request.client.host if request.client else 'unknown'}")
    client, agency = await authenticate_client(
        session,
        client_assertion,
        token_endpoint=rt.settings.token_endpoint,
        max_lifetime=rt.settings.assertion_max_lifetime_seconds,
        skew=rt.settings.clock_skew_seconds,
    )
    if client_id is not None and client_id != client.id:
        raise OAuthError("invalid_client", "client_id does not match the assertion.", 401)
    role = Role(client.role)
    granted = ROLE_SCOPES[role]
    if scope:
        wanted = tuple(scope.split())
        if not set(wanted) <= set(granted):
            raise OAuthError("invalid_scope", "A requested scope is not available to this client.")
        granted = wanted
    access_token, lifetime = issue_access_token(
        key=rt.keys.token_signing,
        issuer=rt.settings.issuer,
        client_id=client.id,
        agency_id=agency.id,
        role=role,
        scopes=granted,
        lifetime=rt.settings.token_lifetime_seconds,
    )
    body = {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": lifetime,
        "scope": " ".join(granted),
    }
    return Response(
        orjson.dumps(body),
        media_type="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


@router.get("/.well-known/oauth-authorization-server", summary="RFC 8414 metadata")
async def metadata(request: Request) -> dict[str, Any]:
    s = request.app.state.runtime.settings
    return {
        "issuer": s.issuer,
        "token_endpoint": s.token_endpoint,
        "jwks_uri": f"{s.public_url}/.well-known/jwks.json",
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(SIGNING_ALGORITHMS),
        "scopes_supported": list(ALL_SCOPES),
        "response_types_supported": ["token"],
    }


@router.get("/.well-known/jwks.json", summary="The broker's public signing keys")
async def jwks(request: Request) -> dict[str, Any]:
    keys: dict[str, Any] = request.app.state.runtime.keys.public_jwks()
    return keys
