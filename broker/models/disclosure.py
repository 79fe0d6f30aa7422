"""Operational record of disclosure decisions and of revocation notices to deliver.

Unlike the ledger, these rows may name the survivor (by opaque id) so her advocate
can pull the accounting; erasing the survivor deletes them, leaving only the
ledger's unlinkable commitments.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from broker.models.base import Base, Id, JSONType, UTCDateTime, new_id, utcnow


class Disclosure(Base):
    __tablename__ = "disclosures"
    __table_args__ = (
        Index("ix_disclosures_subject_created", "subject_id", "created_at"),
        Index("ix_disclosures_grant_id", "grant_id"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    subject_id: Mapped[str | None] = mapped_column(
        Id, ForeignKey("subjects.id", ondelete="CASCADE"), nullable=True
    )
    requester_agency_id: Mapped[str] = mapped_column(Id)
    requester_client_id: Mapped[str] = mapped_column(Id)
    source_agency_id: Mapped[str | None] = mapped_column(Id, nullable=True)
    category: Mapped[str] = mapped_column(String(32))
    purpose: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))  # permitted | denied | failed
    reason: Mapped[str] = mapped_column(String(48))
    fields_disclosed: Mapped[list[str]] = mapped_column(JSONType)
    fields_withheld: Mapped[list[str]] = mapped_column(JSONType)
    grant_id: Mapped[str | None] = mapped_column(Id, nullable=True)
    grant_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    policy_version: Mapped[str] = mapped_column(String(80))
    payload_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    ledger_entry_id: Mapped[str] = mapped_column(Id, unique=True)
    subject_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """Durable outbox of revocation notices; a worker delivers with retries and backoff."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_grant_id", "grant_id"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    agency_id: Mapped[str] = mapped_column(Id, ForeignKey("agencies.id"))
    grant_id: Mapped[str] = mapped_column(Id)
    grant_version: Mapped[int] = mapped_column(Integer)
    event: Mapped[str] = mapped_column(String(48))
    body: Mapped[str] = mapped_column(Text)  # JWS compact signed by the payload key
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[str | None] = mapped_column(String(64), nullable=True)
    disclosure_ids: Mapped[list[str]] = mapped_column(JSONType)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class DisclosureHold(Base):
    """A hold on every disclosure, by reason (``broker.disclosure.holds``): while any
    row is here, ``POST /v1/disclosures`` answers 503 and nothing is decided."""

    __tablename__ = "disclosure_holds"

    reason: Mapped[str] = mapped_column(String(32), primary_key=True)
    placed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
