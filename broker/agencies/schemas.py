"""API shapes for agencies and clients."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

from broker.auth.roles import Role
from broker.common.validation import RequestBody


class AgencyKind(StrEnum):
    law_enforcement = "law_enforcement"
    shelter = "shelter"
    legal_aid = "legal_aid"
    medical = "medical"
    advocacy = "advocacy"
    oversight = "oversight"


class _In(RequestBody):
    pass


class AgencyCreate(_In):
    name: str = Field(min_length=1, max_length=200)
    kind: AgencyKind
    encryption_jwks: dict[str, Any]
    records_endpoint: str | None = Field(default=None, max_length=2048)
    webhook_url: str | None = Field(default=None, max_length=2048)


class AgencyPatch(_In):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    status: Literal["active", "suspended"] | None = None
    encryption_jwks: dict[str, Any] | None = None
    records_endpoint: str | None = Field(default=None, max_length=2048)
    webhook_url: str | None = Field(default=None, max_length=2048)


class AgencyOut(BaseModel):
    id: str
    name: str
    kind: AgencyKind
    status: str
    encryption_jwks: dict[str, Any]
    records_endpoint: str | None
    webhook_url: str | None
    created_at: datetime
    updated_at: datetime


class AgencyList(BaseModel):
    items: list[AgencyOut]


class ClientCreate(_In):
    agency_id: str = Field(min_length=1, max_length=64)
    role: Role
    name: str = Field(min_length=1, max_length=200)
    jwks: dict[str, Any]


class ClientOut(BaseModel):
    client_id: str
    agency_id: str
    role: Role
    name: str
    status: str
    created_at: datetime
    withdrawn_at: datetime | None = None
