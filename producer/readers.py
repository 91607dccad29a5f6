"""Input readers: URL lists, webdataset shards and image folders, as batches of `InputItem`.

One interface for every format (like img2dataset's interchangeable readers): a reader is a
generator `read(source, columns, stats, batch_rows) -> Iterator[list[InputItem]]`, found by
file extension in `READERS`; adding a format is one entry there. `read_items` expands the
inputs (files, folders, globs; local paths or fsspec URLs), sends each file to its reader
and re-cuts what they yield into batches of `batch_rows` items.

Everything streams: tables are read block by block (parquet row-group batches of only the
needed columns, CSV blocks, JSONL lines), tar shards by walking their headers, folders one
directory listing at a time, so memory stays flat whatever the input size.

Keys: the `--id-col` value (numbers stringified) or the sha256 hex of the URL; for shard
members the json `key` (else the webdataset key), for image files the path relative to the
folder given. Duplicates are NOT removed here: the database deduplicates by (job, key), so
a key seen twice registers once (the first reading wins).

References for images already on disk or in object storage (`InputItem.url`):
  image file:    `file:///abs/dir/a.jpg` (local) or the fsspec URL (`s3://bucket/a.jpg`)
  shard member:  `tar://<member path>::<shard>` (fsspec's chained form); <shard> is the
                 absolute local path or the fsspec URL (`s3://bucket/000.tar`).
Open them with `with fsspec.open(ref) as f:` (fsspec's tar filesystem is not cached, so a
fetcher reading many members of one shard should keep one `fsspec.filesystem("tar",
fo=shard)` per shard rather than re-indexing the shard for every member).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import posixpath
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec
import fsspec.core
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem, make_path_posix
from fsspec.utils import infer_compression

from recap.errors import RecapError
from recap.records import InputItem

# Every raster format Pillow reads by default (AVIF since Pillow 11.2); the workers decide
# what they decode, a reader only must not pass an image by.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"})
SIDECAR_EXTENSIONS = (".txt", ".json")
# Sidecars and shard .txt/.json members are small; a bigger one is not a caption.
MAX_SIDECAR_BYTES = 1 << 20
# Columns listed in an error message (wide tables have hundreds).
MAX_LISTED_COLUMNS = 30

# Why a row was skipped (keys of ReadStats.rows_skipped).
BLANK_LINE = "blank_line"
COMMENT = "comment"
NO_URL = "no_url"  # null, empty or blank URL
NO_ID = "no_id"  # null or empty --id-col value
BAD_ROW = "bad_row"  # CSV/TSV row with the wrong number of fields
BAD_JSON = "bad_json"  # JSONL line that is not a JSON object
NO_IMAGE = "no_image"  # shard sample without an image member (e.g. an orphan .txt)
BAD_MEMBER_NAME = "bad_member_name"  # a member name fsspec's chained URL cannot address


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class ColumnOptions:
    """Which input columns (or JSON fields) hold what; the CLI's `--*-col` options."""

    url_col: str = "url"
    caption_col: str | None = None  # None: "text", else "caption" when present, else none
    id_col: str | None = None  # None: the key is the sha256 hex of the URL
    sha256_col: str | None = None  # None: no expected hash


class InputError(RecapError):
    """An input that cannot be read as given: one line, exit code 2."""


@dataclass
class ReadStats:
    """What `read_items` saw. Invariant: rows_read == items + sum(rows_skipped.values())."""

    files: int = 0  # files read (every image file of a folder counts)
    rows_read: int = 0  # table rows / lines, shard samples, image files
    items: int = 0  # items yielded
    rows_skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows
    files_skipped: Counter[str] = field(default_factory=Counter)  # extension -> files
    bad_sidecars: int = 0  # unreadable or oversized .txt/.json captions (item still kept)

    def skip(self, reason: str, n: int = 1) -> None:
        self.rows_read += n
        self.rows_skipped[reason] += n

    def summary(self) -> str:
        """One line for a person: what was read and what was left out, and why."""
        line = f"{self.items} items from {self.files} files ({self.rows_read} rows)"
        if self.rows_skipped:
            line += "; skipped rows: " + _counts(self.rows_skipped)
        if self.files_skipped:
            line += "; skipped files: " + _counts(self.files_skipped)
        if self.bad_sidecars:
            line += f"; unreadable captions: {self.bad_sidecars}"
        return line


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counter.items()))


