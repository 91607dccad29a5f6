"""The tables (docs/ARCHITECTURE.md, "Layers"): jobs, chunks, items and provenances.
PostgreSQL is the source of truth; SQLite serves `recap run`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from recap.states import ChunkState, ItemStatus, JobState

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model: Mapped[str] = mapped_column(String(300))
    model_revision: Mapped[str | None] = mapped_column(String(100))
    prompt: Mapped[str] = mapped_column(Text)
    generation: Mapped[dict] = mapped_column(JSON)
    chunk_size: Mapped[int] = mapped_column(Integer)
    # Epoch seconds (database clock) of the first claim: the base of rate and ETA.
    started_at: Mapped[float | None] = mapped_column(Float)
    # Migration 0005: pause, cancel, priority and engine time (`recap pause`, `priority`...).
    state: Mapped[str] = mapped_column(
        String(16), default=JobState.RUNNING.value, server_default=JobState.RUNNING.value
    )
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # larger first
    # Engine busy seconds of the job's batches, summed over workers and devices.
    engine_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    finished_at: Mapped[float | None] = mapped_column(Float)  # epoch seconds: cancelled (or ended)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Chunk(Base):
    """A unit of work. Counters are kept by the writes so `status` never scans items."""

    __tablename__ = "chunks"

    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    chunk_no: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(16), default=ChunkState.PENDING.value)
    item_count: Mapped[int] = mapped_column(Integer, default=0)
    done_count: Mapped[int] = mapped_column(Integer, default=0)
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    cancelled_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # migration 0005
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    # Epoch seconds on the database's clock, so hosts with skewed clocks agree.
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    queued_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    # {"error_class": n} of this chunk's failed items, kept with the counters.
    error_counts: Mapped[dict | None] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    # chunk_no last: dispatch reads a job's next pending chunks in order (migration 0003).
    __table_args__ = (Index("ix_chunks_job_state_no", "job_id", "state", "chunk_no"),)


class Item(Base):
    """One image of a job. No index on status: a billion rows change status once each."""

    __tablename__ = "items"

    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    chunk_no: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    local: Mapped[bool] = mapped_column(Boolean, default=False)  # see InputItem.local
    org_caption: Mapped[str | None] = mapped_column(Text)
    expected_sha256: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.PENDING.value)
    error_class: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    caption: Mapped[str | None] = mapped_column(Text)
    flags: Mapped[list | None] = mapped_column(JSON)
    sha256: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    model_revision: Mapped[str | None] = mapped_column(String(100))
    provenance_id: Mapped[int | None] = mapped_column(BigInteger)  # provenances.id (done items)
    fetch_ms: Mapped[float | None] = mapped_column(Float)
    infer_ms: Mapped[float | None] = mapped_column(Float)
    # CLIP scores (RECAP_SCORE_MODEL) of the new and the original caption (migration 0004).
    re_clip_score: Mapped[float | None] = mapped_column(Float)
    org_clip_score: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_items_job_chunk", "job_id", "chunk_no"),
        {"postgresql_partition_by": "LIST (job_id)"},  # one partition per job (recap/store/jobs.py)
    )


class Provenance(Base):
    """How captions were made, beyond the job's model, prompt and generation settings:
    engine and its version, dtype, attention, GPU model. One row per distinct set-up."""

    __tablename__ = "provenances"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the JSON
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class BlocklistEntry(Base):
    """What `recap forget` keeps so that removed images are refused again (migration 0006):
    a domain, an image sha256, the sha256 of a URL (`url_hash`: the URL itself is not kept)
    or an item key. `submit`, `run` and the workers consult it."""

    __tablename__ = "blocklist"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    value: Mapped[str] = mapped_column(String(300))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (Index("ux_blocklist_kind_value", "kind", "value", unique=True),)
