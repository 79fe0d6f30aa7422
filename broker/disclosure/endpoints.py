"""Routes: request a disclosure, deposit a record, the survivor's accounting."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request, status
from starlette.responses import Response

from broker.auth.dependencies import (
    AdvocateCaller,
    AuditorCaller,
    authorize,
    bearer_principal,
    require,
)
from broker.auth.roles import Principal, Role
from broker.common.validation import utc_instant
from broker.db import SessionDep, driver_session, single_statement_writes
from broker.disclosure import accounting, audit, records
from broker.disclosure.denial_timing import answer_on_grid, arrival
from broker.disclosure.holds import require_no_hold
from broker.disclosure.schemas import (
    Accounting,
    DenialReport,
    DisclosureCreate,
    DisclosureOut,
    RecordDeposit,
    RecordStored,
)
from broker.disclosure.service import request_disclosure
from broker.errors import (
    PROBLEM_MEDIA_TYPE,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    NotPermitted,
    ServiceUnavailable,
    Unauthenticated,
    UpstreamError,
    UpstreamTimeout,
    error_responses,
)
from broker.runtime import RuntimeDep

router = APIRouter(prefix="/v1", tags=["disclosures"])
_DISCLOSERS = (Role.agency,)
Depositor = Annotated[Principal, Depends(require(Role.agency, scope="records:deposit"))]


def discloser(request: Request) -> Principal:
    """The caller, if its token is valid and its role may request disclosures."""
    return authorize(bearer_principal(request), _DISCLOSERS, "disclosures:request")


async def _caller(request: Request) -> Principal:
    return discloser(request)  # async: FastAPI would run a plain function in a thread


@router.post(
    "/disclosures",
    responses={
        200: {"model": DisclosureOut},
        **error_responses(
            InvalidRequest,
            Unauthenticated,
            NotPermitted,
            NotFound,
            UpstreamError,
            UpstreamTimeout,
            ServiceUnavailable,
        ),
    },
    response_model=DisclosureOut,
)
@single_statement_writes  # on PostgreSQL the decision is written by one statement
async def disclose(
    body: DisclosureCreate, request: Request, caller: Annotated[Principal, Depends(_caller)]
) -> Response:
    """Well-formed JSON requests are served by ``fast_path`` before FastAPI routes them;
    this route answers the rest. Its caller is a dependency, so FastAPI checks the token
    and role before the body's fields: a caller without the role gets 403, not 422.
    """
    return await serve_disclosure(request, body, caller)


async def serve_disclosure(
    request: Request, body: DisclosureCreate, caller: Principal | None = None
) -> Response:
    """The token and role are checked first (here, for the fast path); the caller's
    standing by the service's first statement (``repository.resolve``); the decision is
    committed before any answer is sent. A denial is sent on the time grid of
    ``denial_timing``, so its timing does not say whether the survivor is known.
    """
    started = arrival()
    caller = caller or discloser(request)
    rt = request.app.state.runtime
    if rt.disclosure_holds is None or rt.disclosure_holds:
        await require_no_hold(rt)
    quantum = rt.settings.denial_quantum_ms / 1000
    try:
        async with driver_session(request) as session:
            outcome = await request_disclosure(session, rt, caller, body)
    except Unauthenticated:
        # A withdrawn client or suspended agency is refused after the statement that
        # also looked the survivor up: on the grid too, so that refusal says nothing.
        await answer_on_grid(started, quantum)
        raise
    if outcome.status == NotPermitted.status_code:
        await answer_on_grid(started, quantum)
    media = "application/json" if outcome.status == 200 else PROBLEM_MEDIA_TYPE
    return Response(orjson.dumps(outcome.body), status_code=outcome.status, media_type=media)


@router.post(
    "/records",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(InvalidRequest, Unauthenticated, Forbidden, NotFound),
)
async def deposit_record(
    body: RecordDeposit, caller: Depositor, session: SessionDep, rt: RuntimeDep
) -> RecordStored:
    """Only for a survivor the agency enrolled or whose grants name it as a source; any
    other reference, known or not, gets the same 404, sent on the denial grid."""
    started = arrival()
    try:
        return await records.deposit(session, rt, caller, body)
    except NotFound:
        await session.rollback()  # nothing was written: the connection goes back first
        await answer_on_grid(started, rt.settings.denial_quantum_ms / 1000)
        raise


@router.get(
    "/subjects/{subject_id}/disclosures",
    responses={
        200: {"content": {"application/json": {}, "text/csv": {}}},
        **error_responses(InvalidRequest, Unauthenticated, Forbidden, NotFound, Conflict),
    },
    response_model=Accounting,
)
async def subject_accounting(
    subject_id: str,
    caller: AdvocateCaller,
    session: SessionDep,
    format: Annotated[Literal["json", "csv"], Query()] = "json",
) -> Response:
    report = await accounting.for_subject(session, caller, subject_id)
    if format == "json":
        return Response(report.model_dump_json(), media_type="application/json")
    return Response(
        _csv(report),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="accounting-{subject_id}.csv"'},
    )


def _csv(report: Accounting) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    columns = (
        list(type(report.items[0]).model_fields)
        if report.items
        else ["disclosure_id", "at", "outcome", "reason"]
    )
    writer.writerow(columns)
    for item in report.items:
        row = item.model_dump()
        writer.writerow(
            [
                ";".join(v) if isinstance(v, list) else ("" if v is None else _safe_cell(v))
                for v in (row[c] for c in columns)
            ]
        )
    return out.getvalue()


def _safe_cell(value: object) -> str:
    """Neutralise spreadsheet formula injection (cells starting with = + - @)."""
    text = str(value)
    return "'" + text if text[:1] in {"=", "+", "-", "@"} else text


@router.get("/audit/denials", responses=error_responses(InvalidRequest, Unauthenticated, Forbidden))
async def denials(
    caller: AuditorCaller,
    session: SessionDep,
    since: datetime | None = None,
    until: datetime | None = None,
    threshold: Annotated[int, Query(ge=1, le=1_000_000)] = 10,
) -> DenialReport:
    """Denials per agency, client and reason: repeated probing shows up here."""
    until = datetime.now(UTC) if until is None else utc_instant(until, what="until")
    try:
        since = until - timedelta(days=1) if since is None else utc_instant(since, what="since")
    except OverflowError:
        raise InvalidRequest("until is too early: give since as well.") from None
    if since >= until:
        raise InvalidRequest("since must be before until.")
    return await audit.denial_report(session, since, until, threshold)