@dataclass(frozen=True)
class Source:
    """One file to read, with what its reader needs to know about where it was found."""

    fs: AbstractFileSystem
    path: str  # the filesystem's own path (absolute for local files)
    fmt: str  # registry key: ".csv", ".tar", ".jpg", ...
    compression: str | None  # fsspec compression name, from the file name
    root: str  # folder that image keys are relative to
    sidecars: tuple[tuple[str, str], ...] = ()  # (".txt" | ".json", path) of an image file

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def location(self) -> str:
        """Absolute local path, or the fsspec URL: what a person or fsspec.open accepts."""
        return self.path if self.is_local else self.fs.unstrip_protocol(self.path)

    @property
    def display(self) -> str:
        """As the user would write it: relative to the working directory when under it."""
        if not self.is_local:
            return self.location
        relative = posixpath.relpath(self.path, make_path_posix(os.getcwd()))
        return self.path if relative.startswith("..") else relative

    def open_binary(self, decompress: bool = True) -> IO[bytes]:
        return self.fs.open(self.path, "rb", compression=self.compression if decompress else None)

    def open_text(self) -> IO[str]:
        # utf-8-sig: spreadsheet exports start with a BOM; bad bytes become U+FFFD rather
        # than stopping a billion-row read (the fetch then fails that one URL).
        return self.fs.open(
            self.path, "rt", encoding="utf-8-sig", errors="replace", compression=self.compression
        )


ReadFn = Callable[[Source, ColumnOptions, ReadStats, int], Iterator[list[InputItem]]]


@dataclass(frozen=True)
class Reader:
    read: ReadFn
    compressible: bool  # may the file be .gz/.bz2/.xz outside the format itself


# --------------------------------------------------------------------------- helpers


def url_key(url: str) -> str:
    """The default item key: sha256 hex of the URL as read (stripped), UTF-8."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


def _clean_url(value: Any) -> str:
    return (_text(value) or "").strip()


def _key_text(value: Any) -> str | None:
    """An id value as a key: ints stringified, floats that hold ints too (pandas-made
    parquet stores nullable int ids as float64), blanks are no key."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    text = (_text(value) or "").strip()
    return text or None


def _sha_text(value: Any) -> str | None:
    text = (_text(value) or "").strip().lower()
    return text or None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _format_of(name: str) -> tuple[str, str | None]:
    """(format extension, compression) from a file name: "a.csv.gz" -> (".csv", "gzip")."""
    lower = name.lower()
    compression = infer_compression(lower)
    if compression == "zip":  # a zip is an archive of files, not a compressed stream
        compression = None
    if compression is not None:
        lower = lower[: lower.rfind(".")]
    return posixpath.splitext(lower)[1], compression


def _shown_extension(name: str) -> str:
    fmt, compression = _format_of(name)
    if compression is not None:
        return fmt + posixpath.splitext(name.lower())[1]
    return fmt or "(no extension)"


# --------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class _Columns:
    """Column names resolved against one file's header."""

    url: str
    caption: str | None
    id: str | None
    sha256: str | None

    @property
    def needed(self) -> list[str]:
        names = [self.url, self.caption, self.id, self.sha256]
        return list(dict.fromkeys(n for n in names if n is not None))


def _find_column(names: list[str], wanted: str) -> str | None:
    """Exact name, else the one name equal but for case (LAION's parquet says URL, TEXT)."""
    if wanted in names:
        return wanted
    folded = [n for n in names if n.lower() == wanted.lower()]
    return folded[0] if len(folded) == 1 else None


def _require(names: list[str], wanted: str, flag: str, where: str) -> str:
    found = _find_column(names, wanted)
    if found is None:
        listed = ", ".join(names[:MAX_LISTED_COLUMNS])
        if len(names) > MAX_LISTED_COLUMNS:
            listed += f", ... ({len(names)} in all)"
        raise InputError(f"input {where} has no column {wanted!r} (columns: {listed or 'none'}); pass {flag}")
    return found


def _resolve(names: list[str], options: ColumnOptions, where: str) -> _Columns:
    url = _require(names, options.url_col, "--url-col", where)
    if options.caption_col is None:
        caption = _find_column(names, "text") or _find_column(names, "caption")
    else:
        caption = _require(names, options.caption_col, "--caption-col", where)
    id_col = options.id_col and _require(names, options.id_col, "--id-col", where)
    sha = options.sha256_col and _require(names, options.sha256_col, "--sha256-col", where)
    return _Columns(url, caption, id_col or None, sha or None)


