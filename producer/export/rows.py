"""Export results in the Recap-DataComp-1B column layout, as parquet or JSONL, streaming.

Local paths or fsspec URLs; a path ending in `.parquet`/`.jsonl` is one file, anything
else a folder of shards `part-00000.<ext>` of `rows_per_shard` rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa

from recap.errors import RecapError
from recap.quality import word_count
from recap.states import ItemStatus
from recap.store import ItemColumns, JobInfo, Store

EXPORT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("re_caption", pa.string()),
        ("org_caption", pa.string()),
        ("sha256", pa.string()),
        ("re_length", pa.int32()),
        ("org_length", pa.int32()),
        ("status", pa.string()),
        ("error_class", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("prompt", pa.string()),
        ("generation", pa.string()),
        ("flags", pa.list_(pa.string())),
        ("job", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        # Beyond the contract's columns: how the caption was made (engine and version,
        # dtype, attention, GPU model, recap version), JSON; null for items not done.
        ("provenance", pa.string()),
    ]
)
EXPORT_COLUMNS = EXPORT_SCHEMA.names
STATUS_CHOICES = {
    "done": [ItemStatus.DONE],
    "failed": [ItemStatus.FAILED],
    "all": list(ItemStatus),
}


@dataclass(slots=True)
class ExportStats:
    rows: int = 0
    files: int = 0


FORMATS = ("parquet", "jsonl")


def export_format(out: str, fmt: str | None) -> str:
    """The format asked for, else the one `out` ends with, else parquet (a folder of
    shards); a `.parquet`/`.jsonl` path is one file of that format, never the other."""
    suffix = next((f for f in FORMATS if out.endswith(f".{f}")), None)
    fmt = fmt or suffix or "parquet"
    if fmt not in FORMATS:
        raise RecapError(f"unknown export format {fmt!r}: use parquet or jsonl")
    if suffix and suffix != fmt:
        raise RecapError(f"--out {out} ends in .{suffix} but --format is {fmt}: make them agree")
    return fmt


def export_job(
    store: Store,
    job: JobInfo,
    out: str,
    fmt: str | None = None,
    status: str = "done",
    exclude_flags: Iterable[str] = (),
    rows_per_shard: int = 1_000_000,
    since: datetime | None = None,
) -> ExportStats:
    fmt = export_format(out, fmt)
    if status not in STATUS_CHOICES:
        raise RecapError(f"unknown --status {status!r}: use done, failed or all")
    batches = _export_batches(store, job, STATUS_CHOICES[status], set(exclude_flags), since)
    writer = _ShardWriter(out, fmt, rows_per_shard)
    try:
        for batch in batches:
            writer.write(batch)
    finally:
        writer.close()
    return ExportStats(rows=writer.rows, files=writer.files)


def _export_batches(store, job, statuses, exclude_flags, since) -> Iterator[pa.RecordBatch]:
    static = {
        "model": job.model,
        "prompt": job.prompt,
        "generation": json.dumps(job.generation, sort_keys=True),
        "job": job.name,
    }
    provenance = _ProvenanceLookup(store)
    for columns in store.iter_items(job, statuses, since=since):
        if exclude_flags:
            columns = _without_flags(columns, exclude_flags)
        if len(columns):
            yield _record_batch(columns, provenance.json(columns.provenance_id), static)


class _ProvenanceLookup:
    """Provenance ids to their JSON text; a job names a handful, each read once."""

    def __init__(self, store: Store):
        self.store = store
        self.known: dict[int | None, str | None] = {None: None}

    def json(self, ids: list) -> list:
        missing = set(ids) - self.known.keys()
        if missing:
            found = self.store.provenances(missing)
            self.known.update(
                {i: json.dumps(found[i], sort_keys=True) if i in found else None for i in missing}
            )
        return [self.known[i] for i in ids]


def _without_flags(columns: ItemColumns, exclude: set[str]) -> ItemColumns:
    return columns.take([i for i, flags in enumerate(columns.flags) if not exclude.intersection(flags or ())])


def _record_batch(columns: ItemColumns, provenance: list, static: dict[str, str]) -> pa.RecordBatch:
    """Column by column: no per-row dict on a path that moves a billion rows."""
    data = {
        "key": columns.key,
        "url": columns.url,
        "re_caption": columns.caption,
        "org_caption": columns.org_caption,
        "sha256": columns.sha256,
        "re_length": _word_counts(columns.caption),
        "org_length": _word_counts(columns.org_caption),
        "status": columns.status,
        "error_class": columns.error_class,
        "error": columns.error,
        "width": columns.width,
        "height": columns.height,
        "model_revision": columns.model_revision,
        "provenance": provenance,
        "flags": [flags or [] for flags in columns.flags],
        "updated_at": columns.updated_at,
        **{name: [value] * len(columns) for name, value in static.items()},
    }
    arrays = [pa.array(data[field.name], type=field.type) for field in EXPORT_SCHEMA]
    return pa.RecordBatch.from_arrays(arrays, schema=EXPORT_SCHEMA)


def _word_counts(texts: list) -> list:
    return [None if text is None else word_count(text) for text in texts]


class _ShardWriter:
    """Writes record batches to one file or to numbered shards, opened through fsspec."""

    def __init__(self, out: str, fmt: str, rows_per_shard: int):
        import fsspec

        self.fmt = fmt
        self.single = out.endswith(f".{fmt}")
        self.fs, self.root = fsspec.core.url_to_fs(out)
        if not self.single:
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            parent = self.root.rsplit("/", 1)[0] if "/" in self.root else ""
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.rows = 0
        self.files = 0
        self._file = None
        self._parquet = None
        self._in_shard = 0

    def write(self, batch: pa.RecordBatch) -> None:
        start = 0
        while start < batch.num_rows:
            if self._file is None:
                self._open()
            room = batch.num_rows - start if self.single else self.rows_per_shard - self._in_shard
            part = batch.slice(start, min(room, batch.num_rows - start))
            self._write_part(part)
            start += part.num_rows
            self._in_shard += part.num_rows
            self.rows += part.num_rows
            if not self.single and self._in_shard >= self.rows_per_shard:
                self._close_file()

    def close(self) -> None:
        if self.files == 0:
            self._open()  # an empty export still leaves a readable file with the schema
        self._close_file()

    def _open(self) -> None:
        path = self.root if self.single else f"{self.root}/part-{self.files:05d}.{self.fmt}"
        self._file = self.fs.open(path, "wb")
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            self._parquet = pq.ParquetWriter(self._file, EXPORT_SCHEMA, compression="zstd")
        self.files += 1
        self._in_shard = 0

    def _write_part(self, part: pa.RecordBatch) -> None:
        if self._parquet is not None:
            self._parquet.write_batch(part)
            return
        for row in part.to_pylist():
            if row["updated_at"] is not None:
                row["updated_at"] = row["updated_at"].isoformat()
            self._file.write((json.dumps(row, ensure_ascii=False) + "\n").encode())

    def _close_file(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self._file is not None:
            self._file.close()
            self._file = None
