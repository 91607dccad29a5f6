"""Export a job's results in the Recap-DataComp-1B column layout, as parquet or JSONL,
streaming, to a local path or an fsspec URL: a path ending in `.parquet`/`.jsonl` is one
file, anything else a folder of shards `part-00000.<ext>` of `rows_per_shard` rows.

Exports are atomic: files are written under temporary names and renamed into place once
complete, so a failed export leaves the previous output intact. A folder export replaces
what recap's previous exports there left (shards it recognises by name and columns) and
refuses a non-empty folder recap did not write unless told to overwrite it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from datetime import datetime

from producer.export.folder import TEMP_MARK, is_recap_export
from producer.export.rows import STATUS_CHOICES, export_batches, statuses
from producer.export.schema import EXPORT_COLUMNS, EXPORT_SCHEMA
from producer.export.target import FORMATS, ExportTarget, resolve_target
from producer.export.writers import ExportStats, ExportWriter, open_writer
from recap.errors import RecapError
from recap.store import JobInfo, Store

__all__ = [
    "EXPORT_COLUMNS",
    "EXPORT_SCHEMA",
    "FORMATS",
    "STATUS_CHOICES",
    "TEMP_MARK",
    "ExportStats",
    "export_format",
    "export_job",
    "is_recap_export",
]


def export_format(out: str, fmt: str | None, overwrite: bool = False) -> str:
    """The export's format, once `out` is known to be writable as asked: `recap run` calls
    this before captioning, so that a bad `--out` is said before the work, not after."""
    return resolve_target(out, fmt, overwrite).fmt


def export_job(
    store: Store,
    job: JobInfo,
    out: str,
    fmt: str | None = None,
    status: str = "done",
    exclude_flags: Iterable[str] = (),
    rows_per_shard: int = 1_000_000,
    since: datetime | None = None,
    overwrite: bool = False,
) -> ExportStats:
    target = resolve_target(out, fmt, overwrite)
    batches = export_batches(store, job, statuses(status), exclude_flags, since)
    with _written_to(target):
        writer = open_writer(target, rows_per_shard)
    with _aborted_on_failure(writer):
        for batch in batches:
            with _written_to(target):
                writer.write(batch)
        with _written_to(target):
            writer.commit()
    return writer.stats


@contextlib.contextmanager
def _written_to(target: ExportTarget) -> Iterator[None]:
    """A write that fails (disk full, a size limit, a permission) is the user's one line."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise RecapError(
            f"cannot write --out {target.out}: {reason}; any earlier export there is left as it was"
        ) from None


@contextlib.contextmanager
def _aborted_on_failure(writer: ExportWriter) -> Iterator[None]:
    try:
        yield
    except BaseException:
        writer.abort()
        raise