Row = tuple[Any, Any, Any, Any]  # url, caption, id, sha256


def _items(rows: Iterable[Row], keyed: bool, stats: ReadStats) -> list[InputItem]:
    """Rows to items, skipping (and counting) rows without a URL or, when keyed, an id."""
    out: list[InputItem] = []
    for url_value, caption, id_value, sha in rows:
        url = _clean_url(url_value)
        if not url:
            stats.skip(NO_URL)
            continue
        key = _key_text(id_value) if keyed else url_key(url)
        if key is None:
            stats.skip(NO_ID)
            continue
        stats.rows_read += 1
        out.append(InputItem(key, url, _text(caption), _sha_text(sha)))
    return out


def _arrow_rows(batch: pa.RecordBatch | pa.Table, cols: _Columns) -> Iterator[Row]:
    def column(name: str | None) -> list[Any]:
        return batch.column(name).to_pylist() if name else [None] * batch.num_rows

    return zip(column(cols.url), column(cols.caption), column(cols.id), column(cols.sha256), strict=True)


# --------------------------------------------------------------------------- table readers


def read_txt(src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int):
    """One URL a line; blank lines and `#` comments skipped. Column options do not apply."""
    batch: list[InputItem] = []
    with src.open_text() as f:
        for line in f:
            url = line.strip()
            if not url:
                stats.skip(BLANK_LINE)
            elif url.startswith("#"):
                stats.skip(COMMENT)
            else:
                stats.rows_read += 1
                batch.append(InputItem(url_key(url), url))
                if len(batch) >= batch_rows:
                    yield batch
                    batch = []
    if batch:
        yield batch


def read_parquet(src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int):
    """Row-group batches of only the needed columns: a 100 GB table costs one batch of RAM."""
    with src.open_binary(decompress=False) as f:
        parquet = pq.ParquetFile(f)
        cols = _resolve(parquet.schema_arrow.names, options, src.display)
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=cols.needed):
            yield _items(_arrow_rows(batch, cols), cols.id is not None, stats)


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
    if _find_column(names, options.url_col) is None and any(map(_looks_like_url, names)):
        names, skip_rows = _headerless_names(names), 0
    cols = _resolve(names, options, src.display)

    def bad_row(_row: Any) -> str:
        stats.skip(BAD_ROW)
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
            yield _items(_arrow_rows(batch, cols), cols.id is not None, stats)


def read_csv(src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int):
    """RFC 4180 CSV with a header row; quoted fields may hold commas and newlines."""
    yield from _read_delimited(src, options, stats, ",", quoted=True)


def read_tsv(src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int):
    """Tab-separated, no quoting (the IANA TSV form): captions that start with a quote, as
    in CC12M, stay as they are. A first row that is data (CC3M, CC12M) is detected."""
    yield from _read_delimited(src, options, stats, "\t", quoted=False)


def read_jsonl(src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int):
    """One JSON object a line, read line by line: rows may differ in fields (a field that
    is null is often left out), which a columnar block reader would refuse."""
    cols: _Columns | None = None
    rows: list[Row] = []
    with src.open_text() as f:
        for line in f:
            if not line.strip():
                stats.skip(BLANK_LINE)
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                stats.skip(BAD_JSON)
                continue
            if cols is None:  # the first object names the fields, as a header would
                cols = _resolve(list(obj), options, src.display)
            rows.append(_json_row(obj, cols, options))
            if len(rows) >= batch_rows:
                yield _items(rows, cols.id is not None, stats)
                rows = []
    if rows and cols is not None:
        yield _items(rows, cols.id is not None, stats)


def _json_row(obj: dict, cols: _Columns, options: ColumnOptions) -> Row:
    if options.caption_col is None and cols.caption not in obj:
        caption = obj.get("text", obj.get("caption"))  # this row's own default
    else:
        caption = obj.get(cols.caption) if cols.caption else None
    return (
        obj.get(cols.url),
        caption,
        obj.get(cols.id) if cols.id else None,
        obj.get(cols.sha256) if cols.sha256 else None,
    )


# --------------------------------------------------------------------------- images on disk


def _sidecar_text(data: bytes, stats: ReadStats) -> str | None:
    if len(data) > MAX_SIDECAR_BYTES:
        stats.bad_sidecars += 1
        return None
    return data.decode("utf-8", errors="replace").strip()


def _sidecar_json(data: bytes, stats: ReadStats) -> dict:
    text = _sidecar_text(data, stats)
    try:
        meta = json.loads(text) if text else {}
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        stats.bad_sidecars += 1
        return {}
    return meta


