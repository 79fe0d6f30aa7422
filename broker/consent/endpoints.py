"""Routes for consent grants (role ``advocate``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Path, status
from starlette.responses import Response

from broker.auth.dependencies import AdvocateCaller
from broker.consent import fhir, service
from broker.consent.schemas import (
    Attestation,
    ConsentCreate,
    ConsentHistory,
    ConsentLifecycle,
    ConsentOut,
    ConsentRevise,
    ConsentVersionOut,
    NoticeList,
    NoticeOut,
)
from broker.db import SessionDep
from broker.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthenticated,
    error_responses,
)
from broker.models import ConsentGrant, ConsentVersion
from broker.runtime import RuntimeDep

router = APIRouter(prefix="/v1/consents", tags=["consents"])
_ERRORS = error_responses(InvalidRequest, Unauthenticated, Forbidden, NotFound, Conflict)


def version_out(
    head: ConsentGrant, v: ConsentVersion, now: datetime | None = None
) -> ConsentVersionOut:
    return ConsentVersionOut(
        id=head.id,
        version=v.version,
        subject_id=head.subject_id,
        status=service.effective_status(v, now or datetime.now(UTC)),
        change=v.change,
        recipient_agency_id=v.recipient_agency_id,
        source_agency_ids=v.source_agency_ids,
        fields=v.fields,
        purposes=v.purposes,
        valid_from=v.valid_from,
        expires_at=v.expires_at,
        max_uses=v.max_uses,
        data_life_days=v.data_life_days,
        excluded_client_ids=v.excluded_client_ids,
        attestation=Attestation.model_validate(v.attestation),
        reason=v.reason,
        actor_client_id=v.actor_client_id,
        created_at=v.created_at,
    )


def consent_out(head: ConsentGrant, v: ConsentVersion, entry: str | None = None) -> ConsentOut:
    base = version_out(head, v).model_dump()
    return ConsentOut(
        **base, latest_version=head.latest_version, uses=head.uses, ledger_entry=entry
    )


@router.post("", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def grant_consent(
    body: ConsentCreate, caller: AdvocateCaller, session: SessionDep, rt: RuntimeDep
) -> ConsentOut:
    return consent_out(*await service.grant(session, rt, caller, body))


@router.get("/{grant_id}", responses=_ERRORS)
async def read_consent(grant_id: str, caller: AdvocateCaller, session: SessionDep) -> ConsentOut:
    return consent_out(*await service.get_grant(session, caller, grant_id))


@router.post("/{grant_id}/versions", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def revise_consent(
    grant_id: str, body: ConsentRevise, caller: AdvocateCaller, session: SessionDep, rt: RuntimeDep
) -> ConsentOut:
    return consent_out(*await service.revise(session, rt, caller, grant_id, body))


@router.get("/{grant_id}/versions", responses=_ERRORS)
async def consent_history(
    grant_id: str, caller: AdvocateCaller, session: SessionDep
) -> ConsentHistory:
    versions = await service.history(session, caller, grant_id)
    head, _ = await service.get_grant(session, caller, grant_id)
    return ConsentHistory(id=grant_id, versions=[version_out(head, v) for v in versions])


@router.get("/{grant_id}/versions/{number}", responses=_ERRORS)
async def consent_version(
    grant_id: str,
    caller: AdvocateCaller,
    session: SessionDep,
    number: int = Path(ge=1, le=1_000_000),
) -> ConsentVersionOut:
    return version_out(*await service.version_of(session, caller, grant_id, number))


async def _lifecycle(
    change: str,
    grant_id: str,
    body: ConsentLifecycle,
    caller: AdvocateCaller,
    session: SessionDep,
    rt: RuntimeDep,
) -> ConsentOut:
    return consent_out(*await service.change_status(session, rt, caller, grant_id, change, body))


@router.post("/{grant_id}/pause", responses=_ERRORS)
async def pause_consent(
    grant_id: str,
    body: ConsentLifecycle,
    caller: AdvocateCaller,
    session: SessionDep,
    rt: RuntimeDep,
) -> ConsentOut:
    return await _lifecycle("paused", grant_id, body, caller, session, rt)


@router.post("/{grant_id}/resume", responses=_ERRORS)
async def resume_consent(
    grant_id: str,
    body: ConsentLifecycle,
    caller: AdvocateCaller,
    session: SessionDep,
    rt: RuntimeDep,
) -> ConsentOut:
    return await _lifecycle("resumed", grant_id, body, caller, session, rt)


@router.post("/{grant_id}/revoke", responses=_ERRORS)
async def revoke_consent(
    grant_id: str,
    body: ConsentLifecycle,
    caller: AdvocateCaller,
    session: SessionDep,
    rt: RuntimeDep,
) -> ConsentOut:
    return await _lifecycle("revoked", grant_id, body, caller, session, rt)


@router.get("/{grant_id}/notices", responses=_ERRORS)
async def revocation_notices(
    grant_id: str, caller: AdvocateCaller, session: SessionDep
) -> NoticeList:
    """Delivery state of the revocation notices sent to agencies that received data."""
    rows = await service.notices(session, caller, grant_id)
    return NoticeList(
        grant_id=grant_id,
        items=[
            NoticeOut(
                id=n.id,
                agency_id=n.agency_id,
                grant_version=n.grant_version,
                event=n.event,
                status=n.status,
                attempts=n.attempts,
                last_status=n.last_status,
                disclosure_ids=n.disclosure_ids,
                next_attempt_at=n.next_attempt_at,
                created_at=n.created_at,
                delivered_at=n.delivered_at,
            )
            for n in rows
        ],
    )


class FhirResponse(Response):
    media_type = "application/fhir+json"


_FHIR_200: dict[str, Any] = {
    "description": "An HL7 FHIR R4 Consent resource",
    "content": {FhirResponse.media_type: {"schema": {"type": "object"}}},
}


@router.get("/{grant_id}/fhir", responses={200: _FHIR_200, **_ERRORS}, response_class=FhirResponse)
async def consent_as_fhir(grant_id: str, caller: AdvocateCaller, session: SessionDep) -> Response:
    """The latest version as an HL7 FHIR R4 Consent resource (application/fhir+json)."""
    head, version = await service.get_grant(session, caller, grant_id)
    status = service.effective_status(version, datetime.now(UTC))
    body = fhir.consent_resource(head, version, status.value)
    return FhirResponse(orjson.dumps(body))
