"""The store: every read and write of jobs, chunks and items, on PostgreSQL or SQLite.

Every write is an idempotent batch (never a round trip per item), and a `done` item is
never overwritten: a chunk delivered twice, or re-run after a crash, changes nothing that
is already done. One `Store` object; its parts live in one module each:

- `jobs`: jobs and provenance rows;
- `registration` and `new_items`: items registered deduplicated and numbered into chunks;
- `claims` and `lease`: claiming a chunk, and the handle on its lease;
- `enqueue`: the chunks the dispatcher sends;
- `results`: pending items out, results in, failed items retried;
- `status` and `columns`: how a job stands, and its items streamed for the export.
"""

from __future__ import annotations

from recap.store.claims import Claims, Refused
from recap.store.columns import COLUMN_NAMES, ItemColumns, ItemReads
from recap.store.enqueue import ChunkRef, Enqueue
from recap.store.forget import Forget
from recap.store.jobs import JobInfo, Jobs
from recap.store.lease import ClaimedChunk
from recap.store.registration import RegisterStats, Registration
from recap.store.report import Reports
from recap.store.results import Results, Retried
from recap.store.status import ChunkCounts, ItemCounts, JobStatus, Lease, Status


class Store(Jobs, Registration, Claims, Enqueue, Results, Status, ItemReads, Reports, Forget):
    """One database's jobs, chunks and items: `Store(url)`, with `retry_s` seconds of
    waiting out a database outage in the methods workers call (0: fail at once)."""


__all__ = [
    "COLUMN_NAMES",
    "ChunkCounts",
    "ChunkRef",
    "ClaimedChunk",
    "ItemColumns",
    "ItemCounts",
    "JobInfo",
    "JobStatus",
    "Lease",
    "Refused",
    "RegisterStats",
    "Retried",
    "Store",
]
