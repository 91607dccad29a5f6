"""Job operations: jobs.state, jobs.priority, jobs.engine_seconds, jobs.finished_at and
chunks.cancelled_count

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

`recap pause`, `resume`, `cancel` and `priority`, and the engine time a job took. Only the
small `jobs` table and the `chunks` table change; `items` is untouched (a cancelled item is
a new value of its string `status`). On PostgreSQL (11 and later) a column added with a
constant default is a change of the catalogue only: no table is rewritten.
"""

import sqlalchemy as sa

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def job_columns() -> list[sa.Column]:
    return [
        sa.Column("state", sa.String(16), nullable=False, server_default="running"),
        sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("engine_seconds", sa.Float(), nullable=False, server_default="0"),
        sa.Column("finished_at", sa.Float()),
    ]


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in job_columns():
            batch.add_column(column)
    with op.batch_alter_table("chunks") as batch:
        batch.add_column(sa.Column("cancelled_count", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("chunks") as batch:
        batch.drop_column("cancelled_count")
    with op.batch_alter_table("jobs") as batch:
        for column in reversed(job_columns()):
            batch.drop_column(column.name)
