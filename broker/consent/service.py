"""Granting, revising, pausing, resuming and revoking consent.

Every change writes a new immutable version and a ledger entry in the same
transaction; the grant head only moves its ``latest_version`` pointer.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from broker.auth.roles import Principal
from broker.consent.schemas import (
    AttestationMethod,
    ConsentCreate,
    ConsentLifecycle,
    ConsentRevise,
    ConsentStatus,
    ConsentTerms,
)
from broker.disclosure.notices import queue_revocation_notices
from broker.errors import Conflict, InvalidRequest, NotFound
from broker.ledger.entries import append_entry, iso_now
from broker.models import Agency, Client, ConsentGrant, ConsentVersion, WebhookDelivery
from broker.runtime import Runtime
from broker.subjects.repository import get_readable_subject

WILDCARDS = {"all", "*", "any", "everything"}
GRANTING_METHODS = {
    AttestationMethod.written,
    AttestationMethod.electronic,
    AttestationMethod.verbal_witnessed,
}


def effective_status(version: ConsentVersion, now: datetime) -> ConsentStatus:
    if version.status == "active" and version.expires_at <= now:
        return ConsentStatus.expired
    return ConsentStatus(version.status)


def _unique(values: list[str], what: str) -> list[str]:
    if len(set(values)) != len(values):
        raise InvalidRequest(f"{what} lists the same value twice.")
    return values


def _check_fields(rt: Runtime, fields: dict[str, list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for category, names in fields.items():
        schema = rt.catalog.schemas.get(category)
        if schema is None:
            known = ", ".join(sorted(rt.catalog.schemas))
            raise InvalidRequest(f"Unknown data category '{category}' (known: {known}).")
        if not names:
            raise InvalidRequest(
                f"fields.{category} is empty: name each field to share, or leave the category out."
            )
        for name in names:
            if name.strip().lower() in WILDCARDS or "*" in name:
                raise InvalidRequest(
                    f"fields.{category}: wildcards such as '{name}' are not accepted; "
                    "list each field explicitly."
                )
            if name not in schema.fields:
                raise InvalidRequest(f"fields.{category}: '{name}' is not a field of {category}.")
        out[category] = sorted(_unique(names, f"fields.{category}"))
    return out


def _check_purposes(rt: Runtime, purposes: list[str]) -> list[str]:
    for p in purposes:
        if p not in rt.catalog.policy.purposes:
            known = ", ".join(sorted(rt.catalog.policy.purposes))
            raise InvalidRequest(f"Unknown purpose '{p}' (known: {known}).")
    return sorted(_unique(purposes, "purposes"))


def _check_term(rt: Runtime, terms: ConsentTerms, now: datetime) -> tuple[datetime, datetime]:
    valid_from = terms.valid_from or now
    expires_at = terms.expires_at
    max_term = timedelta(days=rt.settings.max_consent_days)
    if expires_at <= now:
        raise InvalidRequest("expires_at is in the past: every consent must end in the future.")
    if expires_at <= valid_from:
        raise InvalidRequest("expires_at must be after valid_from.")
    if valid_from > now + max_term:
        raise InvalidRequest("valid_from is further ahead than the longest allowed term.")
    if expires_at - max(valid_from, now) > max_term:
        raise InvalidRequest(
            f"The consent would last longer than {rt.settings.max_consent_days} days, "
            "the longest term allowed."
        )
    if terms.attestation.signed_at > now + timedelta(minutes=5):
        raise InvalidRequest("attestation.signed_at is in the future.")
    return valid_from.astimezone(UTC), expires_at.astimezone(UTC)


async def _active_agencies(session: AsyncSession, ids: list[str], what: str) -> None:
    rows = (await session.execute(select(Agency.id, Agency.status).where(Agency.id.in_(ids)))).all()
    found = {r[0]: r[1] for r in rows}
    for agency_id in ids:
        if agency_id not in found:
            raise InvalidRequest(f"{what}: no agency with id '{agency_id}'.")
        if found[agency_id] != "active":
            raise InvalidRequest(f"{what}: agency '{agency_id}' is suspended.")


async def _check_excluded(session: AsyncSession, ids: list[str], recipient: str) -> list[str]:
    _unique(ids, "excluded_client_ids")
    if not ids:
        return []
    rows = (
        await session.execute(select(Client.id, Client.agency_id).where(Client.id.in_(ids)))
    ).all()
    found = {r[0]: r[1] for r in rows}
    for cid in ids:
        if found.get(cid) != recipient:
            raise InvalidRequest(
                f"excluded_client_ids: '{cid}' is not a client of the recipient agency."
            )
    return sorted(ids)


async def _validated_terms(
    session: AsyncSession, rt: Runtime, terms: ConsentTerms, recipient: str, now: datetime
) -> dict[str, Any]:
    if terms.attestation.method not in GRANTING_METHODS:
        raise InvalidRequest("A grant needs a written, electronic or witnessed verbal attestation.")
    valid_from, expires_at = _check_term(rt, terms, now)
    sources = _unique(terms.source_agency_ids, "source_agency_ids")
    if recipient in sources:
        raise InvalidRequest("The recipient agency cannot also be a source of the grant.")
    await _active_agencies(session, [recipient], "recipient_agency_id")
    await _active_agencies(session, sources, "source_agency_ids")
    return {
        "recipient_agency_id": recipient,
        "source_agency_ids": sources,
        "fields": _check_fields(rt, terms.fields),
        "purposes": _check_purposes(rt, terms.purposes),
        "valid_from": valid_from,
        "expires_at": expires_at,
        "max_uses": terms.max_uses,
        "data_life_days": terms.data_life_days,
        "excluded_client_ids": await _check_excluded(session, terms.excluded_client_ids, recipient),
    }


def _attestation(value: ConsentLifecycle | ConsentTerms) -> dict[str, Any]:
    a = value.attestation
    return {
        "method": a.method.value,
        "signed_at": iso_now(a.signed_at),
        "document_sha256": a.document_sha256,
    }


async def _write_version(
    session: AsyncSession,
    rt: Runtime,
    actor: Principal,
    grant: ConsentGrant,
    subject_id: str,
    version: int,
    change: str,
    status: str,
    terms: dict[str, Any],
    source: ConsentLifecycle | ConsentTerms,
    now: datetime,
) -> tuple[ConsentVersion, str]:
    row = ConsentVersion(
        grant_id=grant.id,
        version=version,
        status=status,
        change=change,
        attestation=_attestation(source),
        actor_client_id=actor.client_id,
        actor_agency_id=actor.agency_id,
        reason=source.reason,
        created_at=now,
        **terms,
    )
    session.add(row)
    grant.latest_version = version
    grant.updated_at = now
    entry = await append_entry(
        session,
        hmac_key=rt.keys.subject_hmac,
        entry_type=f"consent.{change}",
        actor=actor,
        agency_id=actor.agency_id,
        subject_id=subject_id,
        now=now,
        fields={
            "grant_id": grant.id,
            "grant_version": version,
            "status": status,
            "recipient_agency_id": terms["recipient_agency_id"],
            "source_agency_ids": terms["source_agency_ids"],
            "fields": terms["fields"],
            "purposes": terms["purposes"],
            "valid_from": iso_now(terms["valid_from"]),
            "expires_at": iso_now(terms["expires_at"]),
            "max_uses": terms["max_uses"],
            "data_life_days": terms["data_life_days"],
            "excluded_client_ids": terms["excluded_client_ids"],
            "attestation": row.attestation,
            # Free text may name people or places: only its digest enters the ledger.
            "reason_sha256": hashlib.sha256(source.reason.encode()).hexdigest(),
            "policy_version": rt.catalog.policy.version,
        },
    )
    await session.flush()
    return row, entry


async def grant(
    session: AsyncSession, rt: Runtime, actor: Principal, data: ConsentCreate
) -> tuple[ConsentGrant, ConsentVersion, str]:
    now = datetime.now(UTC)
    subject = await get_readable_subject(session, actor, data.subject_id)
    terms = await _validated_terms(session, rt, data, data.recipient_agency_id, now)
    head = ConsentGrant(
        subject_id=subject.id,
        managing_agency_id=actor.agency_id,
        recipient_agency_id=data.recipient_agency_id,
        latest_version=1,
        uses=0,
        created_at=now,
        updated_at=now,
    )
    session.add(head)
    await session.flush()
    version, entry = await _write_version(
        session, rt, actor, head, subject.id, 1, "granted", "active", terms, data, now
    )
    return head, version, entry


async def get_grant(
    session: AsyncSession, actor: Principal, grant_id: str, *, lock: bool = False
) -> tuple[ConsentGrant, ConsentVersion]:
    """The grant and its latest version, if managed by the caller's agency (else 404)."""
    stmt = select(ConsentGrant).where(
        ConsentGrant.id == grant_id, ConsentGrant.managing_agency_id == actor.agency_id
    )
    if lock:
        stmt = stmt.with_for_update()
    head = (await session.execute(stmt)).scalar_one_or_none()
    if head is None or head.subject_id is None:
        raise NotFound("No consent grant with this id is managed by your agency.")
    latest = await session.get(ConsentVersion, (head.id, head.latest_version))
    if latest is None:
        raise NotFound("No consent grant with this id is managed by your agency.")
    return head, latest


