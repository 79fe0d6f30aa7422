"""Consent grants: a mutable head pointing at immutable versions.

The head holds only what must change (latest version number, use count); every
term of the consent lives in a ``consent_versions`` row that the database itself
refuses to UPDATE or DELETE (triggers in the migration).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from broker.models.base import Base, Id, JSONType, UTCDateTime, new_id, utcnow


class ConsentGrant(Base):
    __tablename__ = "consent_grants"
    __table_args__ = (
        Index("ix_consent_grants_subject_recipient", "subject_id", "recipient_agency_id"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    # Nulled when the survivor is erased, so no row links the grant to her any more.
    subject_id: Mapped[str | None] = mapped_column(
        Id, ForeignKey("subjects.id", ondelete="SET NULL"), nullable=True
    )
    managing_agency_id: Mapped[str] = mapped_column(Id, ForeignKey("agencies.id"))
    recipient_agency_id: Mapped[str] = mapped_column(Id, ForeignKey("agencies.id"))
    latest_version: Mapped[int] = mapped_column(Integer, default=1)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ConsentVersion(Base):
    __tablename__ = "consent_versions"

    grant_id: Mapped[str] = mapped_column(Id, ForeignKey("consent_grants.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    recipient_agency_id: Mapped[str] = mapped_column(Id)
    source_agency_ids: Mapped[list[str]] = mapped_column(JSONType)
    fields: Mapped[dict[str, list[str]]] = mapped_column(JSONType)
    purposes: Mapped[list[str]] = mapped_column(JSONType)
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    max_uses: Mapped[int | None] = mapped_column(Integer, nullable=True)
    data_life_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    excluded_client_ids: Mapped[list[str]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16))
    attestation: Mapped[dict[str, Any]] = mapped_column(JSONType)
    actor_client_id: Mapped[str] = mapped_column(Id)
    actor_agency_id: Mapped[str] = mapped_column(Id)
    change: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
