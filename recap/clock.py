"""Times as the store and the export hand them on: always timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def as_utc(value: datetime | str) -> datetime:
    """A timezone-aware UTC datetime from a database value, an ISO string or a naive time
    (SQLite returns aggregates as text and timestamps without a zone: they are UTC)."""
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when
