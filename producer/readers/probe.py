"""The start of every input file read before anything is registered: a CSV without the URL
column, a file that is not a tar, a gzip or parquet file that is not one fails the command
while nothing is written yet. What shows only further in (a .gz cut short) is found when
the file is read in full, by the registration."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from producer.readers.batches import reading
from producer.readers.columns import ColumnOptions, resolve_columns
from producer.readers.discovery import sources
from producer.readers.images import IMAGE_EXTENSIONS
from producer.readers.outputs import RecapOutput, is_export_columns
from producer.readers.registry import READERS
from producer.readers.source import Source
from producer.readers.stats import ReadStats

# Files opened at once: object stores answer each open in tens of milliseconds, and an
# input may be thousands of files.
PROBE_THREADS = 16


def probe_inputs(inputs: list[str], columns: ColumnOptions) -> None:
    """Open every file of the inputs and read its header (or its first row): an `InputError`
    naming the first bad file, in input order. Image files are not opened (the workers
    read them; a bad one fails as an item)."""
    tables = (src for src in sources(inputs, ReadStats()) if src.fmt.ext not in IMAGE_EXTENSIONS)
    with ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="recap-probe") as pool:
        for _ in pool.map(lambda src: _probe(src, columns), tables):
            pass


def _probe(src: Source, columns: ColumnOptions) -> None:
    with reading(src):
        try:
            if src.fmt.ext == ".parquet":
                _parquet_header(src, columns)
            else:
                _first_rows(src, columns)
        except RecapOutput:
            pass  # skipped when read, as it is here


def _parquet_header(src: Source, columns: ColumnOptions) -> None:
    """A parquet file's footer and columns, never its row groups (they can be large)."""
    with src.open_binary(decompress=False) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    if not (src.found and is_export_columns(names)):  # an export found is skipped, not checked
        resolve_columns(names, columns, src.display)


def _first_rows(src: Source, columns: ColumnOptions) -> None:
    """The reader's first row: the header, the first block decompressed, the first tar member."""
    rows = READERS[src.fmt.ext].read(src, columns, ReadStats(), 1)
    try:
        next(rows, None)
    finally:
        rows.close()