def _image_item(
    key: str,
    url: str,
    caption_txt: str | None,
    meta: dict,
    options: ColumnOptions,
    key_field: str | None,
) -> InputItem:
    """An already-downloaded image: caption from the .txt, else the json's caption field;
    the json's own `url` is provenance only and never replaces the reference."""
    if options.id_col and _key_text(meta.get(options.id_col)):
        key = _key_text(meta[options.id_col]) or key
    elif key_field and _key_text(meta.get(key_field)):
        key = _key_text(meta[key_field]) or key
    if options.caption_col and options.caption_col in meta:
        caption = _text(meta[options.caption_col])
    elif caption_txt is not None:
        caption = caption_txt
    else:
        caption = _text(meta.get("text", meta.get("caption")))
    # Only an explicit --sha256-col is a promise about these bytes: img2dataset's and
    # DataComp's json `sha256` hashes the original download, not the resized file.
    sha = _sha_text(meta.get(options.sha256_col)) if options.sha256_col else None
    return InputItem(key, url, caption, sha, local=True)


def read_image(src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int):
    """One image file; key = path relative to the folder given; sidecars give the caption."""
    txt, meta = None, {}
    for ext, path in src.sidecars:
        data = src.fs.cat_file(path)
        if ext == ".txt":
            txt = _sidecar_text(data, stats)
        else:
            meta = _sidecar_json(data, stats)
    key = posixpath.relpath(src.path, src.root) if src.root else posixpath.basename(src.path)
    url = Path(src.path).as_uri() if src.is_local else src.location  # quoted: '#', '?', '%'
    stats.rows_read += 1
    yield [_image_item(key, url, txt, meta, options, key_field=None)]


@dataclass
class _Sample:
    """The members of one webdataset sample seen so far."""

    key: str
    image: str | None = None
    txt: str | None = None
    meta: dict = field(default_factory=dict)


def _wds_split(name: str) -> tuple[str, str] | None:
    """webdataset's rule: key = path up to the first dot of the basename, in its directory;
    suffix = the rest, lower-cased. Names without one (or dotfiles) are not sample parts."""
    directory, base = posixpath.split(name)
    stem, dot, suffix = base.partition(".")
    if not stem or not dot:
        return None
    return posixpath.join(directory, stem), suffix.lower()


def _tar_members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (info := tf.next()) is not None:
        yield info
        # TarFile remembers every member it has seen; a million-member shard would grow.
        tf.members.clear()


def read_tar(src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int):
    """A webdataset shard: one item per sample (contiguous members sharing a key) that has
    an image. Only headers and the small .txt/.json members are read, never image bytes."""
    shard = src.location
    # A local uncompressed shard is read by seeking from header to header (image bytes are
    # never read); anything else streams once through (remote reads stay sequential).
    mode = "r:" if src.is_local and src.compression is None else "r|*"
    batch: list[InputItem] = []
    sample: _Sample | None = None
    with src.open_binary(decompress=False) as f, tarfile.open(fileobj=f, mode=mode) as tf:
        for info in _tar_members(tf):
            parts = _wds_split(info.name.removeprefix("./")) if info.isfile() else None
            if parts is None:
                continue
            key, suffix = parts
            if sample is None or key != sample.key:
                if sample is not None and (item := _shard_item(shard, sample, options, stats)):
                    batch.append(item)
                sample = _Sample(key)
                if len(batch) >= batch_rows:
                    yield batch
                    batch = []
            _add_member(tf, info, suffix, sample, stats)
    if sample is not None and (item := _shard_item(shard, sample, options, stats)):
        batch.append(item)
    if batch:
        yield batch


def _add_member(
    tf: tarfile.TarFile, info: tarfile.TarInfo, suffix: str, sample: _Sample, stats: ReadStats
) -> None:
    if "." + suffix in IMAGE_EXTENSIONS:
        sample.image = sample.image or info.name  # a second image (e.g. a mask) is ignored
    elif suffix in ("txt", "json"):
        if info.size > MAX_SIDECAR_BYTES:
            stats.bad_sidecars += 1
            return
        member = tf.extractfile(info)
        data = member.read() if member is not None else b""
        if suffix == "txt":
            sample.txt = _sidecar_text(data, stats)
        else:
            sample.meta = _sidecar_json(data, stats)


