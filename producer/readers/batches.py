"""`read_items`: every file of the inputs through its reader, re-cut into equal batches."""

from __future__ import annotations

import contextlib
import tarfile
import zlib
from collections.abc import Iterator

import pyarrow as pa

from producer.readers.columns import ColumnOptions
from producer.readers.discovery import sources
from producer.readers.outputs import RecapOutput
from producer.readers.registry import READERS
from producer.readers.source import InputError, Source, error_line
from producer.readers.stats import RECAP_OUTPUT, ReadStats
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
        try:
            for chunk in _read_source(src, columns, stats, batch_rows):
                stats.items += len(chunk)
                pending.extend(chunk)
                while len(pending) >= batch_rows:
                    yield pending[:batch_rows]
                    pending = pending[batch_rows:]
        except RecapOutput:  # raised before the file yields anything
            stats.skip_files(RECAP_OUTPUT)
            continue
        stats.files += 1
    if pending:
        yield pending


def _read_source(
    src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int
) -> Iterator[list[InputItem]]:
    with reading(src):
        yield from READERS[src.fmt.ext].read(src, options, stats, batch_rows)


@contextlib.contextmanager
def reading(src: Source) -> Iterator[None]:
    """A corrupt, truncated or unreadable file becomes one line naming it (exit code 2)."""
    try:
        yield
    except (InputError, RecapOutput):
        raise
    except (OSError, ValueError, EOFError, tarfile.TarError, zlib.error, pa.ArrowException) as exc:
        raise InputError(f"input {src.display}: cannot read ({error_line(exc)})") from exc
