"""How a job stands, from the per-chunk counters only (never a scan of its items): the
status object of docs/ARCHITECTURE.md ("Contracts"), chunk states and running leases."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from recap.clock import as_utc
from recap.states import ChunkState
from recap.store.core import StoreCore, chunks_t, jobs_t
from recap.store.jobs import JobInfo


@dataclass(frozen=True, slots=True)
class ItemCounts:
    total: int = 0
    pending: int = 0
    done: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class ChunkCounts:
    """Chunks per state, in the order of `ChunkState`."""

    pending: int = 0
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class JobStatus:
    job: str
    model: str
    items: ItemCounts
    errors: dict[str, int]  # failed items per error class, most first
    chunks: ChunkCounts
    rate_per_s: float | None  # items finished per second since the first claim
    eta_s: float | None

    def to_json(self) -> dict:
        """The `status --json` object: these keys, in this order."""
        return {
            "job": self.job,
            "model": self.model,
            "items": asdict(self.items),
            "errors": dict(self.errors),
            "chunks": asdict(self.chunks),
            "rate_per_s": self.rate_per_s,
            "eta_s": self.eta_s,
        }


@dataclass(frozen=True, slots=True)
class Lease:
    """A running chunk, who holds it, and for how much longer."""

    job_id: int
    chunk_no: int
    owner: str | None
    expires_in_s: float


class Status(StoreCore):
    def job_status(self, job: JobInfo) -> JobStatus:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    chunks_t.c.state,
                    func.count(),
                    func.coalesce(func.sum(chunks_t.c.item_count), 0),
                    func.coalesce(func.sum(chunks_t.c.done_count), 0),
                    func.coalesce(func.sum(chunks_t.c.failed_count), 0),
                )
                .where(chunks_t.c.job_id == job.id)
                .group_by(chunks_t.c.state)
            ).all()
            errors = _error_counts(conn, job.id)
            started_at = conn.execute(select(jobs_t.c.started_at).where(jobs_t.c.id == job.id)).scalar()
            now = self.now(conn)
            last_write = _last_write(conn, job.id)
        chunks = dict.fromkeys(ChunkState, 0)
        total = done = failed = 0
        for state, n, items, d, f in rows:
            chunks[ChunkState(state)] = int(n)
            total, done, failed = total + int(items), done + int(d), failed + int(f)
        pending = total - done - failed
        rate, eta = _rate_and_eta(done + failed, pending, started_at, now, last_write)
        return JobStatus(
            job=job.name,
            model=job.model,
            items=ItemCounts(total=total, pending=pending, done=done, failed=failed),
            errors=dict(sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))),
            chunks=ChunkCounts(**{state.value: n for state, n in chunks.items()}),
            rate_per_s=rate,
            eta_s=eta,
        )

    def chunk_states(self, job_id: int, states: Iterable[ChunkState]) -> list[int]:
        """Numbers of the job's chunks in these states, in order."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(chunks_t.c.chunk_no)
                    .where(chunks_t.c.job_id == job_id, chunks_t.c.state.in_(list(states)))
                    .order_by(chunks_t.c.chunk_no)
                ).scalars()
            )

    def leases(self, job_id: int | None = None) -> list[Lease]:
        """Running chunks (of one job) with their owners and seconds left on the lease."""
        with self.engine.connect() as conn:
            now = self.now(conn)
            query = select(
                chunks_t.c.job_id,
                chunks_t.c.chunk_no,
                chunks_t.c.lease_owner,
                chunks_t.c.lease_expires_at,
            ).where(chunks_t.c.state == ChunkState.RUNNING)
            if job_id is not None:
                query = query.where(chunks_t.c.job_id == job_id)
            rows = conn.execute(query).all()
        return [
            Lease(r.job_id, r.chunk_no, r.lease_owner, round((r.lease_expires_at or now) - now, 1))
            for r in rows
        ]


def _error_counts(conn: Connection, job_id: int) -> Counter:
    rows = conn.execute(
        select(chunks_t.c.error_counts).where(chunks_t.c.job_id == job_id, chunks_t.c.failed_count > 0)
    ).scalars()
    errors = Counter()
    for counts in rows:
        errors.update(counts or {})
    return errors


def _last_write(conn: Connection, job_id: int) -> float | None:
    """Epoch seconds of the newest update of a finished chunk (the end of a finished job)."""
    newest = conn.execute(
        select(func.max(chunks_t.c.updated_at)).where(
            chunks_t.c.job_id == job_id, chunks_t.c.state.in_([ChunkState.DONE, ChunkState.FAILED])
        )
    ).scalar()
    return None if newest is None else as_utc(newest).timestamp()


def _rate_and_eta(
    processed: int, pending: int, started_at: float | None, now: float, last_write: float | None
) -> tuple[float | None, float | None]:
    if not started_at or processed == 0:
        return None, None
    end = now if pending else (last_write or now)
    elapsed = max(end - started_at, 1e-3)
    rate = processed / elapsed
    return round(rate, 3), (round(pending / rate, 1) if pending else 0.0)
