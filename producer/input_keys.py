"""The distinct keys of one reading of the inputs, on disk: `recap run` compares them with a
job's items to find the job that holds exactly its input. A billion keys do not fit in
memory; in a scratch SQLite file they take about 30 bytes each (a 16-byte digest per key,
indexed), and the file is deleted when the run has chosen its job."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from recap.records import InputItem

# Keys looked up per query: well under SQLite's bound-parameter limit.
_LOOKUP_BATCH = 5000


def _digest(key: str) -> bytes:
    """16 bytes of BLAKE2b: two distinct keys share one with odds of 2^-128 per pair."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class InputKeys:
    """A set of item keys in a scratch SQLite file: `add` batches, `len`, `count_missing`."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, check_same_thread=False)
        # Scratch data, rebuilt by the next run: no journal, no fsync.
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("CREATE TABLE keys (digest BLOB PRIMARY KEY) WITHOUT ROWID")

    @classmethod
    @contextlib.contextmanager
    def scratch(cls) -> Iterator[InputKeys]:
        """An empty set in a temporary folder (TMPDIR), removed on leaving."""
        with tempfile.TemporaryDirectory(prefix="recap-input-keys-") as folder:
            keys = cls(Path(folder) / "keys.db")
            try:
                yield keys
            finally:
                keys._db.close()

    def add(self, items: Iterable[InputItem]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO keys VALUES (?)", ((_digest(item.key),) for item in items)
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM keys").fetchone()[0]

    def count_missing(self, keys: list[str]) -> int:
        """How many of `keys` (distinct) are not in the set."""
        found = 0
        for start in range(0, len(keys), _LOOKUP_BATCH):
            part = [_digest(k) for k in keys[start : start + _LOOKUP_BATCH]]
            marks = ",".join("?" * len(part))
            found += self._db.execute(
                f"SELECT count(*) FROM keys WHERE digest IN ({marks})", part
            ).fetchone()[0]
        return len(keys) - found
