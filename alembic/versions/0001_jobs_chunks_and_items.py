"""jobs, chunks and items

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# Items and chunks are updated in place once or a few times per row: leave room on each
# page for HOT updates and let autovacuum keep up with an update-heavy table.
UPDATE_HEAVY = {  # also the storage parameters of each job's items partition (recap/store.py)
    "postgresql_with": {
        "fillfactor": "80",
        "autovacuum_vacuum_scale_factor": "0.02",
        "autovacuum_analyze_scale_factor": "0.02",
    }
}


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("model_revision", sa.String(100)),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("generation", sa.JSON(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float()),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "chunks",
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("chunk_no", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("done_count", sa.Integer(), nullable=False),
        sa.Column("failed_count", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(200)),
        sa.Column("lease_expires_at", sa.Float()),
        sa.Column("queued_at", sa.Float()),
        sa.Column("last_error", sa.Text()),
        sa.Column("error_counts", sa.JSON()),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "chunk_no"),
        **UPDATE_HEAVY,
    )
    op.create_index("ix_chunks_job_state", "chunks", ["job_id", "state"])
    op.create_table(
        "items",
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("key", sa.String(300), nullable=False),
        sa.Column("chunk_no", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("local", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("org_caption", sa.Text()),
        sa.Column("expected_sha256", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_class", sa.String(32)),
        sa.Column("error", sa.Text()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("caption", sa.Text()),
        sa.Column("flags", sa.JSON()),
        sa.Column("sha256", sa.String(64)),
        sa.Column("width", sa.Integer()),
        sa.Column("height", sa.Integer()),
        sa.Column("model_revision", sa.String(100)),
        sa.Column("fetch_ms", sa.Float()),
        sa.Column("infer_ms", sa.Float()),
        sa.Column("worker", sa.String(200)),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "key"),
        # On PostgreSQL one partition per job (created with the job, storage parameters on
        # the partition): a job's rows are dropped or archived whole, and a billion rows
        # never share one index.
        postgresql_partition_by="LIST (job_id)",
    )
    op.create_index("ix_items_job_chunk", "items", ["job_id", "chunk_no"])


def downgrade() -> None:
    op.drop_index("ix_items_job_chunk", table_name="items")
    op.drop_table("items")
    op.drop_index("ix_chunks_job_state", table_name="chunks")
    op.drop_table("chunks")
    op.drop_table("jobs")
