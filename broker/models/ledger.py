"""Ledger tables: an outbox written by requests, and the sequenced, append-only log.

``ledger_pending`` is the outbox each request writes in its own transaction; the
sequencer moves rows from it into ``ledger_entries`` (contiguous indices), stores
the complete-subtree hashes in ``ledger_nodes`` and signs ``ledger_checkpoints``;
``ledger_key_rotations`` records each hand-over of the checkpoint key. These
tables refuse UPDATE and DELETE in the database itself.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, SmallInteger, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from broker.models.base import Base, Id, UTCDateTime, utcnow

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class LedgerPending(Base):
    __tablename__ = "ledger_pending"

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    entry_id: Mapped[str] = mapped_column(Id, unique=True)
    entry_type: Mapped[str] = mapped_column(String(48))
    agency_id: Mapped[str | None] = mapped_column(Id, nullable=True)
    subject_commitment: Mapped[str | None] = mapped_column(String(96), nullable=True)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LedgerEntry(Base):
    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_entries_agency_idx", "agency_id", "idx"),
        Index("ix_ledger_entries_subject_idx", "subject_commitment", "idx"),
        Index("ix_ledger_entries_type_idx", "entry_type", "idx"),
        Index("ix_ledger_entries_created_at", "created_at"),
    )

    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    entry_id: Mapped[str] = mapped_column(Id, unique=True)
    entry_type: Mapped[str] = mapped_column(String(48))
    agency_id: Mapped[str | None] = mapped_column(Id, nullable=True)
    subject_commitment: Mapped[str | None] = mapped_column(String(96), nullable=True)
    body: Mapped[str] = mapped_column(Text)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    integrated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LedgerNode(Base):
    """Hash of the complete subtree of 2**level leaves starting at leaf idx * 2**level."""

    __tablename__ = "ledger_nodes"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class LedgerCheckpoint(Base):
    __tablename__ = "ledger_checkpoints"

    tree_size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LedgerKeyRotation(Base):
    """A hand-over of the checkpoint key (``broker keys rotate checkpoint``), oldest first.

    The newest row names the key every sequencer must sign with; ``note`` is the
    rotation as auditors check it (``broker.ledger.key_rotation``).
    """

    __tablename__ = "ledger_key_rotations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tree_size: Mapped[int] = mapped_column(BigInteger)
    old_verifier_key: Mapped[str] = mapped_column(String(256))
    new_verifier_key: Mapped[str] = mapped_column(String(256))
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


APPEND_ONLY_TABLES = (
    "consent_versions",
    "ledger_entries",
    "ledger_nodes",
    "ledger_checkpoints",
    "ledger_key_rotations",
)
