"""API shapes for consent grants and their versions."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from broker.common.validation import RequestBody, UTCInstant


class AttestationMethod(StrEnum):
    written = "written"
    electronic = "electronic"
    verbal_witnessed = "verbal_witnessed"
    # Accepted for pause and revoke only: a survivor may always withdraw, in any form.
    verbal = "verbal"


class Attestation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: AttestationMethod
    signed_at: UTCInstant
    document_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 (lowercase hex) of the signed form, recording or call note",
    )


class _In(RequestBody):
    pass


class ConsentTerms(_In):
    source_agency_ids: list[str] = Field(min_length=1, max_length=10)
    fields: dict[str, list[str]] = Field(min_length=1, max_length=10)
    purposes: list[str] = Field(min_length=1, max_length=20)
    valid_from: UTCInstant | None = None
    expires_at: UTCInstant
    max_uses: int | None = Field(default=None, ge=1, le=100_000)
    data_life_days: int | None = Field(default=None, ge=1, le=3650)
    excluded_client_ids: list[str] = Field(default_factory=list, max_length=100)
    attestation: Attestation
    reason: str = Field(min_length=1, max_length=2000)


class ConsentCreate(ConsentTerms):
    subject_id: str = Field(min_length=1, max_length=64)
    recipient_agency_id: str = Field(min_length=1, max_length=64)


class ConsentRevise(ConsentTerms):
    pass


class ConsentLifecycle(_In):
    attestation: Attestation
    reason: str = Field(min_length=1, max_length=2000)


class ConsentStatus(StrEnum):
    active = "active"
    paused = "paused"
    revoked = "revoked"
    expired = "expired"


class ConsentVersionOut(BaseModel):
    id: str
    version: int
    subject_id: str | None
    status: ConsentStatus
    change: str
    recipient_agency_id: str
    source_agency_ids: list[str]
    fields: dict[str, list[str]]
    purposes: list[str]
    valid_from: datetime
    expires_at: datetime
    max_uses: int | None
    data_life_days: int | None
    excluded_client_ids: list[str]
    attestation: Attestation
    reason: str
    actor_client_id: str
    created_at: datetime


class ConsentOut(ConsentVersionOut):
    latest_version: int
    uses: int
    ledger_entry: str | None = None


class ConsentHistory(BaseModel):
    id: str
    versions: list[ConsentVersionOut]


class NoticeOut(BaseModel):
    id: str
    agency_id: str
    grant_version: int
    event: str
    status: str
    attempts: int
    last_status: str | None
    disclosure_ids: list[str]
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None


class NoticeList(BaseModel):
    grant_id: str
    items: list[NoticeOut]
