"""Many survivors fast: clone what the broker's services wrote for one survivor.

Enrolling a survivor, linking four references and granting two consents through
the service functions costs ~70 statements, ~35 ms on the 2-core machine, so
10,000 survivors would take six minutes. Instead the seeding runs the real
services for the first few survivors (``bench.world``) and then copies the rows
they wrote for survivor 0 -- subject, references, grant heads, grant versions
and ledger entries -- for every other survivor, with fresh ids, fresh wrapped
data keys, that survivor's own references, and ledger entries rebuilt by the
broker's own ``append_entry`` (so commitments and canonical JSON are real), then
inserts them in bulk. The database ends up as if the services had run for all.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from broker.auth.roles import Principal, Role
from broker.crypto.commitment import reference_commitment, subject_commitment
from broker.crypto.datakeys import new_wrapped_data_key
from broker.ledger.entries import append_entry
from broker.models import (
    ConsentGrant,
    ConsentVersion,
    LedgerEntry,
    LedgerPending,
    Subject,
    SubjectReference,
)
from broker.runtime import Runtime

ENVELOPE = ("v", "id", "type", "at", "actor", "agency_id", "subject")


PENDING_COLUMNS = (
    "entry_id",
    "entry_type",
    "agency_id",
    "subject_commitment",
    "body",
    "created_at",
)


class Collector:
    """Stands in for the session given to ``append_entry``, keeping the rows it writes.

    Covers both ways the broker has written the outbox -- ``session.add(LedgerPending)``
    and an INSERT executed on ``await session.connection()`` -- so entries are built
    by the broker's own code and then inserted in bulk here.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, row: LedgerPending) -> None:
        self.rows.append({c: getattr(row, c) for c in PENDING_COLUMNS})

    async def connection(self) -> Collector:
        return self

    async def execute(self, statement: object, params: Any = None) -> None:
        for p in params if isinstance(params, list) else [params]:
            self.rows.append({c: p[c] for c in PENDING_COLUMNS})


def _columns(row: Any, model: type[Any]) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in model.__table__.columns}


class Template:
    """Survivor 0's rows, read back after the services wrote them."""

    def __init__(
        self,
        subject: dict[str, Any],
        references: list[dict[str, Any]],
        grants: list[dict[str, Any]],
        versions: list[dict[str, Any]],
        entries: list[dict[str, Any]],
    ) -> None:
        self.subject = subject
        self.references = references
        self.grants = grants
        self.versions = versions
        self.entries = entries

    @classmethod
    async def load(cls, session: AsyncSession, rt: Runtime, subject_id: str) -> Template:
        subject = await session.get(Subject, subject_id)
        assert subject is not None
        refs = (
            await session.scalars(
                select(SubjectReference).where(SubjectReference.subject_id == subject_id)
            )
        ).all()
        grants = (
            await session.scalars(select(ConsentGrant).where(ConsentGrant.subject_id == subject_id))
        ).all()
        versions = (
            await session.scalars(
                select(ConsentVersion).where(ConsentVersion.grant_id.in_([g.id for g in grants]))
            )
        ).all()
        # The broker's sequencer may already have moved some of them out of the outbox.
        commitment = subject_commitment(rt.keys.subject_hmac, subject_id)
        bodies: list[str] = []
        for model in (LedgerPending, LedgerEntry):
            bodies += (
                await session.scalars(
                    select(model.body).where(model.subject_commitment == commitment)
                )
            ).all()
        entries = sorted((orjson.loads(b) for b in bodies), key=lambda e: str(e["at"]))
        return cls(
            _columns(subject, Subject),
            [_columns(r, SubjectReference) for r in refs],
            [_columns(g, ConsentGrant) for g in grants],
            [_columns(v, ConsentVersion) for v in versions],
            entries,
        )


def _principal(actor: dict[str, str] | None) -> Principal | None:
    if actor is None:
        return None
    return Principal(
        client_id=actor["client_id"],
        agency_id=actor["agency_id"],
        role=Role(actor["role"]),
        scopes=frozenset(),
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )


async def clone_survivors(
    session: AsyncSession,
    rt: Runtime,
    template: Template,
    indices: range,
    reference_for: Callable[[str, int], str],
) -> None:
    """Insert survivors ``indices`` as copies of ``template``.

    ``reference_for(agency_id, i)`` gives survivor ``i``'s reference at an agency.
    """
    hmac_key = rt.keys.subject_hmac
    old_subject = template.subject["id"]
    subjects, refs, grants, versions = [], [], [], []
    collector = Collector()
    now = datetime.now(UTC)
    for i in indices:
        new_subject = str(uuid.uuid4())
        mapping = {old_subject: new_subject}
        subjects.append(
            template.subject
            | {"id": new_subject, "wrapped_data_key": new_wrapped_data_key(rt.keys.records_kek)}
        )
        for ref in template.references:
            reference = reference_for(ref["agency_id"], i)
            old_c = reference_commitment(hmac_key, ref["agency_id"], ref["reference"])
            mapping[old_c] = reference_commitment(hmac_key, ref["agency_id"], reference)
            refs.append(
                ref | {"id": str(uuid.uuid4()), "subject_id": new_subject, "reference": reference}
            )
        for g in template.grants:
            mapping[g["id"]] = str(uuid.uuid4())
            grants.append(g | {"id": mapping[g["id"]], "subject_id": new_subject})
        for v in template.versions:
            versions.append(v | {"grant_id": mapping[v["grant_id"]]})
        for entry in template.entries:
            text = orjson.dumps({k: v for k, v in entry.items() if k not in ENVELOPE}).decode()
            for old, new in mapping.items():
                text = text.replace(old, new)
            await append_entry(
                cast(AsyncSession, collector),
                hmac_key=hmac_key,
                entry_type=entry["type"],
                actor=_principal(entry["actor"]),
                agency_id=entry["agency_id"],
                subject_id=new_subject,
                fields=orjson.loads(text) or None,
                now=now,
            )
    pending = collector.rows
    for model, rows in (
        (Subject, subjects),
        (SubjectReference, refs),
        (ConsentGrant, grants),
        (ConsentVersion, versions),
        (LedgerPending, pending),
    ):
        if rows:
            await session.execute(insert(model), rows)