def _shard_item(shard: str, sample: _Sample, options: ColumnOptions, stats: ReadStats) -> InputItem | None:
    if sample.image is None:
        stats.skip(NO_IMAGE)
        return None
    # fsspec splits chained URLs on "::" and its tar filesystem drops a leading "/".
    if "::" in sample.image or sample.image.startswith("/"):
        stats.skip(BAD_MEMBER_NAME)
        return None
    stats.rows_read += 1
    url = f"tar://{sample.image}::{shard}"
    return _image_item(sample.key, url, sample.txt, sample.meta, options, key_field="key")


# --------------------------------------------------------------------------- registry

_TEXT = {".txt": read_txt, ".csv": read_csv, ".tsv": read_tsv, ".jsonl": read_jsonl}

READERS: dict[str, Reader] = {
    **{ext: Reader(fn, compressible=True) for ext, fn in _TEXT.items()},
    ".parquet": Reader(read_parquet, compressible=False),  # compression is inside parquet
    ".tar": Reader(read_tar, compressible=True),  # .tar.gz: tarfile and fsspec both infer it
    **{ext: Reader(read_image, compressible=False) for ext in sorted(IMAGE_EXTENSIONS)},
}


def supported_formats() -> str:
    return (
        ".txt, .csv, .tsv, .jsonl (also .gz, .bz2, .xz), .parquet, webdataset .tar (.tar.gz), "
        "image files (" + " ".join(sorted(IMAGE_EXTENSIONS)) + "), folders and globs"
    )


# --------------------------------------------------------------------------- inputs


def _url_to_fs(raw: str) -> tuple[AbstractFileSystem, str]:
    text = str(raw)
    if "://" not in text and text.startswith("~"):
        text = posixpath.expanduser(text)
    try:
        return fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as exc:  # unknown protocol, missing driver (s3fs...)
        raise InputError(f"input {raw}: {_one_line(exc)}") from exc


