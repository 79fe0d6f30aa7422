"""Typed auth dependencies: ``AgencyCaller``, ``AdvocateCaller`` … for route signatures."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from broker.auth.roles import Principal, Role
from broker.auth.standing import STANDING, require_standing
from broker.db import SessionDep
from broker.errors import Forbidden, Unauthenticated
from broker.hot_sql import HotStatement

_STANDING = HotStatement(STANDING)


def bearer_principal(request: Request) -> Principal:
    """The caller named by a valid bearer access token; standing not yet checked."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or len(token) > 4096:
        raise Unauthenticated("A bearer access token is required.")
    rt = request.app.state.runtime
    principal: Principal = rt.token_verifier.verify(token.strip())
    rt.limiter.hit(principal.client_id)
    return principal


async def check_standing(session: AsyncSession, principal: Principal) -> Principal:
    """Refuse a principal whose client was withdrawn or whose agency is suspended."""
    params = {"client_id": principal.client_id, "agency_id": principal.agency_id}
    rows = await _STANDING.rows(session, params)
    require_standing(rows[0] if rows else None)
    return principal


async def authenticate(request: Request, session: AsyncSession) -> Principal:
    """The caller of a bearer access token whose client and agency are still active."""
    return await check_standing(session, bearer_principal(request))


def authorize(principal: Principal, roles: tuple[Role, ...], scope: str) -> Principal:
    if principal.role not in roles or scope not in principal.scopes:
        raise Forbidden(f"This route needs the {'/'.join(r.value for r in roles)} role.")
    return principal


async def current_principal(request: Request, session: SessionDep) -> Principal:
    return await authenticate(request, session)


def require(*roles: Role, scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting only the given roles holding ``scope``."""

    async def dependency(
        principal: Annotated[Principal, Depends(current_principal)],
    ) -> Principal:
        return authorize(principal, roles, scope)

    return dependency


AdminCaller = Annotated[Principal, Depends(require(Role.admin, scope="agencies:manage"))]
AdvocateCaller = Annotated[Principal, Depends(require(Role.advocate, scope="consents:manage"))]
AgencyCaller = Annotated[Principal, Depends(require(Role.agency, scope="disclosures:request"))]
AuditorCaller = Annotated[Principal, Depends(require(Role.auditor, scope="ledger:read"))]
ReceiptReader = Annotated[
    Principal, Depends(require(Role.agency, Role.auditor, scope="receipts:read"))
]