def _terms_of(version: ConsentVersion) -> dict[str, Any]:
    return {
        "recipient_agency_id": version.recipient_agency_id,
        "source_agency_ids": list(version.source_agency_ids),
        "fields": {k: list(v) for k, v in version.fields.items()},
        "purposes": list(version.purposes),
        "valid_from": version.valid_from,
        "expires_at": version.expires_at,
        "max_uses": version.max_uses,
        "data_life_days": version.data_life_days,
        "excluded_client_ids": list(version.excluded_client_ids),
    }


async def revise(
    session: AsyncSession, rt: Runtime, actor: Principal, grant_id: str, data: ConsentRevise
) -> tuple[ConsentGrant, ConsentVersion, str]:
    now = datetime.now(UTC)
    head, latest = await get_grant(session, actor, grant_id, lock=True)
    if latest.status == "revoked":
        raise Conflict("This grant is revoked; record a new grant instead.")
    terms = await _validated_terms(session, rt, data, head.recipient_agency_id, now)
    status = "paused" if latest.status == "paused" else "active"
    assert head.subject_id is not None
    version, entry = await _write_version(
        session,
        rt,
        actor,
        head,
        head.subject_id,
        latest.version + 1,
        "revised",
        status,
        terms,
        data,
        now,
    )
    return head, version, entry


