"""Where an export goes, checked before anything is written (and, for `recap run`, before any
captioning): one file when `--out` ends in `.parquet`/`.jsonl`, else a folder of shards."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from enum import Enum

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from producer.export.folder import TEMP_MARK, FolderContents, is_recap_export, read_folder
from recap.errors import RecapError, one_line

FORMATS = ("parquet", "jsonl")


class Layout(str, Enum):
    FILE = "file"
    FOLDER = "folder"


@dataclass(frozen=True, slots=True)
class ExportTarget:
    out: str  # as the user wrote it: messages name it so
    fmt: str
    layout: Layout
    fs: AbstractFileSystem
    path: str  # on `fs`; on a local disk absolute, with symlinks resolved
    local: bool
    overwrite: bool
    # A folder's entries before this export: what it replaces (and, with overwrite, removes).
    previous: FolderContents = field(default_factory=FolderContents)


def resolve_target(out: str, fmt: str | None, overwrite: bool = False) -> ExportTarget:
    """The format asked for, else the one `out` ends with, else parquet (a folder of
    shards); a `.parquet`/`.jsonl` path is one file of that format, never the other. Refused
    in one line: an empty path, a file path that is a folder (or a device), a folder path
    that is a file, a place where no file can be made, a folder recap did not write."""
    if not out.strip():
        raise RecapError("--out is empty: name a file (out.parquet, out.jsonl) or a folder for shards")
    suffix = next((f for f in FORMATS if out.endswith(f".{f}")), None)
    fmt = fmt or suffix or "parquet"
    if fmt not in FORMATS:
        raise RecapError(f"unknown export format {fmt!r}: use parquet or jsonl")
    if suffix and suffix != fmt:
        raise RecapError(f"--out {out} ends in .{suffix} but --format is {fmt}: make them agree")
    fs, path, local = _filesystem(out)
    layout = Layout.FILE if suffix else Layout.FOLDER
    target = ExportTarget(out, fmt, layout, fs, path, local, overwrite)
    if layout is Layout.FILE:
        _check_file(target)
        return target
    return replace(target, previous=_check_folder(target))


def _filesystem(out: str) -> tuple[AbstractFileSystem, str, bool]:
    try:
        fs, path = fsspec.core.url_to_fs(out)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package missing
        raise RecapError(f"--out {out}: {one_line(exc)}") from None
    local = isinstance(fs, LocalFileSystem)
    return fs, os.path.realpath(path) if local else path, local


def _check_file(target: ExportTarget) -> None:
    if target.fs.isdir(target.path):
        raise RecapError(
            f"--out {target.out} is a folder, but a path ending in .{target.fmt} is one file: "
            f"name a file, or write {target.out.rstrip('/')}/ to export shards into the folder"
        )
    if target.local:
        if os.path.lexists(target.path) and not os.path.isfile(target.path):
            raise RecapError(f"--out {target.out} exists and is not a regular file: name a new file")
        _check_writable(target, os.path.dirname(target.path))
    if not target.overwrite and target.fs.isfile(target.path) and not is_recap_export(target.fs, target.path):
        raise RecapError(
            f"--out {target.out} is a file recap did not export (an input, say): "
            "name a new file, or pass --overwrite to replace it"
        )


def _check_folder(target: ExportTarget) -> FolderContents:
    fs, path = target.fs, target.path
    if fs.exists(path) and not fs.isdir(path):
        raise RecapError(
            f"--out {target.out} exists and is not a folder (a path not ending in .parquet or "
            ".jsonl is a folder of shards): name a new folder, or a file ending in .parquet or .jsonl"
        )
    if target.local:
        _check_writable(target, path)
    previous = read_folder(fs, path)
    foreign = previous.foreign
    if foreign and not target.overwrite:
        example = foreign[0].rstrip("/").rsplit("/", 1)[-1]
        entries = f"{len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'}"
        raise RecapError(
            f"--out {target.out} is a folder recap did not export to ({entries}, like {example}): "
            "name a new or empty folder, or pass --overwrite to replace its contents"
        )
    if foreign and target.local and os.path.commonpath([path, os.getcwd()]) == path:
        raise RecapError(f"--out {target.out} holds the working folder: --overwrite would delete it")
    return previous


def _check_writable(target: ExportTarget, folder: str) -> None:
    """Create (and at once drop) a nameless file where the export will go, or the nearest
    folder that exists: permissions alone do not tell (root, read-only mounts, /proc)."""
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RecapError(f"--out {target.out}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=TEMP_MARK):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RecapError(
            f"--out {target.out} cannot be written: no file can be made in {existing} ({reason})"
        ) from None
