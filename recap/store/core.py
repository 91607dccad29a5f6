"""What every part of the store shares: the tables, the engine, the database's clock and
the chunk row lock."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from recap.db import get_engine, normalise_url
from recap.schema import Chunk, Item, Job, Provenance

jobs_t = Job.__table__
chunks_t = Chunk.__table__
items_t = Item.__table__
provenances_t = Provenance.__table__

# SQLite allows 32766 bound parameters per statement; keep IN lists well under it.
IN_LIST_MAX = 5000


def chunked(seq: list, size: int = IN_LIST_MAX) -> Iterator[list]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def now_sql(conn: Connection):
    """The database's current time; with milliseconds on SQLite too (CURRENT_TIMESTAMP
    there has whole seconds only)."""
    if conn.dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d %H:%M:%f", "now")
    return func.now()


class StoreCore:
    """The connection to one database; the store's parts are built on it."""

    def __init__(self, url: str, retry_s: float = 0.0):
        self.url = normalise_url(url)
        self.retry_s = retry_s  # workers wait out a database outage; the CLI fails fast
        self.engine = get_engine(self.url)
        # Write transactions; on SQLite they take the write lock up front (BEGIN IMMEDIATE),
        # reads through `self.engine` begin deferred and never wait for the run's writes.
        self.writer = self.engine.execution_options(recap_write=True)
        self.dialect = self.engine.dialect.name

    def _insert(self, table):
        """INSERT with this dialect's ON CONFLICT clauses."""
        return postgresql.insert(table) if self.dialect == "postgresql" else sqlite.insert(table)

    def now(self, conn: Connection) -> float:
        """Epoch seconds on the database's clock: leases agree across skewed hosts."""
        if self.dialect == "postgresql":
            expr = func.extract("epoch", func.clock_timestamp())
        else:
            expr = (func.julianday("now") - 2440587.5) * 86400.0
        return float(conn.execute(select(expr)).scalar_one())

    @staticmethod
    def _lock_chunk(conn: Connection, job_id: int, chunk_no: int):
        """The chunk row, locked: always before its items (one lock order everywhere)."""
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
            .values(updated_at=now_sql(conn), **values)
        )
