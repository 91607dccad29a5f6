"""The store: every read and write of jobs, chunks and items, on PostgreSQL or SQLite.

Every write is an idempotent batch (never a round trip per item), and a `done` item is
never overwritten: a chunk delivered twice, or re-run after a crash, changes nothing that
is already done.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC

from sqlalchemy import bindparam, case, func, select, text, update
from sqlalchemy.engine import Connection

from recap.db import get_engine, normalise_url
from recap.errors import RecapError
from recap.records import InputItem, ItemResult
from recap.schema import CHUNK_STATES, ITEM_STATUSES, UNFINISHED_CHUNK_STATES, Chunk, Item, Job, Provenance
from recap.transient import retrying

jobs_t = Job.__table__
chunks_t = Chunk.__table__
items_t = Item.__table__
provenances_t = Provenance.__table__

# SQLite allows 32766 bound parameters per statement; keep IN lists well under it.
_IN_LIST_MAX = 5000


@dataclass(frozen=True, slots=True)
class JobInfo:
    id: int
    name: str
    model: str
    model_revision: str | None
    prompt: str
    generation: dict
    chunk_size: int


@dataclass(slots=True)
class RegisterStats:
    read: int = 0
    new: int = 0
    duplicates: int = 0


@dataclass(frozen=True, slots=True)
class Claim:
    claimed: bool
    reason: str = ""  # why not: done, failed, leased, exhausted, missing


@dataclass(frozen=True, slots=True)
class ChunkRef:
    job_id: int
    chunk_no: int


def _chunked(seq: list, size: int = _IN_LIST_MAX) -> Iterator[list]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


class Store:
    def __init__(self, url: str, retry_s: float = 0.0):
        self.url = normalise_url(url)
        self.retry_s = retry_s  # workers wait out a database outage; the CLI fails fast
        self.engine = get_engine(self.url)
        # Write transactions; on SQLite they take the write lock up front (BEGIN IMMEDIATE),
        # reads through `self.engine` begin deferred and never wait for the run's writes.
        self.writer = self.engine.execution_options(recap_write=True)
        self.dialect = self.engine.dialect.name

    # -- helpers ---------------------------------------------------------------------

    def _insert(self, table):
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    def now(self, conn: Connection) -> float:
        """Epoch seconds on the database's clock: leases agree across skewed hosts."""
        if self.dialect == "postgresql":
            expr = func.extract("epoch", func.clock_timestamp())
        else:
            expr = (func.julianday("now") - 2440587.5) * 86400.0
        return float(conn.execute(select(expr)).scalar_one())

    # -- jobs ------------------------------------------------------------------------

    def ensure_job(
        self,
        name: str,
        model: str,
        prompt: str,
        generation: dict,
        chunk_size: int,
        model_revision: str | None = None,
    ) -> JobInfo:
        """Create the job, or return it when it exists with the same model and prompt."""
        with self.writer.begin() as conn:
            conn.execute(
                self._insert(jobs_t)
                .values(
                    name=name,
                    model=model,
                    model_revision=model_revision,
                    prompt=prompt,
                    generation=generation,
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
        return self._job_info(row) if row else None

    def job_by_id(self, job_id: int) -> JobInfo:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs_t).where(jobs_t.c.id == job_id)).mappings().one()
        return self._job_info(row)

    def list_jobs(self) -> list[JobInfo]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs_t).order_by(jobs_t.c.id.desc())).mappings().all()
        return [self._job_info(r) for r in rows]

    @staticmethod
    def _job_info(row) -> JobInfo:
        return JobInfo(
            id=row["id"],
            name=row["name"],
            model=row["model"],
            model_revision=row["model_revision"],
            prompt=row["prompt"],
            generation=row["generation"],
            chunk_size=row["chunk_size"],
        )

    def set_model_revision(self, job_id: int, revision: str | None) -> None:
        if not revision:
            return
        with self.writer.begin() as conn:
            conn.execute(
                update(jobs_t)
                .where(jobs_t.c.id == job_id, jobs_t.c.model_revision.is_(None))
                .values(model_revision=revision)
            )

    # -- provenance ------------------------------------------------------------------

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
            for part in _chunked(wanted):
                rows = conn.execute(
                    select(provenances_t.c.id, provenances_t.c.data).where(provenances_t.c.id.in_(part))
                )
                found.update({row.id: row.data for row in rows})
        return found

    def drop_job(self, job: JobInfo) -> None:
        """Delete a job with its chunks and items; on PostgreSQL its partition is dropped
        whole (no row-by-row delete, no bloat left behind)."""
        with self.writer.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text(f"DROP TABLE IF EXISTS items_p{int(job.id)}"))
            conn.execute(items_t.delete().where(items_t.c.job_id == job.id))
            conn.execute(chunks_t.delete().where(chunks_t.c.job_id == job.id))
            conn.execute(jobs_t.delete().where(jobs_t.c.id == job.id))

    # -- registration ----------------------------------------------------------------

    def register_items(
        self,
        job: JobInfo,
        batches: Iterable[list[InputItem]],
        on_batch: Callable[[RegisterStats], None] | None = None,
        limit: int | None = None,
    ) -> RegisterStats:
        """Add items deduplicated by key, cut into new chunks of the job's chunk size."""
        stats = RegisterStats()
        cursor = _ChunkCursor(self._next_chunk_no(job.id), job.chunk_size)
        # One batch is written while the next is read: the database's time and the
        # reader's overlap. Batches are written in order (chunk numbers depend on it).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="recap-register") as writer:
            pending = None
            for batch in batches:
                if limit is not None:
                    batch = batch[: max(0, limit - stats.read)]
                if not batch:
                    break
                stats.read += len(batch)
                if pending is not None:
                    pending.result()
                    if on_batch:
                        on_batch(stats)
                pending = writer.submit(self._register_batch, job, batch, cursor, stats)
                if limit is not None and stats.read >= limit:
                    break
            if pending is not None:
                pending.result()
                if on_batch:
                    on_batch(stats)
        return stats

    def _next_chunk_no(self, job_id: int) -> int:
        with self.engine.connect() as conn:
            last = conn.execute(
                select(func.max(chunks_t.c.chunk_no)).where(chunks_t.c.job_id == job_id)
            ).scalar()
        return 0 if last is None else last + 1

    def _register_batch(
        self, job: JobInfo, batch: list[InputItem], cursor: _ChunkCursor, stats: RegisterStats
    ) -> None:
        unique = list({item.key: item for item in reversed(batch)}.values())[::-1]
        with self.writer.begin() as conn:
            if self.dialect == "postgresql":
                inserted = Counter(self._copy_new_items(conn, job, unique, cursor))
            else:
                inserted = self._insert_new_items(conn, job, unique, cursor)
            self._add_to_chunks(conn, job.id, inserted)
        stats.new += sum(inserted.values())
        stats.duplicates += len(batch) - sum(inserted.values())

    def _copy_new_items(
        self, conn: Connection, job: JobInfo, unique: list[InputItem], cursor: _ChunkCursor
    ) -> list[int]:
        """PostgreSQL: COPY the batch into a staging table, then one INSERT … SELECT gives
        the new keys (not already in the job) consecutive chunk numbers."""
        raw = conn.connection.driver_connection
        with raw.cursor() as cur:
            # A crash can lose the last batches' commit; `submit` is idempotent, so
            # running it again registers them. Not waiting for the WAL flush is worth it.
            cur.execute("SET LOCAL synchronous_commit = off")
            cur.execute(_STAGING_DDL)
            with cur.copy(
                "COPY recap_staging (ord, key, url, local, org_caption, expected_sha256) FROM STDIN"
            ) as copy:
                for ord_, item in enumerate(unique):
                    copy.write_row(
                        (ord_, item.key, item.url, item.local, item.org_caption, item.expected_sha256)
                    )
            cur.execute(
                _INSERT_FROM_STAGING,
                {"job": job.id, "start": cursor.chunk_no, "fill": cursor.fill, "size": cursor.size},
            )
            chunk_nos = [row[0] for row in cur.fetchall()]
            cursor.advance(len(chunk_nos))
            if cursor.partition_outgrew_its_statistics():
                # The partition grows faster than autovacuum analyzes it; with stale
                # statistics the planner thinks it tiny and scans all of it for every batch
                # instead of probing the primary key.
                cur.execute(f"ANALYZE items_p{int(job.id)}")
        return chunk_nos

    def _insert_new_items(
        self, conn: Connection, job: JobInfo, unique: list[InputItem], cursor: _ChunkCursor
    ) -> Counter:
        """SQLite: look the keys up, number the new ones, insert them in batches."""
        existing = self._existing_keys(conn, job.id, [i.key for i in unique])
        new_items = [i for i in unique if i.key not in existing]
        rows = [
            {
                "job_id": job.id,
                "key": item.key,
                "chunk_no": cursor.take(),
                "url": item.url,
                "local": item.local,
                "org_caption": item.org_caption,
                "expected_sha256": item.expected_sha256,
                "status": "pending",
                "attempts": 0,
            }
            for item in new_items
        ]
        inserted = Counter()
        for part in _chunked(rows, 1000):
            stmt = (
                self._insert(items_t)
                .on_conflict_do_nothing(index_elements=["job_id", "key"])
                .returning(items_t.c.chunk_no)
            )
            result = conn.execute(stmt, part)
            inserted.update(row[0] for row in result)
        return inserted

    def _existing_keys(self, conn: Connection, job_id: int, keys: list[str]) -> set[str]:
        found: set[str] = set()
        for part in _chunked(keys):
            found.update(
                conn.execute(
                    select(items_t.c.key).where(items_t.c.job_id == job_id, items_t.c.key.in_(part))
                ).scalars()
            )
        return found

    def _add_to_chunks(self, conn: Connection, job_id: int, counts: Counter) -> None:
        if not counts:
            return
        stmt = self._insert(chunks_t)
        # A chunk finished between two batches of the same registration (or by an earlier
        # run) is reopened when items join it, or they would never be picked up.
        finished = (chunks_t.c.state == "done") | (chunks_t.c.state == "failed")
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "chunk_no"],
            set_={
                "item_count": chunks_t.c.item_count + stmt.excluded.item_count,
                "state": case((finished, "pending"), else_=chunks_t.c.state),
                "attempts": case((finished, 0), else_=chunks_t.c.attempts),
            },
        )
        conn.execute(
            stmt,
            [
                {
                    "job_id": job_id,
                    "chunk_no": chunk_no,
                    "state": "pending",
                    "item_count": n,
                    "done_count": 0,
                    "failed_count": 0,
                    "attempts": 0,
                }
                for chunk_no, n in sorted(counts.items())
            ],
        )

    # -- claiming and leases ---------------------------------------------------------

    @retrying
    def claim_chunk(
        self,
        job_id: int,
        chunk_no: int,
        owner: str,
        lease_s: float,
        max_attempts: int,
        force: bool = False,
    ) -> Claim:
        """Take the lease on a chunk before working on it.

        `force` (single-machine `recap run`, which owns its database) ignores other
        owners' leases and the attempts limit.
        """
        with self.writer.begin() as conn:
            chunk = self._lock_chunk(conn, job_id, chunk_no)
            if chunk is None:
                return Claim(False, "missing")
            now = self.now(conn)
            refusal = self._claim_refusal(chunk, owner, now, max_attempts, force)
            if refusal == "exhausted":
                self._set_chunk(
                    conn,
                    job_id,
                    chunk_no,
                    state="failed",
                    lease_owner=None,
                    lease_expires_at=None,
                    last_error=f"gave up after {chunk['attempts']} attempts; last error: "
                    f"{chunk['last_error'] or 'worker died or timed out'}",
                )
            if refusal:
                return Claim(False, refusal)
            self._set_chunk(
                conn,
                job_id,
                chunk_no,
                state="running",
                lease_owner=owner,
                lease_expires_at=now + lease_s,
                attempts=chunk["attempts"] + 1,
            )
            conn.execute(
                update(jobs_t)
                .where(jobs_t.c.id == job_id, jobs_t.c.started_at.is_(None))
                .values(started_at=now)
            )
        return Claim(True)

    @staticmethod
    def _claim_refusal(chunk, owner: str, now: float, max_attempts: int, force: bool) -> str:
        if chunk["state"] == "done":
            return "done"
        lease_live = (chunk["lease_expires_at"] or 0) > now
        held_by_other = chunk["state"] == "running" and lease_live and chunk["lease_owner"] != owner
        if force:
            # `recap run` takes over what an earlier, killed `recap run` on this host left
            # running, but never a live lease of another process (a fleet worker, or a
            # second `recap run` of the same job).
            return "leased" if held_by_other and not _dead_local_owner(chunk["lease_owner"]) else ""
        if chunk["state"] == "failed":
            return "failed"
        if held_by_other:
            return "leased"
        if chunk["attempts"] >= max_attempts:
            return "exhausted"
        return ""

    def _lock_chunk(self, conn: Connection, job_id: int, chunk_no: int):
        return (
            conn.execute(
                select(chunks_t)
                .where(chunks_t.c.job_id == job_id, chunks_t.c.chunk_no == chunk_no)
                .with_for_update()
            )
            .mappings()
            .first()
        )

    @staticmethod
    def _set_chunk(conn: Connection, job_id: int, chunk_no: int, **values) -> None:
        conn.execute(
            update(chunks_t)
            .where(chunks_t.c.job_id == job_id, chunks_t.c.chunk_no == chunk_no)
            .values(updated_at=_now_sql(conn), **values)
        )

    @retrying
    def renew_lease(self, job_id: int, chunk_no: int, owner: str, lease_s: float) -> bool:
        """Extend our lease; False when the chunk is no longer ours."""
        with self.writer.begin() as conn:
            now = self.now(conn)
            result = conn.execute(
                update(chunks_t)
                .where(
                    chunks_t.c.job_id == job_id,
                    chunks_t.c.chunk_no == chunk_no,
                    chunks_t.c.lease_owner == owner,
                    chunks_t.c.state == "running",
                )
                .values(lease_expires_at=now + lease_s)
            )
        return result.rowcount == 1

    def finish_chunk(self, job_id: int, chunk_no: int, owner: str) -> str:
        """Release our lease: `done` when every item is, else back to `pending`."""
        return self.release_chunk(job_id, chunk_no, owner)

    @retrying
    def release_chunk(
        self,
        job_id: int,
        chunk_no: int,
        owner: str,
        error: str | None = None,
        count_attempt: bool = True,
    ) -> str:
        """Give a chunk back (finished, a crash in the task, or a graceful stop): `done`
        when every item is, else `pending` to be picked up again. Only the lease owner
        can; anyone else gets the chunk's state and changes nothing. `count_attempt=False`
        takes back the attempt its claim counted."""
        with self.writer.begin() as conn:
            chunk = self._lock_chunk(conn, job_id, chunk_no)
            if chunk is None:
                return "missing"
            if chunk["state"] != "running" or chunk["lease_owner"] != owner:
                return chunk["state"]  # not ours any more (lease expired and taken): hands off
            complete = chunk["done_count"] + chunk["failed_count"] >= chunk["item_count"]
            values: dict = {
                "state": "done" if complete else "pending",
                "lease_owner": None,
                "lease_expires_at": None,
            }
            if error:
                values["last_error"] = error[:2000]
            if not count_attempt:
                values["attempts"] = max(0, chunk["attempts"] - 1)
            self._set_chunk(conn, job_id, chunk_no, **values)
        return values["state"]

    # -- dispatch --------------------------------------------------------------------

    def unfinished_jobs(self, model: str | None = None) -> list[JobInfo]:
        """Jobs (of `model`) with chunks still pending, queued or running: one index probe
        per job, since every worker asks this on every feed tick."""
        open_chunks = (
            select(chunks_t.c.job_id)
            .where(chunks_t.c.job_id == jobs_t.c.id, chunks_t.c.state.in_(UNFINISHED_CHUNK_STATES))
            .exists()
        )
        query = select(jobs_t).where(open_chunks).order_by(jobs_t.c.id.desc())
        if model is not None:
            query = query.where(jobs_t.c.model == model)
        with self.engine.connect() as conn:
            return [self._job_info(r) for r in conn.execute(query).mappings()]

    def count_chunks(self, job_ids: list[int], state: str) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count())
                .select_from(chunks_t)
                .where(chunks_t.c.job_id.in_(job_ids), chunks_t.c.state == state)
            ).scalar_one()

    @retrying
    def take_chunks_to_enqueue(
        self,
        job_ids: list[int],
        room: int,
        lost: int,
        send: Callable[[list[ChunkRef]], None],
        lock_key: str | None = None,
    ) -> list[ChunkRef]:
        """Mark chunks `queued` and send their messages, in one transaction.

        In order: chunks whose lease expired (their worker died), the oldest `lost` queued
        chunks (their message is gone, e.g. Redis was emptied), then pending chunks, up to
        `room`. Rows are taken with FOR UPDATE SKIP LOCKED, so two dispatchers never take
        the same chunk; a failed send rolls the marks back. A chunk sent twice is harmless:
        the second delivery finds it claimed or done.
        """
        if room <= 0 or not job_ids:
            return []
        with self.writer.begin() as conn:
            if (
                self.dialect == "postgresql"
                and lock_key
                and not conn.execute(
                    text("SELECT pg_try_advisory_xact_lock(hashtext(:k))"), {"k": lock_key}
                ).scalar()
            ):
                return []  # another dispatcher is topping this queue up right now
            now = self.now(conn)
            base = chunks_t.c.job_id.in_(job_ids)
            wanted = [
                (
                    base & (chunks_t.c.state == "running") & (chunks_t.c.lease_expires_at < now),
                    chunks_t.c.lease_expires_at,
                    room,
                ),
                (base & (chunks_t.c.state == "queued"), chunks_t.c.queued_at, min(lost, room)),
                (base & (chunks_t.c.state == "pending"), chunks_t.c.chunk_no, room),
            ]
            refs: list[ChunkRef] = []
            for condition, order, limit in wanted:
                limit = min(limit, room - len(refs))
                if limit > 0:
                    refs += self._lock_some(conn, condition, order, limit)
            if not refs:
                return []
            for ref in refs:
                self._set_chunk(conn, ref.job_id, ref.chunk_no, state="queued", queued_at=now)
            send(refs)
        return refs

    def _lock_some(self, conn: Connection, condition, order, limit: int) -> list[ChunkRef]:
        rows = conn.execute(
            select(chunks_t.c.job_id, chunks_t.c.chunk_no)
            .where(condition)
            .order_by(order)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        return [ChunkRef(r.job_id, r.chunk_no) for r in rows]

    # -- items -----------------------------------------------------------------------

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
                    items_t.c.status == "pending",
                )
                .order_by(items_t.c.key)
            ).all()
        return [InputItem(r.key, r.url, r.org_caption, r.expected_sha256, bool(r.local)) for r in rows]

    @retrying
    def write_results(
        self,
        job_id: int,
        chunk_no: int,
        results: list[ItemResult],
        model_revision: str | None = None,
        provenance_id: int | None = None,
    ) -> int:
        """Write a batch of final results; returns how many items changed. Done items
        record the model revision and provenance (`provenance_id`) they were made with.

        The chunk row is locked first (the same order everywhere), then the items; a done
        item is never overwritten and the chunk's counters move by the real transitions.
        """
        if not results:
            return 0
        results = list({r.key: r for r in results}.values())  # a key once, or counters drift
        with self.writer.begin() as conn:
            chunk = self._lock_chunk(conn, job_id, chunk_no)
            if chunk is None:
                return 0
            before = self._item_states(conn, job_id, [r.key for r in results])
            to_write = [r for r in results if r.key in before and before[r.key][0] != "done"]
            self._update_items(conn, job_id, to_write, model_revision, provenance_id)
            self._move_counters(conn, chunk, to_write, before)
        return len(to_write)

    def _item_states(
        self, conn: Connection, job_id: int, keys: list[str]
    ) -> dict[str, tuple[str, str | None]]:
        states: dict[str, tuple[str, str | None]] = {}
        for part in _chunked(keys):
            rows = conn.execute(
                select(items_t.c.key, items_t.c.status, items_t.c.error_class)
                .where(items_t.c.job_id == job_id, items_t.c.key.in_(part))
                .with_for_update()
            )
            states.update({r.key: (r.status, r.error_class) for r in rows})
        return states

    def _update_items(
        self,
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
                items_t.c.status != "done",
            )
            .values(
                **{name: bindparam(f"b_{name}") for name in _RESULT_FIELDS},
                model_revision=bindparam("b_model_revision"),
                provenance_id=bindparam("b_provenance_id"),
                attempts=items_t.c.attempts + 1,
                updated_at=_now_sql(conn),
            )
        )
        rows = [
            {
                "b_key": r.key,
                "b_model_revision": model_revision if r.status == "done" else None,
                "b_provenance_id": provenance_id if r.status == "done" else None,
                **{f"b_{name}": getattr(r, name) for name in _RESULT_FIELDS},
            }
            for r in results
        ]
        conn.execute(stmt, rows)

    def _move_counters(self, conn: Connection, chunk, results: list[ItemResult], before) -> None:
        if not results:
            return
        done, failed = chunk["done_count"], chunk["failed_count"]
        errors = Counter(chunk["error_counts"] or {})
        for r in results:
            old_status, old_class = before[r.key]
            if old_status == "failed":
                failed -= 1
                errors[old_class] -= 1
            if r.status == "done":
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
            error_counts={k: v for k, v in errors.items() if v > 0} or None,
        )

    # -- retry -----------------------------------------------------------------------

    def retry_failed(self, job: JobInfo, error_classes: list[str]) -> tuple[int, list[int]]:
        """Failed items of these classes back to `pending`, and chunks that gave up after
        their attempts reopened; returns (items, chunk numbers). One short transaction per
        chunk: workers writing to other chunks never wait for a long retry."""
        with self.engine.connect() as conn:
            candidates = conn.execute(
                select(chunks_t.c.chunk_no, chunks_t.c.state, chunks_t.c.error_counts).where(
                    chunks_t.c.job_id == job.id,
                    (chunks_t.c.failed_count > 0) | (chunks_t.c.state == "failed"),
                )
            ).all()
        chunk_nos = [
            c.chunk_no
            for c in candidates
            if c.state == "failed" or any((c.error_counts or {}).get(cls) for cls in error_classes)
        ]
        total = 0
        for chunk_no in chunk_nos:
            with self.writer.begin() as conn:
                total += self._retry_chunk(conn, job.id, chunk_no, error_classes)
        return total, chunk_nos

    def _retry_chunk(self, conn: Connection, job_id: int, chunk_no: int, classes: list[str]) -> int:
        chunk = self._lock_chunk(conn, job_id, chunk_no)
        result = conn.execute(
            update(items_t)
            .where(
                items_t.c.job_id == job_id,
                items_t.c.chunk_no == chunk_no,
                items_t.c.status == "failed",
                items_t.c.error_class.in_(classes),
            )
            .values(status="pending", error_class=None, error=None, updated_at=_now_sql(conn))
        )
        errors = Counter(chunk["error_counts"] or {})
        for cls in classes:
            errors.pop(cls, None)
        state = chunk["state"] if chunk["state"] == "running" else "pending"
        self._set_chunk(
            conn,
            job_id,
            chunk_no,
            state=state,
            attempts=0,
            last_error=None,
            failed_count=chunk["failed_count"] - result.rowcount,
            error_counts=dict(errors) or None,
        )
        return result.rowcount

    # -- status ----------------------------------------------------------------------

    def job_status(self, job: JobInfo) -> dict:
        """DESIGN.md's status object, from the per-chunk counters only."""
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
            error_rows = conn.execute(
                select(chunks_t.c.error_counts).where(
                    chunks_t.c.job_id == job.id, chunks_t.c.failed_count > 0
                )
            ).scalars()
            errors = Counter()
            for counts in error_rows:
                errors.update(counts or {})
            started_at = conn.execute(select(jobs_t.c.started_at).where(jobs_t.c.id == job.id)).scalar()
            now = self.now(conn)
            last_write = self._last_write(conn, job.id)
        chunks = {state: 0 for state in CHUNK_STATES}
        total = done = failed = 0
        for state, n, items, d, f in rows:
            chunks[state] = int(n)
            total, done, failed = total + int(items), done + int(d), failed + int(f)
        pending = total - done - failed
        rate, eta = _rate_and_eta(done + failed, pending, started_at, now, last_write)
        return {
            "job": job.name,
            "model": job.model,
            "items": {"total": total, "pending": pending, "done": done, "failed": failed},
            "errors": dict(sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))),
            "chunks": chunks,
            "rate_per_s": rate,
            "eta_s": eta,
        }

    def _last_write(self, conn: Connection, job_id: int) -> float | None:
        """Epoch seconds of the newest chunk update (the end of a finished job)."""
        newest = conn.execute(
            select(func.max(chunks_t.c.updated_at)).where(
                chunks_t.c.job_id == job_id, chunks_t.c.state.in_(["done", "failed"])
            )
        ).scalar()
        if newest is None:
            return None
        if isinstance(newest, str):  # SQLite without type info on aggregates
            from datetime import datetime

            newest = datetime.fromisoformat(newest)
            if newest.tzinfo is None:
                newest = newest.replace(tzinfo=UTC)
        elif newest.tzinfo is None:
            newest = newest.replace(tzinfo=UTC)
        return newest.timestamp()

    def chunk_states(self, job_id: int, states: Iterable[str]) -> list[int]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(chunks_t.c.chunk_no)
                    .where(chunks_t.c.job_id == job_id, chunks_t.c.state.in_(list(states)))
                    .order_by(chunks_t.c.chunk_no)
                ).scalars()
            )

    def leases(self, job_id: int | None = None) -> list[dict]:
        """Running chunks with their owners and seconds left on the lease."""
        with self.engine.connect() as conn:
            now = self.now(conn)
            query = select(
                chunks_t.c.job_id,
                chunks_t.c.chunk_no,
                chunks_t.c.lease_owner,
                chunks_t.c.lease_expires_at,
            ).where(chunks_t.c.state == "running")
            if job_id is not None:
                query = query.where(chunks_t.c.job_id == job_id)
            rows = conn.execute(query).all()
        return [
            {
                "job_id": r.job_id,
                "chunk_no": r.chunk_no,
                "owner": r.lease_owner,
                "expires_in_s": round((r.lease_expires_at or now) - now, 1),
            }
            for r in rows
        ]

    # -- export ----------------------------------------------------------------------

    def iter_items(
        self,
        job: JobInfo,
        statuses: list[str],
        batch_rows: int = 10_000,
        since=None,
    ) -> Iterator[dict[str, list]]:
        """Stream a job's items in key order over a server-side cursor, in column-wise
        batches ({column: values}): the export builds Arrow arrays from them directly."""
        columns = [
            items_t.c.key,
            items_t.c.url,
            items_t.c.caption,
            items_t.c.org_caption,
            items_t.c.sha256,
            items_t.c.status,
            items_t.c.error_class,
            items_t.c.error,
            items_t.c.width,
            items_t.c.height,
            items_t.c.model_revision,
            items_t.c.provenance_id,
            items_t.c.flags,
            items_t.c.updated_at,
        ]
        query = select(*columns).where(items_t.c.job_id == job.id)
        if set(statuses) != set(ITEM_STATUSES):
            query = query.where(items_t.c.status.in_(statuses))
        if since is not None:
            query = query.where(items_t.c.updated_at >= since)
        query = query.order_by(items_t.c.key)
        # One transaction: the export is a consistent snapshot on PostgreSQL (REPEATABLE READ).
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                result = conn.execution_options(stream_results=True, yield_per=batch_rows).execute(query)
                names = [c.name for c in columns]
                for part in result.partitions(batch_rows):
                    yield dict(zip(names, map(list, zip(*part))))


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
)
_PARTITION_DDL = (
    "CREATE TABLE IF NOT EXISTS items_p{id} PARTITION OF items FOR VALUES IN ({id}) "
    "WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, "
    "autovacuum_analyze_scale_factor = 0.02)"
)
# Dropped at commit: no session state survives a transaction (PgBouncer transaction mode).
_STAGING_DDL = (
    "CREATE TEMP TABLE recap_staging (ord integer, key text, url text, local boolean, "
    "org_caption text, expected_sha256 text) ON COMMIT DROP"
)
_INSERT_FROM_STAGING = """
WITH new AS (
    SELECT s.*, row_number() OVER (ORDER BY s.ord) - 1 AS n
    FROM recap_staging s
    WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.job_id = %(job)s AND i.key = s.key)
)
INSERT INTO items (job_id, key, chunk_no, url, local, org_caption, expected_sha256, status,
                   attempts)
SELECT %(job)s, key, %(start)s + (%(fill)s + n) / %(size)s, url, local, org_caption,
       expected_sha256, 'pending', 0
FROM new
ON CONFLICT DO NOTHING
RETURNING chunk_no
"""


