"""A chunk's pending items out, its results in (a done item is never overwritten, the
chunk's counters move by the real transitions), and failed items put back by `retry`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from recap.records import InputItem, ItemResult
from recap.states import ChunkState, ItemStatus, JobState
from recap.store.core import StoreCore, chunked, chunks_t, items_t, jobs_t, now_sql
from recap.store.jobs import JobInfo
from recap.transient import retrying

# ItemResult fields written as they are into the items row of the same name.
_RESULT_FIELDS = (
    "status",
    "caption",
    "flags",
    "error_class",
    "error",
    "sha256",
    "width",
    "height",
    "fetch_ms",
    "infer_ms",
    "worker",
    "re_clip_score",
    "org_clip_score",
)


class Retried(NamedTuple):
    """What `retry_failed` put back: how many items, in which chunks."""

    items: int
    chunks: list[int]


@dataclass(frozen=True, slots=True)
class BatchWritten:
    """What a batch's write changed, and the state of its job then (a cancelled job's
    chunks stop at their next batch)."""

    changed: int
    job_state: JobState


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What `cancel_pending` ended: items now `cancelled`, in how many chunks."""

    items: int
    chunks: int


class _Before(NamedTuple):
    """An item's status and error class before a write."""

    status: str
    error_class: str | None


class Results(StoreCore):
    @retrying
    def pending_items(self, job_id: int, chunk_no: int) -> list[InputItem]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    items_t.c.key,
                    items_t.c.url,
                    items_t.c.org_caption,
                    items_t.c.expected_sha256,
                    items_t.c.local,
                )
                .where(
                    items_t.c.job_id == job_id,
                    items_t.c.chunk_no == chunk_no,
                    items_t.c.status == ItemStatus.PENDING,
                )
                .order_by(items_t.c.key)
            ).all()
        return [InputItem(r.key, r.url, r.org_caption, r.expected_sha256, bool(r.local)) for r in rows]

    def write_results(
        self,
        job_id: int,
        chunk_no: int,
        results: list[ItemResult],
        model_revision: str | None = None,
        provenance_id: int | None = None,
    ) -> int:
        """Write a batch of final results; returns how many items changed (see `write_batch`)."""
        if not results:
            return 0
        return self.write_batch(job_id, chunk_no, results, model_revision, provenance_id).changed

    @retrying
    def write_batch(
        self,
        job_id: int,
        chunk_no: int,
        results: list[ItemResult],
        model_revision: str | None = None,
        provenance_id: int | None = None,
        engine_seconds: float = 0.0,
    ) -> BatchWritten:
        """Write a batch of final results. Done items record the model revision and
        provenance (`provenance_id`) they were made with; the batch's `engine_seconds` are
        added to its job's (the engine's work counts even where a result changes nothing).

        The chunk row is locked first (the same order everywhere), then the items, then the
        job; a done item is never overwritten and the chunk's counters move by the real
        transitions.
        """
        results = list({r.key: r for r in results}.values())  # a key once, or counters drift
        with self.writer.begin() as conn:
            chunk = self._lock_chunk(conn, job_id, chunk_no) if results else None
            to_write: list[ItemResult] = []
            if chunk is not None:
                before = _item_states(conn, job_id, [r.key for r in results])
                to_write = [r for r in results if r.key in before and before[r.key].status != ItemStatus.DONE]
                _update_items(conn, job_id, to_write, model_revision, provenance_id)
                self._move_counters(conn, chunk, to_write, before)
            state = _add_engine_seconds(conn, job_id, engine_seconds)
        return BatchWritten(len(to_write), JobState(state) if state else JobState.CANCELLED)

    def _move_counters(self, conn: Connection, chunk, results: list[ItemResult], before) -> None:
        if not results:
            return
        done, failed, cancelled = chunk["done_count"], chunk["failed_count"], chunk["cancelled_count"]
        errors = Counter(chunk["error_counts"] or {})
        for r in results:
            if before[r.key].status == ItemStatus.FAILED:
                failed -= 1
                errors[before[r.key].error_class] -= 1
            elif before[r.key].status == ItemStatus.CANCELLED:  # captioned as its job was cancelled
                cancelled -= 1
            if r.status == ItemStatus.DONE:
                done += 1
            else:
                failed += 1
                errors[r.error_class] += 1
        self._set_chunk(
            conn,
            chunk["job_id"],
            chunk["chunk_no"],
            done_count=done,
            failed_count=failed,
            cancelled_count=cancelled,
            error_counts={k: v for k, v in errors.items() if v > 0} or None,
        )

    def retry_failed(self, job: JobInfo, error_classes: list[str]) -> Retried:
        """Failed items of these classes back to `pending`, and chunks that gave up after
        their attempts reopened. One short transaction per chunk: workers writing to other
        chunks never wait for a long retry."""
        with self.engine.connect() as conn:
            candidates = conn.execute(
                select(chunks_t.c.chunk_no, chunks_t.c.state, chunks_t.c.error_counts).where(
                    chunks_t.c.job_id == job.id,
                    (chunks_t.c.failed_count > 0) | (chunks_t.c.state == ChunkState.FAILED),
                )
            ).all()
        chunk_nos = [
            c.chunk_no
            for c in candidates
            if c.state == ChunkState.FAILED or any((c.error_counts or {}).get(cls) for cls in error_classes)
        ]
        total = 0
        for chunk_no in chunk_nos:
            with self.writer.begin() as conn:
                total += self._retry_chunk(conn, job.id, chunk_no, error_classes)
        return Retried(total, chunk_nos)

    def cancel_pending(self, job: JobInfo) -> Cancelled:
        """The job's pending items become `cancelled`, one short transaction per chunk (the
        chunk row locked first, as every write does); chunks with nothing left are `done`.
        A running chunk keeps its lease: its worker stops at its next batch."""
        with self.engine.connect() as conn:
            chunk_nos = list(
                conn.execute(
                    select(chunks_t.c.chunk_no).where(
                        chunks_t.c.job_id == job.id, chunks_t.c.state != ChunkState.DONE
                    )
                ).scalars()
            )
        total = chunks = 0
        for chunk_no in chunk_nos:
            with self.writer.begin() as conn:
                n = self._cancel_chunk(conn, job.id, chunk_no)
            total, chunks = total + n, chunks + (n > 0)
        return Cancelled(total, chunks)

    def _cancel_chunk(self, conn: Connection, job_id: int, chunk_no: int) -> int:
        chunk = self._lock_chunk(conn, job_id, chunk_no)
        if chunk is None:
            return 0
        result = conn.execute(
            update(items_t)
            .where(
                items_t.c.job_id == job_id,
                items_t.c.chunk_no == chunk_no,
                items_t.c.status == ItemStatus.PENDING,
            )
            .values(status=ItemStatus.CANCELLED, updated_at=now_sql(conn))
        )
        values: dict = {"cancelled_count": chunk["cancelled_count"] + result.rowcount}
        if chunk["state"] in (ChunkState.PENDING, ChunkState.QUEUED):
            values["state"] = ChunkState.DONE  # nothing left to do in it
        self._set_chunk(conn, job_id, chunk_no, **values)
        return result.rowcount

    def _retry_chunk(self, conn: Connection, job_id: int, chunk_no: int, classes: list[str]) -> int:
        chunk = self._lock_chunk(conn, job_id, chunk_no)
        result = conn.execute(
            update(items_t)
            .where(
                items_t.c.job_id == job_id,
                items_t.c.chunk_no == chunk_no,
                items_t.c.status == ItemStatus.FAILED,
                items_t.c.error_class.in_(classes),
            )
            .values(status=ItemStatus.PENDING, error_class=None, error=None, updated_at=now_sql(conn))
        )
        errors = Counter(chunk["error_counts"] or {})
        for cls in classes:
            errors.pop(cls, None)
        running = chunk["state"] == ChunkState.RUNNING
        self._set_chunk(
            conn,
            job_id,
            chunk_no,
            state=ChunkState.RUNNING if running else ChunkState.PENDING,
            attempts=0,
            last_error=None,
            failed_count=chunk["failed_count"] - result.rowcount,
            error_counts=dict(errors) or None,
        )
        return result.rowcount


