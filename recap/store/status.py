"""How a job stands, from the per-chunk counters only (never a scan of its items): the
status object of docs/ARCHITECTURE.md ("Contracts"), chunk states and running leases."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from recap.clock import as_utc
from recap.states import ChunkState, JobState
from recap.store.core import StoreCore, chunks_t, jobs_t
from recap.store.jobs import JobInfo


@dataclass(frozen=True, slots=True)
class ItemCounts:
    total: int = 0
    pending: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0  # pending when their job was cancelled (not counted in `pending`)


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
    state: JobState = JobState.RUNNING
    priority: int = 0
    time: JobTime = field(default_factory=lambda: JobTime())

    def to_json(self) -> dict:
        """The `status --json` object (docs/ARCHITECTURE.md, "Contracts"): the counts, then
        the job's state, priority and time; `pending` excludes cancelled items."""
        return {
            **self._counts_json(),
            "state": self.state.value,
            "priority": self.priority,
            **self.time.to_json(),
        }

    def _counts_json(self) -> dict:
        items = asdict(self.items)
        return {
            "job": self.job,
            "model": self.model,
            "items": items,
            "errors": dict(self.errors),
            "chunks": asdict(self.chunks),
            "rate_per_s": self.rate_per_s,
            "eta_s": self.eta_s,
        }


@dataclass(frozen=True, slots=True)
class JobTime:
    """The engine time a job took (summed over workers, any device), its wall time, and
    what they cost at `gpu_hour_cost` per GPU-hour (RECAP_GPU_HOUR_COST; None: unpriced)."""

    engine_seconds: float = 0.0
    wall_s: float | None = None  # from the first claim to the end (or now)
    done: int = 0
    processed: int = 0  # done and failed items: the engine time is theirs
    pending: int = 0
    gpu_hour_cost: float | None = None

    @property
    def gpu_hours(self) -> float:
        return self.engine_seconds / 3600.0

    @property
    def images_per_gpu_hour(self) -> float | None:
        return round(self.done / self.gpu_hours, 1) if self.engine_seconds > 0 else None

    @property
    def cost_so_far(self) -> float | None:
        return None if self.gpu_hour_cost is None else round(self.gpu_hours * self.gpu_hour_cost, 4)

    @property
    def cost_to_finish(self) -> float | None:
        """The engine time per item so far, times the items pending, priced."""
        if self.gpu_hour_cost is None or self.processed == 0:
            return None
        hours_left = self.gpu_hours / self.processed * self.pending
        return round(hours_left * self.gpu_hour_cost, 4)

    def to_json(self) -> dict:
        return {
            "engine_seconds": round(self.engine_seconds, 6),
            "gpu_hours": self.gpu_hours,
            "images_per_gpu_hour": self.images_per_gpu_hour,
            "wall_s": self.wall_s,
            "cost_so_far": self.cost_so_far,
            "cost_to_finish": self.cost_to_finish,
        }


@dataclass(frozen=True, slots=True)
class Lease:
    """A running chunk, who holds it, and for how much longer."""

    job_id: int
    chunk_no: int
    owner: str | None
    expires_in_s: float


class Status(StoreCore):
    def job_status(self, job: JobInfo, gpu_hour_cost: float | None = None) -> JobStatus:
        """How the job stands now; costs priced at `gpu_hour_cost` (RECAP_GPU_HOUR_COST)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    chunks_t.c.state,
                    func.count(),
                    func.coalesce(func.sum(chunks_t.c.item_count), 0),
                    func.coalesce(func.sum(chunks_t.c.done_count), 0),
                    func.coalesce(func.sum(chunks_t.c.failed_count), 0),
                    func.coalesce(func.sum(chunks_t.c.cancelled_count), 0),
                )
                .where(chunks_t.c.job_id == job.id)
                .group_by(chunks_t.c.state)
            ).all()
            errors = _error_counts(conn, job.id)
            row = conn.execute(select(jobs_t).where(jobs_t.c.id == job.id)).mappings().one()
            now = self.now(conn)
            last_write = _last_write(conn, job.id)
        chunks = dict.fromkeys(ChunkState, 0)
        total = done = failed = cancelled = 0
        for state, n, items, d, f, c in rows:
            chunks[ChunkState(state)] = int(n)
            total, done, failed, cancelled = (
                total + int(items),
                done + int(d),
                failed + int(f),
                cancelled + int(c),
            )
        pending = total - done - failed - cancelled
        started_at = row["started_at"]
        rate, eta = _rate_and_eta(done + failed, pending, started_at, now, last_write)
        end = row["finished_at"] or (now if pending else (last_write or now))
        return JobStatus(
            job=job.name,
            model=job.model,
            items=ItemCounts(total=total, pending=pending, done=done, failed=failed, cancelled=cancelled),
            errors=dict(sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))),
            chunks=ChunkCounts(**{state.value: n for state, n in chunks.items()}),
            rate_per_s=rate,
            eta_s=eta,
            state=JobState(row["state"]),
            priority=row["priority"],
            time=JobTime(
                engine_seconds=row["engine_seconds"] or 0.0,
                wall_s=None if not started_at else round(max(end - started_at, 0.0), 1),
                done=done,
                processed=done + failed,
                pending=pending,
                gpu_hour_cost=gpu_hour_cost,
            ),
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
