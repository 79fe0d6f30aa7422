"""Survivors (subjects): opaque ids, agency case references and held records."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from broker.models.base import Base, Id, UTCDateTime, new_id, utcnow


class Subject(Base):
    """No name, birth date or address: the broker knows a survivor only by this id."""

    __tablename__ = "subjects"

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    enrolled_by_agency_id: Mapped[str] = mapped_column(Id, ForeignKey("agencies.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Per-survivor data key wrapped by the broker's records KEK; None once erased.
    wrapped_data_key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class SubjectReference(Base):
    __tablename__ = "subject_references"
    __table_args__ = (
        UniqueConstraint("agency_id", "reference"),
        Index("ix_subject_references_subject_id", "subject_id"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    subject_id: Mapped[str] = mapped_column(Id, ForeignKey("subjects.id", ondelete="CASCADE"))
    agency_id: Mapped[str] = mapped_column(Id, ForeignKey("agencies.id"))
    reference: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class HeldRecord(Base):
    """A record deposited by an agency without an endpoint, AES-GCM under the subject's key."""

    __tablename__ = "held_records"
    __table_args__ = (UniqueConstraint("subject_id", "agency_id", "category"),)

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    subject_id: Mapped[str] = mapped_column(Id, ForeignKey("subjects.id", ondelete="CASCADE"))
    agency_id: Mapped[str] = mapped_column(Id, ForeignKey("agencies.id"))
    category: Mapped[str] = mapped_column(String(32))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
