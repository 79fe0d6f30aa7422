"""Registering, changing and suspending agencies; issuing and withdrawing clients."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from broker.agencies.schemas import AgencyCreate, AgencyPatch, ClientCreate
from broker.auth.roles import Principal, Role
from broker.common.validation import check_endpoint_url, printable
from broker.crypto.jwks import JWKSInvalid, validate_public_jwks
from broker.errors import InvalidRequest, NotFound
from broker.ledger.entries import append_entry
from broker.models import Agency, Client
from broker.runtime import Runtime


def _jwks(value: dict[str, Any], use: str, what: str) -> dict[str, Any]:
    try:
        return validate_public_jwks(value, use)  # type: ignore[arg-type]
    except JWKSInvalid as exc:
        raise InvalidRequest(f"{what}: {exc}") from None


async def get_agency(session: AsyncSession, agency_id: str) -> Agency:
    agency = await session.get(Agency, agency_id)
    if agency is None:
        raise NotFound("No agency with this id.")
    return agency


async def register_agency(
    session: AsyncSession, rt: Runtime, actor: Principal, data: AgencyCreate
) -> Agency:
    allow_http = rt.settings.unsafe_allow_plain_http_endpoints
    agency = Agency(
        name=printable(data.name, what="name", max_len=200),
        kind=data.kind.value,
        status="active",
        encryption_jwks=_jwks(data.encryption_jwks, "enc", "encryption_jwks"),
        records_endpoint=check_endpoint_url(
            data.records_endpoint, what="records_endpoint", allow_plain_http=allow_http
        ),
        webhook_url=check_endpoint_url(
            data.webhook_url, what="webhook_url", allow_plain_http=allow_http
        ),
    )
    await _register(session, rt, actor, agency)
    return agency


async def _register(
    session: AsyncSession, rt: Runtime, actor: Principal | None, agency: Agency
) -> None:
    """Store a new agency and its ``agency.registered`` entry, in the caller's transaction."""
    session.add(agency)
    await session.flush()
    await append_entry(
        session,
        hmac_key=rt.keys.subject_hmac,
        entry_type="agency.registered",
        actor=actor,
        agency_id=agency.id,
        fields={"kind": agency.kind, "key_ids": [k["kid"] for k in agency.encryption_jwks["keys"]]},
    )


async def update_agency(
    session: AsyncSession, rt: Runtime, actor: Principal, agency_id: str, patch: AgencyPatch
) -> Agency:
    agency = await get_agency(session, agency_id)
    changes = patch.model_dump(exclude_unset=True)
    allow_http = rt.settings.unsafe_allow_plain_http_endpoints
    if "name" in changes and patch.name is not None:
        agency.name = printable(patch.name, what="name", max_len=200)
    if "status" in changes and patch.status is not None:
        agency.status = patch.status
    if "encryption_jwks" in changes:
        if patch.encryption_jwks is None:
            raise InvalidRequest("encryption_jwks cannot be removed, only replaced.")
        agency.encryption_jwks = _jwks(patch.encryption_jwks, "enc", "encryption_jwks")
    if "records_endpoint" in changes:
        agency.records_endpoint = check_endpoint_url(
            patch.records_endpoint, what="records_endpoint", allow_plain_http=allow_http
        )
    if "webhook_url" in changes:
        agency.webhook_url = check_endpoint_url(
            patch.webhook_url, what="webhook_url", allow_plain_http=allow_http
        )
    if not changes:
        raise InvalidRequest("The patch changes nothing.")
    agency.updated_at = datetime.now(UTC)
    await append_entry(
        session,
        hmac_key=rt.keys.subject_hmac,
        entry_type="agency.updated",
        actor=actor,
        agency_id=agency.id,
        fields={"changed": sorted(changes), "status": agency.status},
    )
    return agency


async def issue_client(
    session: AsyncSession, rt: Runtime, actor: Principal | None, data: ClientCreate
) -> Client:
    agency = await get_agency(session, data.agency_id)
    if agency.status != "active":
        raise InvalidRequest("Credentials cannot be issued to a suspended agency.")
    client = Client(
        agency_id=agency.id,
        role=data.role.value,
        name=printable(data.name, what="name", max_len=200),
        jwks=_jwks(data.jwks, "sig", "jwks"),
        status="active",
    )
    session.add(client)
    await session.flush()
    await append_entry(
        session,
        hmac_key=rt.keys.subject_hmac,
        entry_type="client.issued",
        actor=actor,
        agency_id=agency.id,
        fields={"client_id": client.id, "role": client.role},
    )
    return client


async def issue_operator_client(
    session: AsyncSession,
    rt: Runtime,
    *,
    role: Role,
    name: str,
    jwks: dict[str, Any],
    agency_id: str | None = None,
    agency_name: str = "Broker operations",
) -> Client:
    """A credential issued from the shell, where no API caller exists yet.

    Without ``agency_id`` it goes to a new oversight agency, ``agency_name``, that
    holds the broker's own operators (the first admin; demo and bench callers). Its
    ``agency.registered`` entry has no actor: the shell is not an API principal.
    """
    if agency_id is None:
        ops = Agency(
            name=printable(agency_name, what="name", max_len=200),
            kind="oversight",
            status="active",
            encryption_jwks={"keys": []},
        )
        await _register(session, rt, None, ops)
        agency_id = ops.id
    data = ClientCreate(agency_id=agency_id, role=role, name=name, jwks=jwks)
    return await issue_client(session, rt, None, data)


async def withdraw_client(
    session: AsyncSession, rt: Runtime, actor: Principal, client_id: str
) -> Client:
    client = await session.get(Client, client_id)
    if client is None:
        raise NotFound("No client with this id.")
    if client.status != "withdrawn":
        client.status = "withdrawn"
        client.withdrawn_at = datetime.now(UTC)
        await append_entry(
            session,
            hmac_key=rt.keys.subject_hmac,
            entry_type="client.withdrawn",
            actor=actor,
            agency_id=client.agency_id,
            fields={"client_id": client.id},
        )
    return client


async def list_agencies(session: AsyncSession) -> list[Agency]:
    return list((await session.execute(select(Agency).order_by(Agency.created_at))).scalars())
