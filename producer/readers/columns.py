"""Which field holds what: the url, caption, id and sha256 columns of every format.

Tables and JSON lines name their columns in a header (`resolve_columns`); image folders and
shards carry theirs in a .json sidecar (`image_item`). Either way the CLI's `--*-col`
options choose, the same defaults apply, and values are cleaned the same way here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import starmap
from typing import Any

import pyarrow as pa

from producer.readers.source import InputError
from producer.readers.stats import ReadStats, SkipReason
from recap.records import InputItem

# Columns listed in an error message (wide tables have hundreds).
MAX_LISTED_COLUMNS = 30


@dataclass(frozen=True)
class ColumnOptions:
    """Which input columns (or JSON fields) hold what; the CLI's `--*-col` options."""

    url_col: str = "url"
    caption_col: str | None = None  # None: "text", else "caption" when present, else none
    id_col: str | None = None  # None: the key is the sha256 hex of the URL
    sha256_col: str | None = None  # None: no expected hash

    @property
    def keyed(self) -> bool:
        """Keys come from the id column (else from the URL)."""
        return bool(self.id_col)


@dataclass(frozen=True)
class ResolvedColumns:
    """Column names resolved against one file's header."""

    url: str
    caption: str | None
    id: str | None
    sha256: str | None

    @property
    def needed(self) -> list[str]:
        names = [self.url, self.caption, self.id, self.sha256]
        return list(dict.fromkeys(n for n in names if n is not None))


@dataclass(slots=True)  # not frozen: one is built per row, and a frozen one builds 6x slower
class RawRow:
    """One row's fields as read, before cleaning: of any type, or None."""

    url: Any
    caption: Any = None
    id: Any = None
    sha256: Any = None


@dataclass
class Sidecars:
    """What lies beside an image file or shard image: its .txt caption, its .json fields."""

    txt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- values


def url_key(url: str) -> str:
    """The default item key: sha256 hex of the URL as read (stripped), UTF-8."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


def has_nul(url: str) -> bool:
    """A URL with a NUL byte is no URL, and PostgreSQL cannot store it: the row is left out
    as `invalid_url` rather than stopping the whole input."""
    return "\x00" in url


def _stored(text: str | None) -> str | None:
    """Text as a database stores it: PostgreSQL's text holds no NUL, so it is removed."""
    return text.replace("\x00", "") if text and "\x00" in text else text


def _caption_text(value: Any) -> str | None:
    return _stored(_text(value))


def _key_text(value: Any) -> str | None:
    """An id value as a key: ints stringified, floats that hold ints too (pandas-made
    parquet stores nullable int ids as float64), blanks are no key."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    text = (_stored(_text(value)) or "").strip()
    return text or None


def _sha_text(value: Any) -> str | None:
    text = (_stored(_text(value)) or "").strip().lower()
    return text or None


# --------------------------------------------------------------------------- tables


def find_column(names: list[str], wanted: str) -> str | None:
    """Exact name, else the one name equal but for case (LAION's parquet says URL, TEXT)."""
    if wanted in names:
        return wanted
    folded = [n for n in names if n.lower() == wanted.lower()]
    return folded[0] if len(folded) == 1 else None


def _require(names: list[str], wanted: str, flag: str, where: str) -> str:
    found = find_column(names, wanted)
    if found is None:
        listed = ", ".join(names[:MAX_LISTED_COLUMNS])
        if len(names) > MAX_LISTED_COLUMNS:
            listed += f", ... ({len(names)} in all)"
        raise InputError(f"input {where} has no column {wanted!r} (columns: {listed or 'none'}); pass {flag}")
    return found


def resolve_columns(names: list[str], options: ColumnOptions, where: str) -> ResolvedColumns:
    """The columns `options` ask for among `names`; a missing one is an `InputError`."""
    url = _require(names, options.url_col, "--url-col", where)
    if options.caption_col is None:
        caption = find_column(names, "text") or find_column(names, "caption")
    else:
        caption = _require(names, options.caption_col, "--caption-col", where)
    id_col = options.id_col and _require(names, options.id_col, "--id-col", where)
    sha = options.sha256_col and _require(names, options.sha256_col, "--sha256-col", where)
    return ResolvedColumns(url, caption, id_col or None, sha or None)


def arrow_rows(batch: pa.RecordBatch | pa.Table, cols: ResolvedColumns) -> Iterator[RawRow]:
    def column(name: str | None) -> list[Any]:
        return batch.column(name).to_pylist() if name else [None] * batch.num_rows

    values = zip(column(cols.url), column(cols.caption), column(cols.id), column(cols.sha256), strict=True)
    return starmap(RawRow, values)


def json_row(obj: dict[str, Any], cols: ResolvedColumns, options: ColumnOptions) -> RawRow:
    """A JSON object's fields; without --caption-col each object has its own default."""
    if options.caption_col is None and cols.caption not in obj:
        caption = obj.get("text", obj.get("caption"))
    else:
        caption = obj.get(cols.caption) if cols.caption else None
    return RawRow(
        obj.get(cols.url),
        caption,
        obj.get(cols.id) if cols.id else None,
        obj.get(cols.sha256) if cols.sha256 else None,
    )


def rows_to_items(rows: Iterable[RawRow], options: ColumnOptions, stats: ReadStats) -> list[InputItem]:
    """Rows to items, skipping (and counting) rows without a URL or, when keyed, an id, and
    rows whose URL holds a NUL byte."""
    out: list[InputItem] = []
    for row in rows:
        url = (_text(row.url) or "").strip()
        if not url:
            stats.skip(SkipReason.NO_URL)
            continue
        if has_nul(url):
            stats.skip(SkipReason.INVALID_URL)
            continue
        key = _key_text(row.id) if options.keyed else url_key(url)
        if key is None:
            stats.skip(SkipReason.NO_ID)
            continue
        stats.keep()
        out.append(InputItem(key, url, _caption_text(row.caption), _sha_text(row.sha256)))
    return out


# --------------------------------------------------------------------------- images


def image_item(
    key: str, url: str, sidecars: Sidecars, options: ColumnOptions, key_field: str | None
) -> InputItem:
    """An already-downloaded image: key from --id-col (else `key_field`) in the json, else
    `key`; caption from the .txt, else the json's caption field. The json's own `url` is
    provenance only and never replaces the reference."""
    meta = sidecars.meta
    for name in (options.id_col, key_field):
        if name and (meta_key := _key_text(meta.get(name))):
            key = meta_key
            break
    if options.caption_col and options.caption_col in meta:
        caption = _caption_text(meta[options.caption_col])
    elif sidecars.txt is not None:
        caption = _caption_text(sidecars.txt)
    else:
        caption = _caption_text(meta.get("text", meta.get("caption")))
    # Only an explicit --sha256-col is a promise about these bytes: img2dataset's and
    # DataComp's json `sha256` hashes the original download, not the resized file.
    sha = _sha_text(meta.get(options.sha256_col)) if options.sha256_col else None
    return InputItem(key, url, caption, sha, local=True)
