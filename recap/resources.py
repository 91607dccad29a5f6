"""Locate files that live at the repository root in a checkout and inside the wheel when installed."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_path(name: str) -> Path:
    """`alembic`, `alembic.ini` or `config`: bundled copy first, else the checkout's."""
    bundled = _PACKAGE_DIR / "_bundled" / name
    if bundled.exists():
        return bundled
    return _PACKAGE_DIR.parent / name
