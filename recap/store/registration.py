"""Registering items: deduplicated by key, cut into new chunks of the job's chunk size."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection

from recap.records import InputItem
from recap.states import ChunkState
from recap.store.core import StoreCore, chunks_t
from recap.store.jobs import JobInfo
from recap.store.new_items import ChunkCursor, copy_new_items, insert_new_items


@dataclass(slots=True)
class RegisterStats:
    read: int = 0
    new: int = 0
    duplicates: int = 0


class Registration(StoreCore):
    def register_items(
        self,
        job: JobInfo,
        batches: Iterable[list[InputItem]],
        on_batch: Callable[[RegisterStats], None] | None = None,
        limit: int | None = None,
    ) -> RegisterStats:
        """Add items deduplicated by key, cut into new chunks of the job's chunk size."""
        stats = RegisterStats()
        cursor = ChunkCursor(self._next_chunk_no(job.id), job.chunk_size)
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
        self, job: JobInfo, batch: list[InputItem], cursor: ChunkCursor, stats: RegisterStats
    ) -> None:
        unique = list({item.key: item for item in reversed(batch)}.values())[::-1]
        insert_new = copy_new_items if self.dialect == "postgresql" else insert_new_items
        with self.writer.begin() as conn:
            inserted = insert_new(conn, job.id, unique, cursor)
            self._add_to_chunks(conn, job.id, inserted)
        stats.new += sum(inserted.values())
        stats.duplicates += len(batch) - sum(inserted.values())

    def _add_to_chunks(self, conn: Connection, job_id: int, counts: Counter) -> None:
        if not counts:
            return
        stmt = self._insert(chunks_t)
        # A chunk finished between two batches of the same registration (or by an earlier
        # run) is reopened when items join it, or they would never be picked up.
        # (`==` twice, not IN: an expanding IN list cannot run in an executemany.)
        finished = (chunks_t.c.state == ChunkState.DONE) | (chunks_t.c.state == ChunkState.FAILED)
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "chunk_no"],
            set_={
                "item_count": chunks_t.c.item_count + stmt.excluded.item_count,
                "state": case((finished, ChunkState.PENDING.value), else_=chunks_t.c.state),
                "attempts": case((finished, 0), else_=chunks_t.c.attempts),
            },
        )
        conn.execute(
            stmt,
            [
                {
                    "job_id": job_id,
                    "chunk_no": chunk_no,
                    "state": ChunkState.PENDING,
                    "item_count": n,
                    "done_count": 0,
                    "failed_count": 0,
                    "attempts": 0,
                }
                for chunk_no, n in sorted(counts.items())
            ],
        )
