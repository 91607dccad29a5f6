"""blocklist: what `recap forget` keeps to refuse removed images again

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

A new, small table only: no column is added to `items`, so no partition is rewritten. Its
entries are a kind (domain, sha256, url_hash, key) and a value, unique together.
(0005 was written at the same time; this one follows it.)
"""

import sqlalchemy as sa

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "blocklist",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.String(300), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_blocklist_kind_value", "blocklist", ["kind", "value"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_blocklist_kind_value", table_name="blocklist")
    op.drop_table("blocklist")
