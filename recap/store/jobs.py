"""Jobs (each owns its model, prompt and generation settings) and provenance rows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select, text, update

from recap.errors import RecapError
from recap.generation import GenerationSettings
from recap.states import JobState
from recap.store.core import StoreCore, chunked, chunks_t, items_t, jobs_t, provenances_t
from recap.transient import retrying

# One partition of `items` per job (PostgreSQL), update-heavy like the parent table.
_PARTITION_DDL = (
    "CREATE TABLE IF NOT EXISTS items_p{id} PARTITION OF items FOR VALUES IN ({id}) "
    "WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, "
    "autovacuum_analyze_scale_factor = 0.02)"
)


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A job, with the model, prompt and generation settings it owns (its identity)."""

    id: int
    name: str
    model: str
    prompt: str
    generation: GenerationSettings
    chunk_size: int
    state: JobState = JobState.RUNNING
    priority: int = 0  # larger runs first


def job_info(row) -> JobInfo:
    """A `jobs` row (a mapping) as a JobInfo."""
    return JobInfo(
        id=row["id"],
        name=row["name"],
        model=row["model"],
        prompt=row["prompt"],
        generation=GenerationSettings.from_json(row["generation"]),
        chunk_size=row["chunk_size"],
        state=JobState(row["state"]),
        priority=row["priority"],
    )


class Jobs(StoreCore):
    def ensure_job(
        self, name: str, model: str, prompt: str, generation: GenerationSettings, chunk_size: int
    ) -> JobInfo:
        """Create the job, or return it when it exists with the same model and prompt."""
        with self.writer.begin() as conn:
            conn.execute(
                self._insert(jobs_t)
                .values(
                    name=name,
                    model=model,
                    prompt=prompt,
                    generation=generation.to_json(),
                    chunk_size=chunk_size,
                )
                .on_conflict_do_nothing(index_elements=["name"])
            )
            if self.dialect == "postgresql":
                job_id = conn.execute(select(jobs_t.c.id).where(jobs_t.c.name == name)).scalar_one()
                conn.execute(text(_PARTITION_DDL.format(id=int(job_id))))
        job = self.get_job(name)
        if job.model != model or job.prompt != prompt or job.generation != generation:
            raise RecapError(
                f"job {name!r} already exists with model {job.model!r} and its own prompt and "
                "generation settings; a job owns them: pick another --job name"
            )
        return job

    def get_job(self, name: str) -> JobInfo:
        job = self.find_job(name)
        if job is None:
            raise RecapError(f"no job named {name!r} (see `recap status` for the jobs)")
        return job

    def find_job(self, name: str) -> JobInfo | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs_t).where(jobs_t.c.name == name)).mappings().first()
        return job_info(row) if row else None

    def job_by_id(self, job_id: int) -> JobInfo:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs_t).where(jobs_t.c.id == job_id)).mappings().one()
        return job_info(row)

    def list_jobs(self) -> list[JobInfo]:
        """Every job, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs_t).order_by(jobs_t.c.id.desc())).mappings().all()
        return [job_info(r) for r in rows]

    def set_job_state(self, job: JobInfo, state: JobState) -> JobState:
        """Pause, resume or cancel a job (its state, in the database: it survives worker and
        broker restarts); a cancelled job stays cancelled. Returns the state it now has."""
        with self.writer.begin() as conn:
            values: dict = {"state": state}
            if state is JobState.CANCELLED:
                values["finished_at"] = self.now(conn)
            conn.execute(
                update(jobs_t)
                .where(jobs_t.c.id == job.id, jobs_t.c.state != JobState.CANCELLED)
                .values(**values)
            )
            return JobState(conn.execute(select(jobs_t.c.state).where(jobs_t.c.id == job.id)).scalar_one())

    def set_priority(self, job: JobInfo, priority: int) -> None:
        with self.writer.begin() as conn:
            conn.execute(update(jobs_t).where(jobs_t.c.id == job.id).values(priority=priority))

    def drop_job(self, job: JobInfo) -> None:
        """Delete a job with its chunks and items; on PostgreSQL its partition is dropped
        whole (no row-by-row delete, no bloat left behind)."""
        with self.writer.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text(f"DROP TABLE IF EXISTS items_p{int(job.id)}"))
            conn.execute(items_t.delete().where(items_t.c.job_id == job.id))
            conn.execute(chunks_t.delete().where(chunks_t.c.job_id == job.id))
            conn.execute(jobs_t.delete().where(jobs_t.c.id == job.id))

    @retrying
    def provenance_id(self, data: dict) -> int:
        """The id of this engine set-up's provenance row, made on first use (any number of
        workers may race to make it: the digest is unique)."""
        canonical = json.dumps(data, sort_keys=True, default=str)
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        with self.writer.begin() as conn:
            insert = self._insert(provenances_t).values(digest=digest, data=json.loads(canonical))
            conn.execute(insert.on_conflict_do_nothing(index_elements=["digest"]))
            return conn.execute(
                select(provenances_t.c.id).where(provenances_t.c.digest == digest)
            ).scalar_one()

    def provenances(self, ids: Iterable[int]) -> dict[int, dict]:
        """Provenance rows by id (the export looks up the few a job's items name)."""
        wanted = sorted(set(ids))
        found: dict[int, dict] = {}
        with self.engine.connect() as conn:
            for part in chunked(wanted):
                rows = conn.execute(
                    select(provenances_t.c.id, provenances_t.c.data).where(provenances_t.c.id.in_(part))
                )
                found.update({row.id: row.data for row in rows})
        return found
