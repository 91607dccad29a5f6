"""Interchangeable export writers, chosen by the target: one parquet or JSONL file, or a
folder of shards. Each stages what it writes and publishes it only on `commit`; `abort`
removes what it staged, so a failed export leaves the previous output as it was."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from producer.export.schema import EXPORT_SCHEMA
from producer.export.staged import StagedFile, remove_leftovers
from producer.export.target import ExportTarget, Layout
from recap.errors import RecapError


@dataclass(slots=True)
class ExportStats:
    rows: int = 0
    files: int = 0


class ExportWriter(Protocol):
    stats: ExportStats

    def write(self, batch: pa.RecordBatch) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


def open_writer(target: ExportTarget, rows_per_shard: int) -> ExportWriter:
    if target.layout is Layout.FILE:
        return FileWriter(target)
    return ShardFolderWriter(target, rows_per_shard)


class _ParquetEncoder:
    def __init__(self, file: BinaryIO):
        self._writer = pq.ParquetWriter(file, EXPORT_SCHEMA, compression="zstd")

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def finish(self) -> None:
        self._writer.close()


class _JsonlEncoder:
    def __init__(self, file: BinaryIO):
        self._file = file

    def write(self, batch: pa.RecordBatch) -> None:
        for row in batch.to_pylist():
            if row["updated_at"] is not None:
                row["updated_at"] = row["updated_at"].isoformat()
            self._file.write((json.dumps(row, ensure_ascii=False) + "\n").encode())

    def finish(self) -> None:
        pass


_ENCODERS = {"parquet": _ParquetEncoder, "jsonl": _JsonlEncoder}


class _Part:
    """One output file being written: staged, with its encoder and its row count."""

    def __init__(self, target: ExportTarget, final: str):
        self.staged = StagedFile(target.fs, final, target.local)
        self.encoder = _ENCODERS[target.fmt](self.staged.open())
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self.encoder.write(batch)
        self.rows += batch.num_rows

    def finish(self) -> None:
        self.encoder.finish()
        self.staged.close()

    def discard(self) -> None:
        try:
            self.encoder.finish()  # or parquet's writer, left open, later writes to a closed file
        except Exception:
            pass  # the failure that brought us here is already on its way to the user
        self.staged.discard()


class FileWriter:
    """One file, renamed over the target once complete."""

    def __init__(self, target: ExportTarget):
        self.target = target
        self.stats = ExportStats(files=1)
        parent = posixpath.dirname(target.path)
        if parent:
            target.fs.makedirs(parent, exist_ok=True)
        self._part = _Part(target, target.path)

    def write(self, batch: pa.RecordBatch) -> None:
        self._part.write(batch)
        self.stats.rows += batch.num_rows

    def commit(self) -> None:
        # An empty export still leaves a readable file with the schema.
        self._part.finish()
        self._part.staged.publish()
        remove_leftovers(self.target.fs, self.target.path)

    def abort(self) -> None:
        self._part.discard()


class ShardFolderWriter:
    """Shards `part-NNNNN.<fmt>` of `rows_per_shard` rows, staged in the folder; on commit
    they replace the previous export's, and what the previous export left beyond them is
    removed (and whatever else the folder held, with overwrite)."""

    def __init__(self, target: ExportTarget, rows_per_shard: int):
        self.target = target
        self.rows_per_shard = rows_per_shard
        self.stats = ExportStats()
        self._parts: list[_Part] = []
        target.fs.makedirs(target.path, exist_ok=True)

    def write(self, batch: pa.RecordBatch) -> None:
        start = 0
        while start < batch.num_rows:
            part = self._current()
            piece = batch.slice(start, min(self.rows_per_shard - part.rows, batch.num_rows - start))
            part.write(piece)
            start += piece.num_rows
            self.stats.rows += piece.num_rows

    def commit(self) -> None:
        if not self._parts:
            self._current()  # an empty export still leaves one readable shard with the schema
        self._parts[-1].finish()
        for part in self._parts:
            part.staged.publish()
        self._remove_previous({posixpath.basename(part.staged.final) for part in self._parts})

    def abort(self) -> None:
        for part in self._parts:
            part.discard()

    def _current(self) -> _Part:
        if not self._parts or self._parts[-1].rows >= self.rows_per_shard:
            if self._parts:
                self._parts[-1].finish()
            name = f"part-{len(self._parts):05d}.{self.target.fmt}"
            self._parts.append(_Part(self.target, posixpath.join(self.target.path, name)))
            self.stats.files += 1
        return self._parts[-1]

    def _remove_previous(self, published: set[str]) -> None:
        previous = self.target.previous
        for path in [*previous.ours, *(previous.foreign if self.target.overwrite else ())]:
            if posixpath.basename(path.rstrip("/")) not in published:
                self._remove(path)

    def _remove(self, path: str) -> None:
        try:
            self.target.fs.rm(path, recursive=True)
        except OSError as exc:  # the new export is in place by now: say what is left over
            raise RecapError(
                f"exported to --out {self.target.out}, but {path} from before stays: "
                f"{exc.strerror or exc}; remove it by hand"
            ) from None
