"""Inserting a batch of items that are new to their job, numbered into chunks: COPY and one
INSERT … SELECT on PostgreSQL, looked-up keys and batched inserts on SQLite."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from recap.records import InputItem
from recap.states import ItemStatus
from recap.store.core import chunked, items_t

# Dropped at commit: no session state survives a transaction (PgBouncer transaction mode).
_STAGING_DDL = (
    "CREATE TEMP TABLE recap_staging (ord integer, key text, url text, local boolean, "
    "org_caption text, expected_sha256 text) ON COMMIT DROP"
)
_INSERT_FROM_STAGING = f"""
WITH new AS (
    SELECT s.*, row_number() OVER (ORDER BY s.ord) - 1 AS n
    FROM recap_staging s
    WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.job_id = %(job)s AND i.key = s.key)
)
INSERT INTO items (job_id, key, chunk_no, url, local, org_caption, expected_sha256, status,
                   attempts)
SELECT %(job)s, key, %(start)s + (%(fill)s + n) / %(size)s, url, local, org_caption,
       expected_sha256, '{ItemStatus.PENDING.value}', 0
FROM new
ON CONFLICT DO NOTHING
RETURNING chunk_no
"""


class ChunkCursor:
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


def copy_new_items(conn: Connection, job_id: int, unique: list[InputItem], cursor: ChunkCursor) -> Counter:
    """PostgreSQL: COPY the batch into a staging table, then one INSERT … SELECT gives
    the new keys (not already in the job) consecutive chunk numbers. New items per chunk."""
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
                copy.write_row((ord_, item.key, item.url, item.local, item.org_caption, item.expected_sha256))
        cur.execute(
            _INSERT_FROM_STAGING,
            {"job": job_id, "start": cursor.chunk_no, "fill": cursor.fill, "size": cursor.size},
        )
        chunk_nos = [row[0] for row in cur.fetchall()]
        cursor.advance(len(chunk_nos))
        if cursor.partition_outgrew_its_statistics():
            # The partition grows faster than autovacuum analyzes it; with stale
            # statistics the planner thinks it tiny and scans all of it for every batch
            # instead of probing the primary key.
            cur.execute(f"ANALYZE items_p{int(job_id)}")
    return Counter(chunk_nos)


def insert_new_items(conn: Connection, job_id: int, unique: list[InputItem], cursor: ChunkCursor) -> Counter:
    """SQLite: look the keys up, number the new ones, insert them in batches. New items
    per chunk."""
    existing = _existing_keys(conn, job_id, [i.key for i in unique])
    rows = [
        {
            "job_id": job_id,
            "key": item.key,
            "chunk_no": cursor.take(),
            "url": item.url,
            "local": item.local,
            "org_caption": item.org_caption,
            "expected_sha256": item.expected_sha256,
            "status": ItemStatus.PENDING,
            "attempts": 0,
        }
        for item in unique
        if item.key not in existing
    ]
    inserted = Counter()
    for part in chunked(rows, 1000):
        stmt = (
            sqlite_insert(items_t)
            .on_conflict_do_nothing(index_elements=["job_id", "key"])
            .returning(items_t.c.chunk_no)
        )
        inserted.update(row[0] for row in conn.execute(stmt, part))
    return inserted


def _existing_keys(conn: Connection, job_id: int, keys: list[str]) -> set[str]:
    found: set[str] = set()
    for part in chunked(keys):
        found.update(
            conn.execute(
                select(items_t.c.key).where(items_t.c.job_id == job_id, items_t.c.key.in_(part))
            ).scalars()
        )
    return found
