"""A file written under a temporary name beside its final path and renamed into place when
complete, so that a failed export (disk full, a size limit, an exception) never leaves a
half-written file under the final name nor touches the previous one."""

from __future__ import annotations

import os
import posixpath
import re
import secrets
from typing import BinaryIO

from fsspec import AbstractFileSystem

from producer.export.folder import TEMP_MARK

_TOKEN_BYTES = 6


class StagedFile:
    def __init__(self, fs: AbstractFileSystem, final: str, local: bool):
        folder, name = posixpath.split(final)
        self.fs = fs
        self.final = final
        self.temp = posixpath.join(folder, f"{TEMP_MARK}{secrets.token_hex(_TOKEN_BYTES)}-{name}")
        self.local = local
        self.file: BinaryIO | None = None

    def open(self) -> BinaryIO:
        # Closed by close, publish or discard: the file outlives this call.
        self.file = open(self.temp, "xb") if self.local else self.fs.open(self.temp, "wb")  # noqa: SIM115
        return self.file

    def close(self) -> None:
        """Flush to the disk, so that the rename publishes complete bytes even after a crash."""
        if self.file is None or self.file.closed:
            return
        self.file.flush()
        if self.local:
            os.fsync(self.file.fileno())
        self.file.close()

    def publish(self) -> None:
        self.close()
        if self.local:
            os.replace(self.temp, self.final)  # atomic: readers see the old file or the new one
        else:
            self.fs.mv(self.temp, self.final)

    def discard(self) -> None:
        """Best effort: this runs while another error is on its way to the user."""
        try:
            if self.file is not None:
                self.file.close()
        except Exception:
            pass
        try:
            if self.fs.exists(self.temp):
                self.fs.rm(self.temp)
        except Exception:
            pass


def remove_leftovers(fs: AbstractFileSystem, final: str) -> None:
    """Best effort: remove what killed exports of `final` left under temporary names (an
    exception cleans up after itself; SIGKILL cannot)."""
    folder, name = posixpath.split(final)
    leftover = re.compile(re.escape(TEMP_MARK) + f"[0-9a-f]{{{2 * _TOKEN_BYTES}}}-" + re.escape(name))
    try:
        for path in fs.ls(folder, detail=False):
            if leftover.fullmatch(posixpath.basename(path)):
                fs.rm(path)
    except OSError:
        pass