def _dead_local_owner(owner: str | None) -> bool:
    """True for `recap-local-<pid>@<this host>` whose process is gone."""
    import os
    import re
    import socket

    match = re.fullmatch(r"recap-local-(\d+)@(.+)", owner or "")
    if not match or match.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _now_sql(conn: Connection):
    """The database's current time; with milliseconds on SQLite too (CURRENT_TIMESTAMP
    there has whole seconds only)."""
    if conn.dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d %H:%M:%f", "now")
    return func.now()


class _ChunkCursor:
    """Hands out chunk numbers for new items, `size` per chunk."""

    def __init__(self, first_chunk_no: int, size: int):
        self.chunk_no = first_chunk_no
        self.size = size
        self.fill = 0
        self.added = 0
        self.analyzed_at = 0

    def partition_outgrew_its_statistics(self) -> bool:
        """True after the first 10k items this run, then each time they double."""
        if self.added >= max(10_000, 2 * self.analyzed_at):
            self.analyzed_at = self.added
            return True
        return False

    def take(self) -> int:
        if self.fill == self.size:
            self.chunk_no += 1
            self.fill = 0
        self.fill += 1
        return self.chunk_no

    def advance(self, n: int) -> None:
        """Account for `n` items numbered in SQL as chunk_no + (fill + i) // size."""
        total = self.fill + n
        self.added += n
        self.chunk_no += total // self.size
        self.fill = total % self.size


def _rate_and_eta(
    processed: int, pending: int, started_at: float | None, now: float, last_write: float | None
) -> tuple[float | None, float | None]:
    if not started_at or processed == 0:
        return None, None
    end = now if pending else (last_write or now)
    elapsed = max(end - started_at, 1e-3)
    rate = processed / elapsed
    return round(rate, 3), (round(pending / rate, 1) if pending else 0.0)
