"""What the readers saw: rows read, items kept, and every row or file left out, by reason.

Rejections are counted as values (as datatrove's pipeline steps count what they drop), never
logged one by one: a billion-row input with a few bad rows says so in one summary line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum


class SkipReason(str, Enum):
    """Why a row is not an item; the values are the keys of `ReadStats.rows_skipped`."""

    BLANK_LINE = "blank_line"
    COMMENT = "comment"
    NO_URL = "no_url"  # null, empty or blank URL
    INVALID_URL = "invalid_url"  # a URL no database can store (a NUL byte)
    NO_ID = "no_id"  # null or empty --id-col value
    BAD_ROW = "bad_row"  # CSV/TSV row with the wrong number of fields
    BAD_JSON = "bad_json"  # JSONL line that is not a JSON object
    NO_IMAGE = "no_image"  # shard sample without an image member (e.g. an orphan .txt)
    BAD_MEMBER_NAME = "bad_member_name"  # a member name fsspec's chained URL cannot address


# The `files_skipped` key of dotfiles (.DS_Store, macOS ._a.jpg); others count by extension.
HIDDEN_FILES = "(hidden)"
# The `files_skipped` key of recap's own exports found in a folder or by a glob.
RECAP_OUTPUT = "(recap export)"


@dataclass
class ReadStats:
    """What `read_items` saw. Invariant: rows_read == items + sum(rows_skipped.values())."""

    files: int = 0  # files read (every image file of a folder counts)
    rows_read: int = 0  # table rows / lines, shard samples, image files
    items: int = 0  # items yielded
    rows_skipped: Counter[str] = field(default_factory=Counter)  # SkipReason value -> rows
    files_skipped: Counter[str] = field(default_factory=Counter)  # extension -> files
    bad_sidecars: int = 0  # unreadable or oversized .txt/.json captions (item still kept)

    def keep(self, n: int = 1) -> None:
        """`n` rows read became items."""
        self.rows_read += n

    def skip(self, reason: SkipReason, n: int = 1) -> None:
        """`n` rows read were left out, for `reason`."""
        self.rows_read += n
        self.rows_skipped[reason.value] += n

    def skip_files(self, kind: str, n: int = 1) -> None:
        """`n` files were not read: `kind` is their extension, HIDDEN_FILES or RECAP_OUTPUT."""
        self.files_skipped[kind] += n

    def bad_sidecar(self) -> None:
        """A caption file could not be read; its image is still an item."""
        self.bad_sidecars += 1

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
