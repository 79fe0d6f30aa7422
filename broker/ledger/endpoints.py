"""Auditor API: checkpoints, entries, RFC 9162 proofs, exports, and disclosure receipts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response, StreamingResponse

from broker.auth.dependencies import (
    AuditorCaller,
    ReceiptReader,
    authorize,
    bearer_principal,
    check_standing,
)
from broker.auth.roles import Role
from broker.common.validation import utc_instant
from broker.db import SessionDep, request_session
from broker.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthenticated,
    error_responses,
)
from broker.ledger import service
from broker.ledger.schemas import (
    CheckpointOut,
    ConsistencyProofOut,
    EntryPage,
    InclusionProofOut,
    LedgerKeyOut,
    ReceiptOut,
)
from broker.runtime import RuntimeDep

router = APIRouter(prefix="/v1", tags=["ledger"])
_auditor_errors = error_responses(InvalidRequest, Unauthenticated, Forbidden)
Index = Annotated[int, Query(ge=0, le=2**62)]


@router.get("/ledger/key", summary="The checkpoint verification key (public)")
async def ledger_key(session: SessionDep, rt: RuntimeDep) -> LedgerKeyOut:
    """Public on purpose: auditors pin this key before trusting any checkpoint."""
    return await service.ledger_key(rt, session)


@router.get(
    "/ledger/checkpoint",
    responses=error_responses(Unauthenticated, Forbidden, NotFound),
    summary="The latest signed checkpoint",
)
async def checkpoint(caller: AuditorCaller, session: SessionDep, rt: RuntimeDep) -> CheckpointOut:
    return await service.latest_checkpoint(session, rt)


@router.get("/ledger/entries", responses=_auditor_errors, summary="Integrated entries")
async def entries(
    caller: AuditorCaller,
    session: SessionDep,
    rt: RuntimeDep,
    from_index: Index = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    since: datetime | None = None,
    until: datetime | None = None,
    agency_id: Annotated[str | None, Query(max_length=64)] = None,
    type: Annotated[str | None, Query(max_length=48)] = None,
    subject_id: Annotated[
        str | None, Query(max_length=64, description="matched via its HMAC commitment")
    ] = None,
) -> EntryPage:
    since = None if since is None else utc_instant(since, what="since")
    until = None if until is None else utc_instant(until, what="until")
    return await service.list_entries(
        session,
        rt,
        from_index=from_index,
        limit=limit,
        since=since,
        until=until,
        agency_id=agency_id,
        entry_type=type,
        subject_id=subject_id,
    )


# The proof routes are what auditors call in bulk. Like POST /v1/disclosures they open
# their session and check their caller by plain calls (token and role, then standing),
# and send the model's own JSON: FastAPI's dependency solving and response validation
# were most of their time besides the proof itself.
_AUDITOR = (Role.auditor,)


async def _proof_response(
    request: Request, proof: Callable[[AsyncSession], Awaitable[BaseModel]]
) -> Response:
    caller = authorize(bearer_principal(request), _AUDITOR, "ledger:read")
    async with request_session(request) as session:
        await check_standing(session, caller)
        body = await proof(session)
    return Response(body.model_dump_json(), media_type="application/json")


@router.get(
    "/ledger/proofs/inclusion",
    responses=_auditor_errors,
    response_model=InclusionProofOut,
    summary="RFC 9162 inclusion",
)
async def inclusion_proof(
    request: Request,
    index: Index,
    tree_size: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> Response:
    return await _proof_response(
        request, lambda session: service.inclusion(session, index, tree_size)
    )


@router.get(
    "/ledger/proofs/consistency",
    responses=_auditor_errors,
    response_model=ConsistencyProofOut,
    summary="RFC 9162 consistency",
)
async def consistency_proof(
    request: Request,
    first: Annotated[int, Query(ge=1, le=2**62)],
    second: Annotated[int, Query(ge=1, le=2**62)],
) -> Response:

    async def proof(session: AsyncSession) -> ConsistencyProofOut:
        if first > second:
            raise InvalidRequest("first must not exceed second.")
        return await service.consistency(session, first, second)

    return await _proof_response(request, proof)


@router.get(
    "/ledger/export",
    responses={200: {"content": {"application/jsonl": {}}}, **_auditor_errors},
    response_class=StreamingResponse,
    summary="JSON Lines export for `broker ledger verify`",
)
async def export(
    caller: AuditorCaller,
    rt: RuntimeDep,
    start: Index = 0,
    end: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    checkpoints: Literal["latest", "all"] = "latest",
) -> StreamingResponse:
    """Offline verification needs ``start=0``; the export ends at a signed tree size."""
    if end is not None and end <= start:
        raise InvalidRequest("end must be greater than start.")
    return StreamingResponse(
        service.export_lines(rt, start, end, checkpoints == "all"),
        media_type="application/jsonl",
        headers={"Content-Disposition": 'attachment; filename="ledger.jsonl"'},
    )


@router.get(
    "/disclosures/{disclosure_id}/receipt",
    responses=error_responses(Unauthenticated, Forbidden, NotFound, Conflict),
    summary="Ledger entry, inclusion proof and checkpoint for one decision",
)
async def disclosure_receipt(
    disclosure_id: str,
    caller: ReceiptReader,
    session: SessionDep,
    rt: RuntimeDep,
) -> ReceiptOut:
    return await service.receipt(session, rt, caller, disclosure_id)
