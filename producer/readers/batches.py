"""`read_items`: every file of the inputs through its reader, re-cut into equal batches."""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator

import pyarrow as pa

from producer.readers.columns import ColumnOptions
from producer.readers.discovery import sources
from producer.readers.registry import READERS
from producer.readers.source import InputError, Source, error_line
from producer.readers.stats import ReadStats
from recap.records import InputItem


def read_items(
    inputs: list[str],
    columns: ColumnOptions = ColumnOptions(),
    batch_rows: int = 8192,
    stats: ReadStats | None = None,
) -> Iterator[list[InputItem]]:
    """Items of all inputs, in input order, in batches of `batch_rows` (the last may be
    shorter). Streams: memory holds about two batches plus one reader block. Duplicate
    keys are passed on (the database deduplicates). Fills `stats` as it goes."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    stats = stats if stats is not None else ReadStats()
    pending: list[InputItem] = []
    for src in sources(inputs, stats):
        stats.files += 1
        for chunk in _read_source(src, columns, stats, batch_rows):
            stats.items += len(chunk)
            pending.extend(chunk)
            while len(pending) >= batch_rows:
                yield pending[:batch_rows]
                pending = pending[batch_rows:]
    if pending:
        yield pending


def _read_source(
    src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int
) -> Iterator[list[InputItem]]:
    try:
        yield from READERS[src.fmt.ext].read(src, options, stats, batch_rows)
    except InputError:
        raise
    except (OSError, ValueError, EOFError, tarfile.TarError, zlib.error, pa.ArrowException) as exc:
        # A corrupt, truncated or unreadable file: one line naming it (exit code 2).
        raise InputError(f"input {src.display}: cannot read ({error_line(exc)})") from exc
