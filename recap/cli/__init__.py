"""The `recap` command line, the top layer: the only part of recap/ that imports producer/
or workers/ (docs/ARCHITECTURE.md, "Layers"). Never imports torch or transformers at import
time, so `recap --help` answers fast and producer hosts need no GPU stack."""

from __future__ import annotations

import sys

from recap.cli import admin, convert, export, fleet, forget, ops, processes, report, run, status  # noqa: F401  (each registers its commands)
from recap.cli.base import app

__all__ = ["app", "main"]


def main() -> None:
    sys.exit(app())
