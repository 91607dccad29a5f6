"""What `recap report` reads: a random sample of a job's items, a few failed examples per
error class, and finished items over time. Every query is bounded, whatever the job's size:
samples come from `TABLESAMPLE` on PostgreSQL (the job's partition is pruned by `job_id`) and
from `ORDER BY random()` on SQLite (one machine's job); failed examples are looked up in the
few chunks whose counters name their class; throughput is grouped from the chunk rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Integer, cast, func, or_, select, tablesample
from sqlalchemy.engine import Connection

from recap.clock import as_utc
from recap.states import ItemStatus
from recap.store.core import StoreCore, chunks_t, items_t
from recap.store.forget import BLOCKED, REMOVED
from recap.store.jobs import JobInfo

# Per-item scores (docs/ARCHITECTURE.md, "Contracts", export columns), read when the schema has them.
SCORE_COLUMNS = ("re_clip_score", "org_clip_score")
FAILED_CHUNKS_PER_CLASS = 3  # chunks searched for a class's examples (found through the counters)
THROUGHPUT_POINTS = 60  # at most this many time buckets


@dataclass(frozen=True, slots=True)
class SampledItem:
    """One item of the sample, with what the report shows beside its image."""

    key: str
    url: str
    local: bool  # a file:// or tar:// source (see InputItem.local)
    caption: str | None
    org_caption: str | None
    flags: list[str]
    width: int | None
    height: int | None
    provenance_id: int | None
    updated_at: datetime | None
    scores: dict[str, float] = field(default_factory=dict)  # SCORE_COLUMNS the item has a value for


@dataclass(frozen=True, slots=True)
class FailedExample:
    key: str
    url: str
    error_class: str
    error: str | None


@dataclass(frozen=True, slots=True)
class ThroughputPoint:
    """Items written in the bucket starting at `start` (epoch seconds), `width_s` wide."""

    start: float
    width_s: float
    items: int

    @property
    def per_minute(self) -> float:
        return self.items * 60.0 / self.width_s


def _score_columns() -> list[str]:
    return [name for name in SCORE_COLUMNS if name in items_t.c]


class Reports(StoreCore):
    def sample_items(self, job: JobInfo, n: int, expected: int) -> list[SampledItem]:
        """Up to `n` random done items; `expected` (done items, from the chunk counters)
        sizes the PostgreSQL sample so that it reads about 10n rows, not the job."""
        if n <= 0 or expected <= 0:
            return []
        with self.engine.connect() as conn:
            if self.dialect != "postgresql":
                return self._sample(conn, items_t, job, n)
            percent = min(100.0, 100.0 * 10 * n / expected)
            while True:  # SYSTEM samples pages: a clustered job may need a larger share
                rows = self._sample(conn, tablesample(items_t, func.system(percent)), job, n)
                if len(rows) >= n or percent >= 100.0:
                    return rows
                percent = min(100.0, percent * 10)

    def _sample(self, conn: Connection, source, job: JobInfo, n: int) -> list[SampledItem]:
        scores = _score_columns()
        names = ["key", "url", "local", "caption", "org_caption", "flags", "width", "height"]
        names += ["provenance_id", "updated_at", *scores]
        query = (
            select(*(source.c[name] for name in names))
            .where(source.c.job_id == job.id, source.c.status == ItemStatus.DONE)
            .order_by(func.random())
            .limit(n)
        )
        return [
            SampledItem(
                key=row.key,
                url=row.url,
                local=bool(row.local),
                caption=row.caption,
                org_caption=row.org_caption,
                flags=list(row.flags or []),
                width=row.width,
                height=row.height,
                provenance_id=row.provenance_id,
                updated_at=None if row.updated_at is None else as_utc(row.updated_at),
                scores={s: float(row._mapping[s]) for s in scores if row._mapping[s] is not None},
            )
            for row in conn.execute(query)
        ]

    def failed_examples(self, job: JobInfo, classes: Sequence[str], per_class: int) -> list[FailedExample]:
        """Up to `per_class` failed items of each class, from a few chunks whose counters
        name the class (the chunk index bounds each lookup)."""
        found: list[FailedExample] = []
        with self.engine.connect() as conn:
            counted = conn.execution_options(stream_results=True, yield_per=1000).execute(
                select(chunks_t.c.chunk_no, chunks_t.c.error_counts)
                .where(chunks_t.c.job_id == job.id, chunks_t.c.failed_count > 0)
                .order_by(chunks_t.c.chunk_no)
            )
            chunks_by_class: dict[str, list[int]] = {c: [] for c in classes}
            for chunk_no, counts in counted:
                for name in counts or {}:
                    where = chunks_by_class.get(name)
                    if where is not None and len(where) < FAILED_CHUNKS_PER_CLASS:
                        where.append(chunk_no)
                if all(len(v) >= FAILED_CHUNKS_PER_CLASS for v in chunks_by_class.values()):
                    break
            for name, chunk_nos in chunks_by_class.items():
                found += self._failed_in(conn, job, name, chunk_nos, per_class)
        return found

    @staticmethod
    def _failed_in(
        conn: Connection, job: JobInfo, error_class: str, chunk_nos: list[int], limit: int
    ) -> list[FailedExample]:
        if not chunk_nos:
            return []
        rows = conn.execute(
            select(items_t.c.key, items_t.c.url, items_t.c.error)
            .where(
                items_t.c.job_id == job.id,
                items_t.c.chunk_no.in_(chunk_nos),
                items_t.c.status == ItemStatus.FAILED,
                items_t.c.error_class == error_class,
                # removed or refused on request: a report never shows them
                or_(items_t.c.error.is_(None), items_t.c.error.notin_([REMOVED, BLOCKED])),
            )
            .order_by(items_t.c.key)
            .limit(limit)
        )
        return [FailedExample(r.key, r.url, error_class, r.error) for r in rows]

    def throughput(self, job: JobInfo) -> list[ThroughputPoint]:
        """Items written over time, from each chunk's counters at its last update: at most
        THROUGHPUT_POINTS buckets of a whole number of seconds (a minute where it spans hours)."""
        epoch = self._epoch(chunks_t.c.updated_at)
        written = chunks_t.c.done_count + chunks_t.c.failed_count
        mine = (chunks_t.c.job_id == job.id, written > 0)
        with self.engine.connect() as conn:
            first, last = conn.execute(select(func.min(epoch), func.max(epoch)).where(*mine)).one()
            if first is None:
                return []
            width = _bucket_width(float(last) - float(first))
            bucket = self._whole((epoch - float(first)) / width)
            rows = conn.execute(
                select(bucket.label("b"), func.sum(written)).where(*mine).group_by("b").order_by("b")
            ).all()
        return [ThroughputPoint(float(first) + int(b) * width, width, int(n)) for b, n in rows]

    def _whole(self, value):
        """floor() of a non-negative number (SQLite may lack math functions; its CAST truncates)."""
        return func.floor(value) if self.dialect == "postgresql" else cast(value, Integer)

    def _epoch(self, column):
        if self.dialect == "postgresql":
            return func.extract("epoch", column)
        return (func.julianday(column) - 2440587.5) * 86400.0


def _bucket_width(span_s: float) -> float:
    """Seconds per bucket: whole seconds below a minute's buckets, whole minutes above."""
    width = max(1.0, -(-span_s // (THROUGHPUT_POINTS - 1)))
    return width if width < 60 else 60.0 * -(-width // 60)
