"""engine provenance: one row per distinct engine set-up, referenced by each done item

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # A handful of rows per job (one per distinct dtype / engine version / GPU model ...),
    # so a billion items carry an 8-byte id rather than the JSON.
    op.create_table(
        "provenances",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
    )
    # Nullable, no default: on PostgreSQL a metadata-only change, also for the partitions.
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("provenance_id", sa.BigInteger()))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("provenance_id")
    op.drop_table("provenances")