_TRANSITIONS = {
    "paused": ({"active"}, "paused"),
    "resumed": ({"paused"}, "active"),
    "revoked": ({"active", "paused"}, "revoked"),
}


async def change_status(
    session: AsyncSession,
    rt: Runtime,
    actor: Principal,
    grant_id: str,
    change: str,
    data: ConsentLifecycle,
) -> tuple[ConsentGrant, ConsentVersion, str]:
    head, latest = await get_grant(session, actor, grant_id, lock=True)
    return await _change_locked(session, rt, actor, head, latest, change, data)


async def _change_locked(
    session: AsyncSession,
    rt: Runtime,
    actor: Principal,
    head: ConsentGrant,
    latest: ConsentVersion,
    change: str,
    data: ConsentLifecycle,
) -> tuple[ConsentGrant, ConsentVersion, str]:
    now = datetime.now(UTC)
    allowed_from, new_status = _TRANSITIONS[change]
    if latest.status == "revoked":
        raise Conflict("This grant is revoked; it cannot change any more.")
    if latest.status not in allowed_from:
        raise Conflict(f"A grant that is {latest.status} cannot be {change}.")
    if change == "resumed":
        if data.attestation.method not in GRANTING_METHODS:
            raise InvalidRequest("Resuming needs a written, electronic or witnessed attestation.")
        if latest.expires_at <= now:
            raise Conflict("This grant has expired; revise it with a new term instead.")
    assert head.subject_id is not None
    version, entry = await _write_version(
        session,
        rt,
        actor,
        head,
        head.subject_id,
        latest.version + 1,
        change,
        new_status,
        _terms_of(latest),
        data,
        now,
    )
    if change == "revoked":
        await queue_revocation_notices(session, rt, head, version)
    return head, version, entry


async def history(session: AsyncSession, actor: Principal, grant_id: str) -> list[ConsentVersion]:
    head, _ = await get_grant(session, actor, grant_id)
    stmt = (
        select(ConsentVersion)
        .where(ConsentVersion.grant_id == head.id)
        .order_by(ConsentVersion.version)
    )
    return list((await session.execute(stmt)).scalars())


async def version_of(
    session: AsyncSession, actor: Principal, grant_id: str, number: int
) -> tuple[ConsentGrant, ConsentVersion]:
    head, _ = await get_grant(session, actor, grant_id)
    version = await session.get(ConsentVersion, (head.id, number))
    if version is None:
        raise NotFound(f"Grant {grant_id} has no version {number}.")
    return head, version


async def notices(session: AsyncSession, actor: Principal, grant_id: str) -> list[WebhookDelivery]:
    head, _ = await get_grant(session, actor, grant_id)
    stmt = select(WebhookDelivery).where(WebhookDelivery.grant_id == head.id)
    return list((await session.execute(stmt.order_by(WebhookDelivery.created_at))).scalars())


async def revoke_all_for_subject(
    session: AsyncSession, rt: Runtime, actor: Principal, subject_id: str, data: ConsentLifecycle
) -> int:
    """Revoke every grant still open for a survivor (used by erasure)."""
    heads = (
        (
            await session.execute(
                select(ConsentGrant).where(ConsentGrant.subject_id == subject_id).with_for_update()
            )
        )
        .scalars()
        .all()
    )
    revoked = 0
    for head in heads:
        latest = await session.get(ConsentVersion, (head.id, head.latest_version))
        if latest is None or latest.status == "revoked":
            continue
        await _change_locked(session, rt, actor, head, latest, "revoked", data)
        revoked += 1
    return revoked
