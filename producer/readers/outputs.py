"""recap's own outputs, recognised by content so that a folder walk or a glob never reads
them back as input: `recap run . --out captions/` run twice must not caption its own export.

A file named on the command line is always read as given (to re-caption an export, name it).
"""

from __future__ import annotations

# A folder holding this file is an export folder: nothing in it is input.
EXPORT_MANIFEST = "_recap_export.json"

# Every recap export begins with Recap-DataComp-1B's columns and carries these of its own
# (docs/ARCHITECTURE.md, "Contracts": export columns). The published Recap-DataComp-1B has
# the first ones but not `status` or `job`: it stays an input.
_LEADING_COLUMNS = ("key", "url", "re_caption", "org_caption", "sha256", "re_length", "org_length")
_RECAP_COLUMNS = frozenset({"status", "error_class", "error", "model", "prompt", "generation", "job"})


class RecapOutput(Exception):
    """Raised by a reader, before it yields anything, for a file that is a recap export."""


def is_export_columns(names: list[str]) -> bool:
    """Whether a table's column names (or a JSON line's fields) are a recap export's."""
    return tuple(names[: len(_LEADING_COLUMNS)]) == _LEADING_COLUMNS and set(names) >= _RECAP_COLUMNS
