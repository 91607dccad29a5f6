"""What in an export folder is recap's own: shards `part-NNNNN.parquet|jsonl` whose columns
are recap's export columns, and what an interrupted export left under temporary names. The
next export to the folder replaces exactly those; anything else makes it someone else's.

(Recognised by content rather than by a manifest file beside the shards: a folder export
holds nothing but its shards, so that any reader of the folder gets exactly the rows.)"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass

import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from producer.readers.outputs import is_export_columns

TEMP_MARK = ".recap-tmp-"  # `.`: hidden from dataset readers while an export is being written
SHARD_NAME = re.compile(r"part-\d{5,}\.(parquet|jsonl)")


@dataclass(frozen=True, slots=True)
class FolderContents:
    """A folder's entries (full paths): what earlier recap exports left, and the rest."""

    ours: tuple[str, ...] = ()
    foreign: tuple[str, ...] = ()


def read_folder(fs: AbstractFileSystem, path: str) -> FolderContents:
    if not fs.isdir(path):
        return FolderContents()
    ours, foreign = [], []
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        name = posixpath.basename(entry["name"].rstrip("/"))
        mine = name.startswith(TEMP_MARK) or (
            entry["type"] == "file" and SHARD_NAME.fullmatch(name) and is_recap_export(fs, entry["name"])
        )
        (ours if mine else foreign).append(entry["name"])
    return FolderContents(tuple(ours), tuple(foreign))


def is_recap_export(fs: AbstractFileSystem, path: str) -> bool:
    """Whether a parquet or JSONL file has recap's export columns (an empty JSONL counts)."""
    try:
        with fs.open(path, "rb") as file:
            if path.endswith(".parquet"):
                names = pq.read_schema(file).names
            else:
                first = file.readline()
                if not first.strip():
                    return True
                row = json.loads(first)
                names = list(row) if isinstance(row, dict) else []
    except (OSError, ValueError):  # ValueError: pyarrow's ArrowInvalid and JSON's errors
        return False
    # recap's own columns too: the published Recap-DataComp-1B shares the leading ones
    return is_export_columns(names)
