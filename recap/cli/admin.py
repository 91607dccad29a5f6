"""Administration: the database schema and the developer's tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recap.cli.base import command, db_app, dev_app, read_settings, say
from recap.db import database_url_or_default, safe_url, upgrade
from recap.errors import RecapError
from recap.models import TINY_FAMILIES, TINY_WARNING


@command(db_app, "upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema (Alembic `upgrade head`)."""
    url = database_url_or_default(read_settings().database_url)
    upgrade(url)
    say(f"schema is up to date at {safe_url(url)}")


@command(dev_app, "tiny-model")
def dev_tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write the model into.")],
    family: Annotated[str, typer.Option(help=", ".join(TINY_FAMILIES) + ".")] = "llava",
) -> None:
    """Build a tiny random-weight model (real classes) for tests and offline smoke runs."""
    if family not in TINY_FAMILIES:
        raise RecapError(f"unknown family {family!r}: use {', '.join(TINY_FAMILIES)}")
    from workers.tiny_model import build_tiny_model  # torch and transformers: only here

    path = build_tiny_model(directory, family=family)
    say(f"wrote tiny {family} model to {path}; {TINY_WARNING}")