def _has_magic(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") and part not in (".", "..") for part in relative.split("/"))


def _glob_base(path: str) -> str:
    """The folder before the first wildcard: keys of matched images are relative to it."""
    parts = path.split("/")
    fixed = next(i for i, part in enumerate(parts) if _has_magic(part))
    return "/".join(parts[:fixed]) or "/"


def _readable(name: str) -> Reader | None:
    fmt, compression = _format_of(name)
    reader = READERS.get(fmt)
    if reader is None or (compression is not None and not reader.compressible):
        return None
    return reader


class _Siblings:
    """The files of one directory by (stem, extension), built once per directory: a
    .txt/.json named like an image there is its sidecar, not an input."""

    def __init__(self, names: set[str]):
        self.by_stem = {(posixpath.splitext(n)[0], posixpath.splitext(n)[1].lower()): n for n in names}
        self.image_stems = {stem for stem, ext in self.by_stem if ext in IMAGE_EXTENSIONS}


def _plan(
    fs: AbstractFileSystem,
    root: str,
    directory: str,
    names: list[str],
    siblings: _Siblings,
    stats: ReadStats,
) -> Iterator[Source]:
    """Sources for `names` (files of one directory, in order)."""
    by_stem = siblings.by_stem
    for name in names:
        stem, ext = posixpath.splitext(name)
        if ext.lower() in SIDECAR_EXTENSIONS and stem in siblings.image_stems:
            continue
        if _readable(name) is None:
            stats.files_skipped[_shown_extension(name)] += 1
            continue
        fmt, compression = _format_of(name)
        sidecars: tuple[tuple[str, str], ...] = ()
        if fmt in IMAGE_EXTENSIONS:
            sidecars = tuple(
                (side, posixpath.join(directory, by_stem[(stem, side)]))
                for side in SIDECAR_EXTENSIONS
                if (stem, side) in by_stem
            )
        yield Source(fs, posixpath.join(directory, name), fmt, compression, root, sidecars)


def _walk(
    fs: AbstractFileSystem, root: str, stats: ReadStats, directory: str | None = None
) -> Iterator[Source]:
    """A folder, recursively, in the order of a sorted recursive listing (files and
    sub-folders interleaved by name), one directory listing in memory per level."""
    directory = root if directory is None else directory
    entries = {
        posixpath.basename(e["name"].rstrip("/")): e["type"] == "directory"
        for e in fs.ls(directory, detail=True)
        # object stores may list a folder's own placeholder object inside it
        if e["name"].rstrip("/") != directory.rstrip("/")
    }
    hidden = [n for n, is_dir in entries.items() if n.startswith(".") and not is_dir]
    if hidden:  # .DS_Store, macOS ._a.jpg; hidden folders (.git, .cache) are pruned
        stats.files_skipped["(hidden)"] += len(hidden)
    siblings = _Siblings({n for n, is_dir in entries.items() if not is_dir})
    # name + "/" for folders sorts "a.txt" before "a/..." as a sorted path listing does.
    for name in sorted(
        (n for n in entries if n and not n.startswith(".")), key=lambda n: n + "/" * entries[n]
    ):
        if entries[name]:
            yield from _walk(fs, root, stats, posixpath.join(directory, name))
        else:
            yield from _plan(fs, root, directory, [name], siblings, stats)


def _files(fs: AbstractFileSystem, paths: list[str], root: str, stats: ReadStats):
    """Files named or matched, grouped by directory so image sidecars are found once."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        groups.setdefault(posixpath.dirname(path), []).append(posixpath.basename(path))
    for directory, names in groups.items():
        siblings = set(names)
        if any(_format_of(n)[0] in IMAGE_EXTENSIONS for n in names):
            siblings |= {posixpath.basename(p) for p in fs.ls(directory, detail=False)}
        yield from _plan(fs, root, directory, names, _Siblings(siblings), stats)


@dataclass(frozen=True)
class _Input:
    """One input as given, checked: a folder, a file, or a glob's matches."""

    raw: str
    fs: AbstractFileSystem
    path: str
    kind: str  # "dir" | "file" | "glob"
    matches: tuple[str, ...] = ()


def _check_input(raw: str) -> _Input:
    fs, path = _url_to_fs(raw)
    if fs.isdir(path):
        return _Input(raw, fs, path, "dir")
    if fs.isfile(path):
        if _readable(path) is None:
            raise InputError(
                f"input {raw}: unsupported format {_shown_extension(path)} (supported: {supported_formats()})"
            )
        return _Input(raw, fs, path, "file")
    if _has_magic(path):
        matches = tuple(sorted(fs.glob(path)))
        if not matches:
            raise InputError(f"input {raw} matches nothing")
        return _Input(raw, fs, path, "glob", matches)
    raise InputError(f"input {raw} does not exist")


def check_inputs(inputs: list[str]) -> list[_Input]:
    """Every input checked (exists, readable format, a glob matches), none read or walked:
    a typo in the last one fails the command at once, not after hours on the others."""
    if isinstance(inputs, str):  # a lone string would be read letter by letter
        inputs = [inputs]
    return [_check_input(raw) for raw in inputs]


def _sources(inputs: list[str], stats: ReadStats) -> Iterator[Source]:
    for given in check_inputs(inputs):
        if given.kind == "dir":
            yield from _walk(given.fs, given.path, stats)
        elif given.kind == "file":
            yield from _files(given.fs, [given.path], posixpath.dirname(given.path), stats)
        else:
            yield from _glob(given.fs, given.path, given.matches, stats)


def _glob(
    fs: AbstractFileSystem, pattern: str, matches: tuple[str, ...], stats: ReadStats
) -> Iterator[Source]:
    base = _glob_base(pattern)
    files = []
    for match in matches:
        if _is_hidden(posixpath.relpath(match, base)):  # as a shell's glob leaves them out
            stats.files_skipped["(hidden)"] += 1
            continue
        if fs.isdir(match):
            yield from _walk(fs, match, stats)
        else:
            files.append(match)
    yield from _files(fs, files, base, stats)


def expand_inputs(inputs: list[str]) -> list[str]:
    """The files `read_items` would read, in its order: absolute local paths or fsspec
    URLs (sidecar captions and unsupported files in folders are left out)."""
    return [src.location for src in _sources(inputs, ReadStats())]


def _read_source(
    src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int
) -> Iterator[list[InputItem]]:
    try:
        yield from READERS[src.fmt].read(src, options, stats, batch_rows)
    except InputError:
        raise
    except (OSError, ValueError, EOFError, tarfile.TarError, zlib.error, pa.ArrowException) as exc:
        # A corrupt, truncated or unreadable file: one line naming it (exit code 2).
        raise InputError(f"input {src.display}: cannot read ({_one_line(exc)})") from exc


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
    for src in _sources(inputs, stats):
        stats.files += 1
        for chunk in _read_source(src, columns, stats, batch_rows):
            stats.items += len(chunk)
            pending.extend(chunk)
            while len(pending) >= batch_rows:
                yield pending[:batch_rows]
                pending = pending[batch_rows:]
    if pending:
        yield pending
