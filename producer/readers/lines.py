"""Line formats: URL lists (.txt) and JSON lines (.jsonl), read one line at a time."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from producer.readers.columns import (
    ColumnOptions,
    RawRow,
    ResolvedColumns,
    has_nul,
    json_row,
    resolve_columns,
    rows_to_items,
    url_key,
)
from producer.readers.outputs import RecapOutput, is_export_columns
from producer.readers.reader import batched
from producer.readers.source import Source
from producer.readers.stats import ReadStats, SkipReason
from recap.records import InputItem


def read_txt(
    src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int
) -> Iterator[list[InputItem]]:
    """One URL a line; blank lines and `#` comments skipped. Column options do not apply."""
    with src.open_text() as f:
        yield from batched(_url_items(f, stats), batch_rows)


def _url_items(lines: Iterable[str], stats: ReadStats) -> Iterator[InputItem]:
    for line in lines:
        url = line.strip()
        if not url:
            stats.skip(SkipReason.BLANK_LINE)
        elif url.startswith("#"):
            stats.skip(SkipReason.COMMENT)
        elif has_nul(url):
            stats.skip(SkipReason.INVALID_URL)
        else:
            stats.keep()
            yield InputItem(url_key(url), url)


def read_jsonl(
    src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int
) -> Iterator[list[InputItem]]:
    """One JSON object a line, read line by line: rows may differ in fields (a field that
    is null is often left out), which a columnar block reader would refuse."""
    with src.open_text() as f:
        for rows in batched(_json_rows(f, options, src, stats), batch_rows):
            yield rows_to_items(rows, options, stats)


def _json_rows(
    lines: Iterable[str], options: ColumnOptions, src: Source, stats: ReadStats
) -> Iterator[RawRow]:
    cols: ResolvedColumns | None = None
    for line in lines:
        if not line.strip():
            stats.skip(SkipReason.BLANK_LINE)
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            stats.skip(SkipReason.BAD_JSON)
            continue
        if cols is None:  # the first object names the fields, as a header would
            if src.found and is_export_columns(list(obj)):
                raise RecapOutput(src.display)
            cols = resolve_columns(list(obj), options, src.display)
        yield json_row(obj, cols, options)
