"""API shapes for subjects."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class SubjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubjectCreated(BaseModel):
    subject_id: str
    created_at: datetime


class ReferenceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
