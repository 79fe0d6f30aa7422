"""ledger key rotations: hand-overs of the checkpoint key, append-only

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 18:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import broker.models.base

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "ledger_key_rotations"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.Column("old_verifier_key", sa.String(length=256), nullable=False),
        sa.Column("new_verifier_key", sa.String(length=256), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", broker.models.base.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_key_rotations")),
    )
    # Append-only, as the other ledger tables (0001 made the PostgreSQL function).
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            f"CREATE TRIGGER {TABLE}_append_only BEFORE UPDATE OR DELETE ON {TABLE} "
            "FOR EACH ROW EXECUTE FUNCTION broker_refuse_change()"
        )
        op.execute(
            f"CREATE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE} "
            "FOR EACH STATEMENT EXECUTE FUNCTION broker_refuse_change()"
        )
    elif dialect == "sqlite":
        for op_name in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {TABLE}_no_{op_name.lower()} BEFORE {op_name} ON {TABLE} "
                f"BEGIN SELECT RAISE(ABORT, '{op_name} on {TABLE} is refused: "
                "the table is append-only'); END"
            )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {TABLE}_append_only ON {TABLE}")
        op.execute(f"DROP TRIGGER IF EXISTS {TABLE}_no_truncate ON {TABLE}")
    op.drop_table(TABLE)
