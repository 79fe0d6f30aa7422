"""API shapes for subjects."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from broker.common.validation import RequestBody


class SubjectCreate(RequestBody):
    """Enrolment takes no fields: the survivor is only an opaque id here."""


class SubjectCreated(BaseModel):
    subject_id: str
    created_at: datetime


class ReferenceCreate(RequestBody):
    agency_id: str = Field(min_length=1, max_length=64)
    reference: str = Field(min_length=1, max_length=128)


class ReferenceOut(BaseModel):
    id: str
    agency_id: str
    reference: str
    created_at: datetime


class SubjectOut(BaseModel):
    subject_id: str
    enrolled_by_agency_id: str
    created_at: datetime
    references: list[ReferenceOut]
