"""chunks indexed by (job, state, chunk_no): the next pending chunks in order, at any scale

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26

Dispatch asks for a job's first pending chunks by number. With (job_id, state) alone,
PostgreSQL walks the primary key past every finished chunk (2 M rows, ~0.5 s, on a
half-done billion-item job, after every chunk of every worker); with chunk_no in the index
it reads just the rows it returns. The index still serves every lookup by state.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_chunks_job_state_no", "chunks", ["job_id", "state", "chunk_no"])
    op.drop_index("ix_chunks_job_state", table_name="chunks")


def downgrade() -> None:
    op.create_index("ix_chunks_job_state", "chunks", ["job_id", "state"])
    op.drop_index("ix_chunks_job_state_no", table_name="chunks")
