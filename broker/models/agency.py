"""Agencies (organisations) and their clients (credentials)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from broker.models.base import Base, Id, JSONType, UTCDateTime, new_id, utcnow


class Agency(Base):
    __tablename__ = "agencies"

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="active")
    encryption_jwks: Mapped[dict[str, Any]] = mapped_column(JSONType)
    records_endpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Client(Base):
    __tablename__ = "clients"
    __table_args__ = (Index("ix_clients_agency_id", "agency_id"),)

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    agency_id: Mapped[str] = mapped_column(Id, ForeignKey("agencies.id"))
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    jwks: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    withdrawn_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class UsedAssertion(Base):
    """Client-assertion ``jti`` values seen, so each is accepted once (RFC 7523 §3)."""

    __tablename__ = "used_assertions"

    client_id: Mapped[str] = mapped_column(Id, primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
