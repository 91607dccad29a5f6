"""One file to read: where it was found, what its name says it holds, how to open it."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import IO

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem, make_path_posix
from fsspec.utils import infer_compression

from recap.errors import RecapError, one_line


class InputError(RecapError):
    """An input that cannot be read as given: one line, exit code 2."""


def error_line(exc: BaseException) -> str:
    """An exception's message on one line for an `InputError` (its type when it has none)."""
    return one_line(exc, limit=300) or type(exc).__name__


@dataclass(frozen=True)
class FileFormat:
    """What a file name says about its contents: "a.csv.gz" is ".csv" compressed with gzip."""

    ext: str  # lower-case with its dot, "" when none: the key of the reader registry
    compression: str | None  # fsspec's compression name
    compressed_ext: str = ""  # the compression's own extension as named (".gz"), "" when none

    @classmethod
    def of(cls, name: str) -> FileFormat:
        lower = name.lower()
        compression = infer_compression(lower)
        if compression == "zip":  # a zip is an archive of files, not a compressed stream
            compression = None
        compressed_ext = ""
        if compression is not None:
            cut = lower.rfind(".")
            lower, compressed_ext = lower[:cut], lower[cut:]
        return cls(posixpath.splitext(lower)[1], compression, compressed_ext)

    @property
    def shown(self) -> str:
        """As a message names it: ".csv.gz", ".md", "(no extension)"."""
        return self.ext + self.compressed_ext or "(no extension)"


@dataclass(frozen=True)
class SidecarPaths:
    """The caption files beside an image file: `a.txt` and `a.json` for `a.jpg`."""

    txt: str | None = None
    json: str | None = None


@dataclass(frozen=True)
class Source:
    """One file to read, with what its reader needs to know about where it was found."""

    fs: AbstractFileSystem
    path: str  # the filesystem's own path (absolute for local files)
    fmt: FileFormat
    root: str  # folder that image keys are relative to
    sidecars: SidecarPaths = field(default_factory=SidecarPaths)  # of an image file
    found: bool = False  # found by walking a folder or matching a glob, not named (outputs.py)

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
        compression = self.fmt.compression if decompress else None
        return self.fs.open(self.path, "rb", compression=compression)

    def open_text(self) -> IO[str]:
        # utf-8-sig: spreadsheet exports start with a BOM; bad bytes become U+FFFD rather
        # than stopping a billion-row read (the fetch then fails that one URL).
        return self.fs.open(
            self.path, "rt", encoding="utf-8-sig", errors="replace", compression=self.fmt.compression
        )
