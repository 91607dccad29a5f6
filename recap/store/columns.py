"""A job's items streamed column by column, for the export."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime

from sqlalchemy import select

from recap.clock import as_utc
from recap.states import ItemStatus
from recap.store.core import StoreCore, items_t
from recap.store.jobs import JobInfo


@dataclass(slots=True)
class ItemColumns:
    """A batch of items as one list per `items` column (each field names its column): the
    export builds Arrow arrays from them with no per-row object."""

    key: list[str]
    url: list[str]
    caption: list[str | None]
    org_caption: list[str | None]
    sha256: list[str | None]
    status: list[str]
    error_class: list[str | None]
    error: list[str | None]
    width: list[int | None]
    height: list[int | None]
    model_revision: list[str | None]
    provenance_id: list[int | None]
    flags: list[list[str] | None]
    re_clip_score: list[float | None]
    org_clip_score: list[float | None]
    updated_at: list[datetime | None]  # timezone-aware UTC

    def __len__(self) -> int:
        return len(self.key)

    def take(self, rows: Sequence[int]) -> ItemColumns:
        """Only these rows, in this order."""
        return ItemColumns(*([values[i] for i in rows] for values in self._lists()))

    def _lists(self) -> list[list]:
        return [getattr(self, name) for name in COLUMN_NAMES]


COLUMN_NAMES = [f.name for f in fields(ItemColumns)]


class ItemReads(StoreCore):
    def iter_items(
        self,
        job: JobInfo,
        statuses: Sequence[ItemStatus],
        batch_rows: int = 10_000,
        since: datetime | None = None,
    ) -> Iterator[ItemColumns]:
        """Stream a job's items (with these statuses, updated at or after `since`) in key
        order over a server-side cursor, in batches of columns."""
        columns = [items_t.c[name] for name in COLUMN_NAMES]
        query = select(*columns).where(items_t.c.job_id == job.id)
        if set(statuses) != set(ItemStatus):
            query = query.where(items_t.c.status.in_(list(statuses)))
        if since is not None:
            query = query.where(items_t.c.updated_at >= since)
        query = query.order_by(items_t.c.key)
        # One transaction: the export is a consistent snapshot on PostgreSQL (REPEATABLE READ).
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                result = conn.execution_options(stream_results=True, yield_per=batch_rows).execute(query)
                for part in result.partitions(batch_rows):
                    batch = ItemColumns(*map(list, zip(*part, strict=True)))
                    batch.updated_at = [None if t is None else as_utc(t) for t in batch.updated_at]
                    yield batch
