"""API shapes of the disclosure path."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from broker.common.validation import RequestBody


class DisclosureCreate(RequestBody):
    subject_ref: str = Field(
        min_length=1, max_length=128, description="the requester's own reference"
    )
    category: str = Field(min_length=1, max_length=32)
    purpose: str = Field(min_length=1, max_length=64)
    fields: list[str] | None = Field(default=None, max_length=100)


class DisclosureOut(BaseModel):
    disclosure_id: str
    payload: str = Field(
        description="JWE compact (ECDH-ES+A256KW, A256GCM) for the requester's key"
    )
    fields_disclosed: list[str]
    fields_withheld: list[str]
    grant_id: str
    grant_version: int
    policy_version: str
    ledger_entry: str


class RecordDeposit(RequestBody):
    subject_ref: str = Field(min_length=1, max_length=128)
    category: str = Field(min_length=1, max_length=32)
    record: dict[str, Any]


class RecordStored(BaseModel):
    category: str
    fields_stored: list[str]
    dropped_fields: int
    ledger_entry: str


class AccountingItem(BaseModel):
    disclosure_id: str
    at: datetime
    outcome: str
    reason: str
    requester_agency_id: str
    requester_client_id: str
    source_agency_id: str | None
    category: str
    purpose: str
    fields_disclosed: list[str]
    fields_withheld: list[str]
    grant_id: str | None
    grant_version: int | None
    policy_version: str
    ledger_entry: str
    ledger_index: int | None


class Accounting(BaseModel):
    subject_id: str
    items: list[AccountingItem]


class DenialCount(BaseModel):
    agency_id: str
    client_id: str
    reason: str
    denials: int
    unknown_subject: int = Field(description="denials naming a reference the broker does not know")
    first_at: datetime
    last_at: datetime


class DenialReport(BaseModel):
    since: datetime
    until: datetime
    threshold: int
    flagged_clients: list[str] = Field(
        description="clients at or over the threshold: possible fishing"
    )
    items: list[DenialCount]
