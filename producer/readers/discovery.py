"""From the inputs as given (files, folders, globs; local paths or fsspec URLs) to the files
to read, in order, each with the sidecar captions found beside it. Nothing is read here."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import fsspec.core
from fsspec import AbstractFileSystem

from producer.readers.images import IMAGE_EXTENSIONS, JSON, SIDECAR_EXTENSIONS, TXT
from producer.readers.outputs import EXPORT_MANIFEST
from producer.readers.registry import reader_for, supported_formats
from producer.readers.source import FileFormat, InputError, SidecarPaths, Source, error_line
from producer.readers.stats import HIDDEN_FILES, RECAP_OUTPUT, ReadStats


class InputKind(Enum):
    FOLDER = "folder"
    FILE = "file"
    GLOB = "glob"


@dataclass(frozen=True)
class CheckedInput:
    """One input as given, checked: a folder, a file, or a glob's matches."""

    fs: AbstractFileSystem
    path: str
    kind: InputKind
    matches: tuple[str, ...] = ()  # of a glob


def check_inputs(inputs: list[str]) -> list[CheckedInput]:
    """Every input checked (exists, readable format, a glob matches), none read or walked:
    a typo in the last one fails the command at once, not after hours on the others."""
    if isinstance(inputs, str):  # a lone string would be read letter by letter
        inputs = [inputs]
    return [_check_input(raw) for raw in inputs]


def sources(inputs: list[str], stats: ReadStats) -> Iterator[Source]:
    """The files to read, in input order; files left out are counted in `stats`."""
    for given in check_inputs(inputs):
        if given.kind is InputKind.FOLDER:
            yield from _walk(given.fs, given.path, stats)
        elif given.kind is InputKind.FILE:
            yield from _files(given.fs, [given.path], posixpath.dirname(given.path), stats, found=False)
        else:
            yield from _glob(given.fs, given.path, given.matches, stats)


def expand_inputs(inputs: list[str]) -> list[str]:
    """The files `read_items` would read, in its order: absolute local paths or fsspec
    URLs (sidecar captions and unsupported files in folders are left out)."""
    return [src.location for src in sources(inputs, ReadStats())]


def _check_input(raw: str) -> CheckedInput:
    fs, path = _url_to_fs(raw)
    if fs.isdir(path):
        return CheckedInput(fs, path, InputKind.FOLDER)
    if fs.isfile(path):
        fmt = FileFormat.of(path)
        if reader_for(fmt) is None:
            raise InputError(
                f"input {raw}: unsupported format {fmt.shown} (supported: {supported_formats()})"
            )
        return CheckedInput(fs, path, InputKind.FILE)
    if _has_magic(path):
        matches = tuple(sorted(fs.glob(path)))
        if not matches:
            raise InputError(f"input {raw} matches nothing")
        return CheckedInput(fs, path, InputKind.GLOB, matches)
    raise InputError(f"input {raw} does not exist")


def _url_to_fs(raw: str) -> tuple[AbstractFileSystem, str]:
    text = str(raw)
    if "://" not in text and text.startswith("~"):
        text = posixpath.expanduser(text)
    try:
        return fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as exc:  # unknown protocol, missing driver (s3fs...)
        raise InputError(f"input {raw}: {error_line(exc)}") from exc


def _has_magic(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") and part not in (".", "..") for part in relative.split("/"))


def _glob_base(path: str) -> str:
    """The folder before the first wildcard: keys of matched images are relative to it."""
    parts = path.split("/")
    fixed = next(i for i, part in enumerate(parts) if _has_magic(part))
    return "/".join(parts[:fixed]) or "/"


class _Directory:
    """The files of one directory by (stem, extension), indexed once per directory: a
    .txt/.json named like an image there is its sidecar, not an input."""

    def __init__(self, fs: AbstractFileSystem, path: str, names: set[str]):
        self.fs = fs
        self.path = path
        self._by_stem = {(posixpath.splitext(n)[0], posixpath.splitext(n)[1].lower()): n for n in names}
        self._image_stems = {stem for stem, ext in self._by_stem if ext in IMAGE_EXTENSIONS}

    def is_sidecar(self, name: str) -> bool:
        stem, ext = posixpath.splitext(name)
        return ext.lower() in SIDECAR_EXTENSIONS and stem in self._image_stems

    def sidecars_of(self, image_name: str) -> SidecarPaths:
        stem = posixpath.splitext(image_name)[0]

        def path(ext: str) -> str | None:
            name = self._by_stem.get((stem, ext))
            return None if name is None else posixpath.join(self.path, name)

        return SidecarPaths(txt=path(TXT), json=path(JSON))

    def sources(self, names: list[str], root: str, stats: ReadStats, found: bool) -> Iterator[Source]:
        """Sources for `names` (files of this directory, in order); image keys relative to
        `root`; `found`: by a folder walk or a glob, not named."""
        for name in names:
            if self.is_sidecar(name):
                continue
            fmt = FileFormat.of(name)
            if reader_for(fmt) is None:
                stats.skip_files(fmt.shown)
                continue
            sidecars = self.sidecars_of(name) if fmt.ext in IMAGE_EXTENSIONS else SidecarPaths()
            yield Source(self.fs, posixpath.join(self.path, name), fmt, root, sidecars, found)


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
    if EXPORT_MANIFEST in entries and not entries[EXPORT_MANIFEST]:  # a recap export folder
        stats.skip_files(RECAP_OUTPUT, sum(not is_dir for is_dir in entries.values()))
        return
    hidden = [n for n, is_dir in entries.items() if n.startswith(".") and not is_dir]
    if hidden:  # .DS_Store, macOS ._a.jpg; hidden folders (.git, .cache) are pruned
        stats.skip_files(HIDDEN_FILES, len(hidden))
    listing = _Directory(fs, directory, {n for n, is_dir in entries.items() if not is_dir})
    # name + "/" for folders sorts "a.txt" before "a/..." as a sorted path listing does.
    for name in sorted(
        (n for n in entries if n and not n.startswith(".")), key=lambda n: n + "/" * entries[n]
    ):
        if entries[name]:
            yield from _walk(fs, root, stats, posixpath.join(directory, name))
        else:
            yield from listing.sources([name], root, stats, found=True)


def _files(
    fs: AbstractFileSystem, paths: list[str], root: str, stats: ReadStats, found: bool
) -> Iterator[Source]:
    """Files named (`found` False) or matched, grouped by directory so image sidecars are
    found once."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        groups.setdefault(posixpath.dirname(path), []).append(posixpath.basename(path))
    for directory, names in groups.items():
        siblings = set(names)
        if any(FileFormat.of(n).ext in IMAGE_EXTENSIONS for n in names):
            siblings |= {posixpath.basename(p) for p in fs.ls(directory, detail=False)}
        yield from _Directory(fs, directory, siblings).sources(names, root, stats, found)


def _glob(
    fs: AbstractFileSystem, pattern: str, matches: tuple[str, ...], stats: ReadStats
) -> Iterator[Source]:
    base = _glob_base(pattern)
    files = []
    for match in matches:
        if _is_hidden(posixpath.relpath(match, base)):  # as a shell's glob leaves them out
            stats.skip_files(HIDDEN_FILES)
            continue
        if fs.isdir(match):
            yield from _walk(fs, match, stats)
        else:
            files.append(match)
    yield from _files(fs, files, base, stats, found=True)
