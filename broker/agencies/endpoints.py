"""Routes for agencies and clients (role ``admin``)."""

from __future__ import annotations

from fastapi import APIRouter, status

from broker.agencies import service
from broker.agencies.schemas import (
    AgencyCreate,
    AgencyList,
    AgencyOut,
    AgencyPatch,
    ClientCreate,
    ClientOut,
)
from broker.auth.dependencies import AdminCaller
from broker.db import SessionDep
from broker.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthenticated,
    error_responses,
)
from broker.models import Agency, Client
from broker.runtime import RuntimeDep

router = APIRouter(prefix="/v1", tags=["agencies"])
_ERRORS = error_responses(InvalidRequest, Unauthenticated, Forbidden, NotFound, Conflict)


def agency_out(a: Agency) -> AgencyOut:
    return AgencyOut(
        id=a.id,
        name=a.name,
        kind=a.kind,
        status=a.status,
        encryption_jwks=a.encryption_jwks,
        records_endpoint=a.records_endpoint,
        webhook_url=a.webhook_url,
        created_at=a.created_at,
        updated_at=a.updated_at,
    )


def client_out(c: Client) -> ClientOut:
    return ClientOut(
        client_id=c.id,
        agency_id=c.agency_id,
        role=c.role,
        name=c.name,
        status=c.status,
        created_at=c.created_at,
        withdrawn_at=c.withdrawn_at,
    )


@router.post("/agencies", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def register_agency(
    body: AgencyCreate, caller: AdminCaller, session: SessionDep, rt: RuntimeDep
) -> AgencyOut:
    return agency_out(await service.register_agency(session, rt, caller, body))


@router.get("/agencies", responses=_ERRORS)
async def list_agencies(caller: AdminCaller, session: SessionDep) -> AgencyList:
    return AgencyList(items=[agency_out(a) for a in await service.list_agencies(session)])


@router.get("/agencies/{agency_id}", responses=_ERRORS)
async def get_agency(agency_id: str, caller: AdminCaller, session: SessionDep) -> AgencyOut:
    return agency_out(await service.get_agency(session, agency_id))


@router.patch("/agencies/{agency_id}", responses=_ERRORS)
async def patch_agency(
    agency_id: str, body: AgencyPatch, caller: AdminCaller, session: SessionDep, rt: RuntimeDep
) -> AgencyOut:
    return agency_out(await service.update_agency(session, rt, caller, agency_id, body))


@router.post("/clients", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def issue_client(
    body: ClientCreate, caller: AdminCaller, session: SessionDep, rt: RuntimeDep
) -> ClientOut:
    return client_out(await service.issue_client(session, rt, caller, body))


@router.delete("/clients/{client_id}", responses=_ERRORS)
async def withdraw_client(
    client_id: str, caller: AdminCaller, session: SessionDep, rt: RuntimeDep
) -> ClientOut:
    return client_out(await service.withdraw_client(session, rt, caller, client_id))