def _add_engine_seconds(conn: Connection, job_id: int, seconds: float) -> str | None:
    """Add a batch's engine time to its job (atomic: workers add concurrently); the job's
    state, None when it was dropped."""
    if seconds > 0:
        return conn.execute(
            update(jobs_t)
            .where(jobs_t.c.id == job_id)
            .values(engine_seconds=jobs_t.c.engine_seconds + seconds)
            .returning(jobs_t.c.state)
        ).scalar()
    return conn.execute(select(jobs_t.c.state).where(jobs_t.c.id == job_id)).scalar()


def _item_states(conn: Connection, job_id: int, keys: list[str]) -> dict[str, _Before]:
    states: dict[str, _Before] = {}
    for part in chunked(keys):
        rows = conn.execute(
            select(items_t.c.key, items_t.c.status, items_t.c.error_class)
            .where(items_t.c.job_id == job_id, items_t.c.key.in_(part))
            .with_for_update()
        )
        states.update({r.key: _Before(r.status, r.error_class) for r in rows})
    return states


def _update_items(
    conn: Connection,
    job_id: int,
    results: list[ItemResult],
    model_revision: str | None,
    provenance_id: int | None,
) -> None:
    if not results:
        return
    stmt = (
        update(items_t)
        .where(
            items_t.c.job_id == job_id,
            items_t.c.key == bindparam("b_key"),
            items_t.c.status != ItemStatus.DONE,
        )
        .values(
            **{name: bindparam(f"b_{name}") for name in _RESULT_FIELDS},
            model_revision=bindparam("b_model_revision"),
            provenance_id=bindparam("b_provenance_id"),
            attempts=items_t.c.attempts + 1,
            updated_at=now_sql(conn),
        )
    )
    rows = [
        {
            "b_key": r.key,
            "b_model_revision": model_revision if r.status == ItemStatus.DONE else None,
            "b_provenance_id": provenance_id if r.status == ItemStatus.DONE else None,
            **{f"b_{name}": getattr(r, name) for name in _RESULT_FIELDS},
        }
        for r in results
    ]
    conn.execute(stmt, rows)
