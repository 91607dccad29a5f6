"""Tables read by Arrow, block by block and only the needed columns: parquet, CSV, TSV."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from producer.readers.columns import ColumnOptions, arrow_rows, find_column, resolve_columns, rows_to_items
from producer.readers.outputs import RecapOutput, is_export_columns
from producer.readers.source import Source
from producer.readers.stats import ReadStats, SkipReason
from recap.records import InputItem


def read_parquet(
    src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int
) -> Iterator[list[InputItem]]:
    """Row-group batches of only the needed columns: a 100 GB table costs one batch of RAM."""
    with src.open_binary(decompress=False) as f:
        parquet = pq.ParquetFile(f)
        if src.found and is_export_columns(parquet.schema_arrow.names):
            raise RecapOutput(src.display)
        cols = resolve_columns(parquet.schema_arrow.names, options, src.display)
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=cols.needed):
            yield rows_to_items(arrow_rows(batch, cols), options, stats)


def read_csv(
    src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int
) -> Iterator[list[InputItem]]:
    """RFC 4180 CSV with a header row; quoted fields may hold commas and newlines."""
    yield from _read_delimited(src, options, stats, ",", quoted=True)


def read_tsv(
    src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int
) -> Iterator[list[InputItem]]:
    """Tab-separated, no quoting (the IANA TSV form): captions that start with a quote, as
    in CC12M, stay as they are. A first row that is data (CC3M, CC12M) is detected."""
    yield from _read_delimited(src, options, stats, "\t", quoted=False)


def _looks_like_url(text: str) -> bool:
    return text.strip().lower().startswith(("http://", "https://"))


def _headerless_names(header: list[str]) -> list[str]:
    """Names for a file whose first row is data (CC3M/CC12M TSVs have no header): the
    URL-looking field is `url`; with two fields the other one is `text`."""
    at = next(i for i, name in enumerate(header) if _looks_like_url(name))
    names = [f"f{i}" for i in range(len(header))]
    names[at] = "url"
    if len(header) == 2:
        names[1 - at] = "text"
    return names


def _csv_header(src: Source, delimiter: str, quoted: bool) -> list[str]:
    """The first record, read with the csv module: cheap, and no rows are parsed twice."""
    quoting = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
    with src.open_text() as f:
        return next(csv.reader(f, delimiter=delimiter, quoting=quoting), [])


def _read_delimited(
    src: Source, options: ColumnOptions, stats: ReadStats, delimiter: str, quoted: bool
) -> Iterator[list[InputItem]]:
    names = _csv_header(src, delimiter, quoted)
    if not names:
        return  # an empty file: nothing to read, nothing to complain about
    skip_rows = 1
    if find_column(names, options.url_col) is None and any(map(_looks_like_url, names)):
        names, skip_rows = _headerless_names(names), 0
    cols = resolve_columns(names, options, src.display)

    def bad_row(_row: Any) -> str:
        stats.skip(SkipReason.BAD_ROW)
        return "skip"

    # Names given, header skipped: pyarrow never re-reads the header (nor trips on a BOM).
    read = pacsv.ReadOptions(column_names=names, skip_rows=skip_rows)
    parse = pacsv.ParseOptions(
        delimiter=delimiter,
        quote_char='"' if quoted else False,
        newlines_in_values=quoted,
        invalid_row_handler=bad_row,
    )
    # All needed columns as strings: ids like 000123 keep their zeros, URLs never become
    # numbers, and an empty field is "", never a parse error.
    convert = pacsv.ConvertOptions(
        include_columns=cols.needed, column_types={c: pa.string() for c in cols.needed}
    )
    with src.open_binary() as f:
        reader = pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            yield rows_to_items(arrow_rows(batch, cols), options, stats)
