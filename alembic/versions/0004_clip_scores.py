"""CLIP scores: items.re_clip_score and items.org_clip_score

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

Two nullable double-precision columns for the optional scoring step (RECAP_SCORE_MODEL).
On PostgreSQL `items` is partitioned by job: `ALTER TABLE items ADD COLUMN` on the parent
adds the column to every partition, and a nullable column without a default is a change of
the catalogue only: no partition is rewritten, however many rows it holds. SQLite adds
them in place too (batch mode rebuilds a table only where SQLite cannot alter it).
"""

import sqlalchemy as sa

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = ("re_clip_score", "org_clip_score")


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Float()))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
