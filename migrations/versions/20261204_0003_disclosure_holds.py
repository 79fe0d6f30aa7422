"""disclosure holds: an operator's switch that stops every disclosure

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import broker.models.base

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "disclosure_holds",
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("placed_at", broker.models.base.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("reason", name=op.f("pk_disclosure_holds")),
    )


def downgrade() -> None:
    op.drop_table("disclosure_holds")
