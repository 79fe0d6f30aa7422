"""Routes for subjects (role ``advocate``)."""

from __future__ import annotations

from fastapi import APIRouter, status
from starlette.responses import Response

from broker.auth.dependencies import AdvocateCaller
from broker.consent.schemas import ConsentLifecycle
from broker.db import SessionDep
from broker.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthenticated,
    error_responses,
    problem_response,
)
from broker.models import SubjectReference
from broker.runtime import RuntimeDep
from broker.subjects import service
from broker.subjects.repository import get_readable_subject
from broker.subjects.schemas import (
    ReferenceCreate,
    ReferenceOut,
    SubjectCreate,
    SubjectCreated,
    SubjectOut,
)

router = APIRouter(prefix="/v1", tags=["subjects"])
_ERRORS = error_responses(InvalidRequest, Unauthenticated, Forbidden, NotFound, Conflict)


def reference_out(r: SubjectReference) -> ReferenceOut:
    return ReferenceOut(
        id=r.id, agency_id=r.agency_id, reference=r.reference, created_at=r.created_at
    )


@router.post("/subjects", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def enrol_subject(
    caller: AdvocateCaller, session: SessionDep, rt: RuntimeDep, body: SubjectCreate | None = None
) -> SubjectCreated:
    subject = await service.enrol(session, rt, caller)
    return SubjectCreated(subject_id=subject.id, created_at=subject.created_at)


@router.get("/subjects/{subject_id}", responses=_ERRORS)
async def get_subject(subject_id: str, caller: AdvocateCaller, session: SessionDep) -> SubjectOut:
    subject = await get_readable_subject(session, caller, subject_id)
    refs = await service.references_of(session, subject.id)
    return SubjectOut(
        subject_id=subject.id,
        enrolled_by_agency_id=subject.enrolled_by_agency_id,
        created_at=subject.created_at,
        references=[reference_out(r) for r in refs],
    )


@router.post(
    "/subjects/{subject_id}/references",
    status_code=status.HTTP_201_CREATED,
    responses=_ERRORS,
    response_model=ReferenceOut,
)
async def link_reference(
    subject_id: str,
    body: ReferenceCreate,
    caller: AdvocateCaller,
    session: SessionDep,
    rt: RuntimeDep,
) -> ReferenceOut | Response:
    linked = await service.link_reference(session, rt, caller, subject_id, body)
    if isinstance(linked, Conflict):  # recorded in the ledger, so answered, not raised
        return problem_response(linked.status_code, linked.to_problem())
    return reference_out(linked)


@router.delete("/subjects/{subject_id}", responses=_ERRORS)
async def erase_subject(
    subject_id: str,
    body: ConsentLifecycle,
    caller: AdvocateCaller,
    session: SessionDep,
    rt: RuntimeDep,
) -> dict[str, object]:
    """Erase a survivor: her grants are revoked and her held records made unreadable."""
    revoked = await service.erase(session, rt, caller, subject_id, body)
    return {"subject_id": subject_id, "erased": True, "grants_revoked": revoked}
