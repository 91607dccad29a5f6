"""What the dispatcher reads and marks: unfinished jobs, and chunks to enqueue."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select, text, update
from sqlalchemy.engine import Connection

from recap.states import UNFINISHED_CHUNK_STATES, ChunkState, JobState
from recap.store.core import StoreCore, chunks_t, jobs_t
from recap.store.jobs import JobInfo, job_info
from recap.transient import retrying


@dataclass(frozen=True, slots=True)
class ChunkRef:
    job_id: int
    chunk_no: int


class Enqueue(StoreCore):
    def unfinished_jobs(self, model: str | None = None) -> list[JobInfo]:
        """Running jobs (of `model`; not paused or cancelled) with chunks still pending,
        queued or running: one index probe per job, since every worker asks this on every
        feed tick. Highest priority first, then newest."""
        open_chunks = (
            select(chunks_t.c.job_id)
            .where(chunks_t.c.job_id == jobs_t.c.id, chunks_t.c.state.in_(UNFINISHED_CHUNK_STATES))
            .exists()
        )
        query = (
            select(jobs_t)
            .where(open_chunks, jobs_t.c.state == JobState.RUNNING)
            .order_by(jobs_t.c.priority.desc(), jobs_t.c.id.desc())
        )
        if model is not None:
            query = query.where(jobs_t.c.model == model)
        with self.engine.connect() as conn:
            return [job_info(r) for r in conn.execute(query).mappings()]

    def higher_priority_chunk(self, model: str, priority: int) -> ChunkRef | None:
        """A pending or queued chunk of the running job of `model` with the highest priority
        above `priority`, if any: a worker takes it instead of the message it was sent, so
        a rush job starts within one chunk on every worker (a read only: the claim decides)."""
        with self.engine.connect() as conn:
            job_ids = conn.execute(
                select(jobs_t.c.id)
                .where(
                    jobs_t.c.model == model,
                    jobs_t.c.state == JobState.RUNNING,
                    jobs_t.c.priority > priority,
                )
                .order_by(jobs_t.c.priority.desc(), jobs_t.c.id)
            ).scalars()
            for job_id in list(job_ids):
                chunk_no = conn.execute(
                    select(chunks_t.c.chunk_no)
                    .where(
                        chunks_t.c.job_id == job_id,
                        chunks_t.c.state.in_([ChunkState.PENDING, ChunkState.QUEUED]),
                    )
                    .order_by(chunks_t.c.state, chunks_t.c.chunk_no)  # pending first: not sent yet
                    .limit(1)
                ).scalar()
                if chunk_no is not None:
                    return ChunkRef(job_id, chunk_no)
        return None

    @retrying
    def unqueue_chunk(self, ref: ChunkRef) -> None:
        """A queued chunk whose message a worker set aside back to `pending`: dispatch sends
        it again."""
        with self.writer.begin() as conn:
            conn.execute(
                update(chunks_t)
                .where(
                    chunks_t.c.job_id == ref.job_id,
                    chunks_t.c.chunk_no == ref.chunk_no,
                    chunks_t.c.state == ChunkState.QUEUED,
                )
                .values(state=ChunkState.PENDING)
            )

    def count_chunks(self, job_ids: list[int], state: ChunkState) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count())
                .select_from(chunks_t)
                .where(chunks_t.c.job_id.in_(job_ids), chunks_t.c.state == state)
            ).scalar_one()

    @retrying
    def take_chunks_to_enqueue(
        self,
        jobs: list[JobInfo],
        room: int,
        lost: int,
        send: Callable[[list[ChunkRef]], None],
        lock_key: str | None = None,
    ) -> list[ChunkRef]:
        """Mark chunks `queued` and send their messages, in one transaction.

        In order: chunks whose lease expired (their worker died), the oldest `lost` queued
        chunks (their message is gone, e.g. Redis was emptied), then pending chunks, up to
        `room`: those of higher-priority jobs first, shared equally between jobs of the same
        priority (the job with the fewest chunks queued or running gets the next). Rows are
        taken with FOR UPDATE SKIP LOCKED, so two dispatchers never take the same chunk; a
        failed send rolls the marks back. A chunk sent twice is harmless: the second
        delivery finds it claimed or done.
        """
        job_ids = [job.id for job in jobs]
        if room <= 0 or not job_ids:
            return []
        with self.writer.begin() as conn:
            if self.dialect == "postgresql" and lock_key and not _try_lock(conn, lock_key):
                return []  # another dispatcher is topping this queue up right now
            now = self.now(conn)
            base = chunks_t.c.job_id.in_(job_ids)
            state = chunks_t.c.state
            expired = (state == ChunkState.RUNNING) & (chunks_t.c.lease_expires_at < now)
            wanted = [
                (base & expired, chunks_t.c.lease_expires_at, room),
                (base & (state == ChunkState.QUEUED), chunks_t.c.queued_at, min(lost, room)),
            ]
            refs: list[ChunkRef] = []
            for condition, order, limit in wanted:
                limit = min(limit, room - len(refs))
                if limit > 0:
                    refs += _lock_some(conn, condition, order, limit)
            for level in _by_priority(jobs):
                if len(refs) >= room:
                    break
                refs += _pending_shared(conn, level, room - len(refs))
            if not refs:
                return []
            for ref in refs:
                self._set_chunk(conn, ref.job_id, ref.chunk_no, state=ChunkState.QUEUED, queued_at=now)
            send(refs)
        return refs


def _try_lock(conn: Connection, key: str) -> bool:
    """PostgreSQL's advisory lock on `key`, held to the end of the transaction, if free."""
    return bool(conn.execute(text("SELECT pg_try_advisory_xact_lock(hashtext(:k))"), {"k": key}).scalar())


def _by_priority(jobs: list[JobInfo]) -> list[list[int]]:
    """Job ids grouped by priority, the highest first."""
    levels: dict[int, list[int]] = {}
    for job in jobs:
        levels.setdefault(job.priority, []).append(job.id)
    return [levels[p] for p in sorted(levels, reverse=True)]


def _pending_shared(conn: Connection, job_ids: list[int], room: int) -> list[ChunkRef]:
    """Up to `room` pending chunks of jobs of one priority, each next one to the job with
    the fewest chunks queued or running (counting those taken here), in chunk order."""
    busy = dict(
        conn.execute(
            select(chunks_t.c.job_id, func.count())
            .where(
                chunks_t.c.job_id.in_(job_ids),
                chunks_t.c.state.in_([ChunkState.QUEUED, ChunkState.RUNNING]),
            )
            .group_by(chunks_t.c.job_id)
        ).all()
    )
    candidates = {
        job_id: deque(
            _lock_some(
                conn,
                (chunks_t.c.job_id == job_id) & (chunks_t.c.state == ChunkState.PENDING),
                chunks_t.c.chunk_no,
                room,
            )
        )
        for job_id in job_ids
    }
    taken: list[ChunkRef] = []
    while len(taken) < room:
        open_jobs = [j for j in job_ids if candidates[j]]
        if not open_jobs:
            break
        job_id = min(open_jobs, key=lambda j: busy.get(j, 0))  # ties: the order given
        taken.append(candidates[job_id].popleft())
        busy[job_id] = busy.get(job_id, 0) + 1
    return taken


def _lock_some(conn: Connection, condition, order, limit: int) -> list[ChunkRef]:
    rows = conn.execute(
        select(chunks_t.c.job_id, chunks_t.c.chunk_no)
        .where(condition)
        .order_by(order)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    return [ChunkRef(r.job_id, r.chunk_no) for r in rows]
