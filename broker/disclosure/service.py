"""One disclosure request, from decision to sealed payload, with its ledger entry.

The service never raises for an outcome that must be recorded (denial, missing
record, failed fetch): it returns an ``Outcome`` so the request transaction
commits the ledger entry, and only then is the answer sent.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.auth.roles import Principal
from broker.crypto.commitment import reference_commitment
from broker.crypto.datakeys import DataKeyUnavailable, RecordUnreadable
from broker.crypto.payload import seal_payload
from broker.crypto.randomness import random_id
from broker.disclosure import repository
from broker.disclosure.decision import Denied, DisclosureRequest, GrantView, Permit, decide
from broker.disclosure.schemas import DisclosureCreate
from broker.errors import (
    PROBLEM_BASE,
    BrokerError,
    InvalidRequest,
    NotPermitted,
    ServiceUnavailable,
)
from broker.hot_sql import DbSession
from broker.ledger.entries import pending_row
from broker.runtime import Runtime
from broker.sources.endpoint import SourceFailure, fetch_record
from broker.sources.held import open_record

NO_REDISCLOSURE = (
    "Disclosed with the survivor's consent for the stated purpose only. Further disclosure "
    "is prohibited without her consent. Delete when data_life_days has passed or when "
    "the broker notifies revocation."
)
DENIAL_DETAIL = "No consent in force permits this disclosure."

log = logging.getLogger("broker.disclosure")


@dataclass
class Outcome:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _requested_fields(rt: Runtime, data: DisclosureCreate) -> frozenset[str] | None:
    """Checks that depend only on the request, so they cannot reveal a survivor."""
    schema = rt.catalog.schemas.get(data.category)
    if schema is None:
        raise InvalidRequest(f"Unknown data category '{data.category}'.")
    if data.purpose not in rt.catalog.policy.purposes:
        raise InvalidRequest(f"Unknown purpose '{data.purpose}'.")
    fields: frozenset[str] | None = None
    if data.fields is not None:
        if not data.fields:
            raise InvalidRequest("fields is empty; omit it to ask for everything you may receive.")
        unknown = sorted(set(data.fields) - schema.fields)
        if unknown:
            raise InvalidRequest(f"Not fields of {data.category}: {', '.join(unknown[:10])}.")
        if len(set(data.fields)) != len(data.fields):
            raise InvalidRequest("fields lists the same field twice.")
        fields = frozenset(data.fields)
    return fields


async def request_disclosure(
    session: DbSession, rt: Runtime, caller: Principal, data: DisclosureCreate
) -> Outcome:
    """Decide, fetch, seal and record one request of an authorised ``caller``.

    The caller's standing (client and agency still active) is checked by the first
    statement, the one that resolves the survivor; nothing is recorded before it.
    """
    fields = _requested_fields(rt, data)
    req = DisclosureRequest(caller.agency_id, caller.client_id, data.category, data.purpose, fields)
    disclosure_id = random_id()
    now = datetime.now(UTC)
    # The caller's standing, the survivor, her grants and the parties: one statement.
    resolved = await repository.resolve(session, caller, data.subject_ref, data.category)
    ctx = _Context(session, rt, caller, data, req, disclosure_id, now, resolved.subject_id)
    try:
        permit = decide(req, resolved.grants, rt.catalog.policy, now)
    except Denied as denial:
        return await ctx.denied(denial.reason, denial.grant)
    return await ctx.disclose(permit, resolved)


@dataclass
class _Context:
    session: DbSession
    rt: Runtime
    caller: Principal
    data: DisclosureCreate
    req: DisclosureRequest
    disclosure_id: str
    now: datetime
    subject_id: str | None

    async def record(
        self,
        *,
        entry_type: str,
        outcome: str,
        reason: str,
        grant: GrantView | None,
        disclosed: list[str] | None = None,
        withheld: list[str] | None = None,
        source_agency_id: str | None = None,
        payload_digest: str | None = None,
        extra: dict[str, Any] | None = None,
        use: GrantView | None = None,
    ) -> str | None:
        """Write the decision's ledger entry and disclosure row; its entry id.

        With ``use`` (a permit), nothing is written and None comes back if the grant
        use could not be taken.
        """
        rt = self.rt
        commitment = None
        if self.subject_id is None:
            # Unknown reference: record a keyed commitment to what was guessed, so
            # auditors can count probing without the ledger holding the guess.
            commitment = reference_commitment(
                rt.keys.subject_hmac, self.caller.agency_id, self.data.subject_ref
            )
        fields: dict[str, Any] = {
            "disclosure_id": self.disclosure_id,
            "outcome": outcome,
            "reason": reason,
            "category": self.req.category,
            "purpose": self.req.purpose,
            "fields_requested": sorted(self.req.fields) if self.req.fields is not None else None,
            "fields_disclosed": disclosed or [],
            "fields_withheld": withheld or [],
            "grant_id": grant.grant_id if grant else None,
            "grant_version": grant.version if grant else None,
            "policy_version": rt.catalog.policy.version,
            "source_agency_id": source_agency_id,
            "payload_sha256": payload_digest,
            "subject_known": self.subject_id is not None,
        }
        if extra:
            fields.update(extra)
        pending = pending_row(
            hmac_key=rt.keys.subject_hmac,
            entry_type=entry_type,
            actor=self.caller,
            agency_id=self.caller.agency_id,
            subject_id=self.subject_id,
            commitment=commitment,
            fields=fields,
            now=self.now,
        )
        entry_id: str = pending["entry_id"]
        stored = await repository.store_decision(
            self.session,
            pending,
            {
                "id": self.disclosure_id,
                "subject_id": self.subject_id,
                "requester_agency_id": self.caller.agency_id,
                "requester_client_id": self.caller.client_id,
                "source_agency_id": source_agency_id,
                "category": self.req.category,
                "purpose": self.req.purpose,
                "outcome": outcome,
                "reason": reason,
                "fields_disclosed": disclosed or [],
                "fields_withheld": withheld or [],
                "grant_id": grant.grant_id if grant else None,
                "grant_version": grant.version if grant else None,
                "policy_version": rt.catalog.policy.version,
                "payload_digest": payload_digest,
                "ledger_entry_id": entry_id,
                "subject_ref": self.data.subject_ref if self.subject_id is not None else None,
                "created_at": self.now,
            },
            use,
        )
        return entry_id if stored else None

    async def denied(self, reason: str, grant: GrantView | None) -> Outcome:
        await self.record(
            entry_type="disclosure.denied", outcome="denied", reason=reason, grant=grant
        )
        # Same status, shape and text for every reason: no existence oracle.
        body = NotPermitted(DENIAL_DETAIL).to_problem()
        body["instance"] = f"urn:uuid:{self.disclosure_id}"
        return Outcome(403, body)

    async def failed(
        self, error: BrokerError, reason: str, grant: GrantView, source: str | None
    ) -> Outcome:
        await self.record(
            entry_type="disclosure.failed",
            outcome="failed",
            reason=reason,
            grant=grant,
            source_agency_id=source,
        )
        body = error.to_problem()
        body["instance"] = f"urn:uuid:{self.disclosure_id}"
        return Outcome(error.status_code, body)

    async def disclose(self, permit: Permit, resolved: repository.Resolved) -> Outcome:
        assert self.subject_id is not None
        grant = permit.grant
        agencies, wrapped_key = resolved.parties, resolved.wrapped_key
        recipient = agencies.get(self.caller.agency_id)
        if recipient is None or not recipient.encryption_jwks.get("keys"):
            return await self.denied("recipient_has_no_key", grant)
        sources = [agencies[a] for a in grant.source_agency_ids if a in agencies]
        active_sources = [a for a in sources if a.status == "active"]
        if not active_sources:
            return await self.denied("agency_suspended", grant)

        record: dict[str, Any] | None = None
        source_used: repository.Party | None = None
        dropped = 0
        for source in active_sources:
            try:
                record, dropped = await self._fetch(source, wrapped_key)
            except SourceFailure as failure:
                return await self.failed(
                    failure.to_broker_error(), failure.reason, grant, source.id
                )
            except DataKeyUnavailable:
                # Saying "no record" would be false: the record is there, this process
                # cannot open it. Ids of agencies only, never the survivor's.
                log.error(
                    "held record unreadable: no records key of this process opens the "
                    "survivor's data key (its key folder lacks it: copy the folder from where "
                    "the records key was rotated); "
                    "holder=%s category=%s",
                    source.id,
                    self.req.category,
                )
                error = ServiceUnavailable(
                    "The broker cannot open the held record at the moment; nothing was "
                    "disclosed. Try again later."
                )
                return await self.failed(error, "record_key_unavailable", grant, source.id)
            except RecordUnreadable:
                continue  # erased or damaged: nothing readable at this source
            if record is not None:
                source_used = source
                break
        if record is None or source_used is None:
            return await self._no_record(grant)

        data = {name: record[name] for name in sorted(permit.disclosed) if name in record}
        disclosed = sorted(data)
        withheld = sorted(permit.withheld)
        claims = {
            "iss": self.rt.settings.issuer,
            "aud": self.caller.agency_id,
            "disclosure_id": self.disclosure_id,
            "subject_ref": self.data.subject_ref,
            "category": self.req.category,
            "purpose": self.req.purpose,
            "data": data,
            "grant_id": grant.grant_id,
            "grant_version": grant.version,
            "policy_version": self.rt.catalog.policy.version,
            "data_life_days": grant.data_life_days,
            "iat": int(time.time()),
            "notice": NO_REDISCLOSURE,
        }
        payload = seal_payload(claims, self.rt.keys.payload_signing, recipient.encryption_jwks)
        digest = hashlib.sha256(payload.encode()).hexdigest()
        entry = await self.record(
            entry_type="disclosure.permitted",
            outcome="permitted",
            reason="permitted",
            grant=grant,
            disclosed=disclosed,
            withheld=withheld,
            source_agency_id=source_used.id,
            payload_digest=digest,
            extra={"dropped_unknown_fields": dropped},
            use=grant,
        )
        if entry is None:
            # Lost a race: the grant changed (revoked, paused, revised) or the last use
            # went. Nothing was written; the sealed payload is dropped unsent.
            now_in_force = await repository.resolve(
                self.session, self.caller, self.data.subject_ref, self.req.category
            )
            try:
                permit = decide(self.req, now_in_force.grants, self.rt.catalog.policy, self.now)
            except Denied as denial:
                return await self.denied(denial.reason, denial.grant)
            return await self.denied("grant_changed", permit.grant)
        return Outcome(
            200,
            {
                "disclosure_id": self.disclosure_id,
                "payload": payload,
                "fields_disclosed": disclosed,
                "fields_withheld": withheld,
                "grant_id": grant.grant_id,
                "grant_version": grant.version,
                "policy_version": self.rt.catalog.policy.version,
                "ledger_entry": entry,
            },
        )

    async def _fetch(
        self, source: repository.Party, wrapped_key: bytes | None
    ) -> tuple[dict[str, Any] | None, int]:
        assert self.subject_id is not None
        if source.records_endpoint:
            if source.reference is None:
                return None, 0
            schema = self.rt.catalog.schemas[self.req.category]
            # Nothing is written before the decision, so end the read-only transaction:
            # its connection goes back to the pool while the holding agency answers
            # (seconds, at worst), and a slow agency cannot starve the other requests.
            await self.session.commit()
            result = await fetch_record(
                self.rt.http,
                url=source.records_endpoint,
                signing_key=self.rt.keys.token_signing,
                issuer=self.rt.settings.issuer,
                holder_agency_id=source.id,
                subject_ref=source.reference,
                category=self.req.category,
                schema=schema,
                max_bytes=self.rt.settings.records_max_bytes,
            )
            return result.record, result.dropped_fields
        if source.held is None:
            return None, 0
        subject_id, category, held = self.subject_id, self.req.category, source.held
        record = self.rt.with_records_keys(
            lambda keks: open_record(keks, wrapped_key, subject_id, source.id, category, held)
        )
        return record, 0

    async def _no_record(self, grant: GrantView) -> Outcome:
        await self.record(
            entry_type="disclosure.no_record", outcome="no_record", reason="no_record", grant=grant
        )
        body = {
            "type": PROBLEM_BASE + "record-not-found",
            "title": "No record",
            "status": 404,
            "detail": "The holding agency has no record of this category for this survivor.",
            "instance": f"urn:uuid:{self.disclosure_id}",
        }
        return Outcome(404, body)
