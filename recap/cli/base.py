"""What every command shares: the Typer apps, the consoles, one-line errors (exit 2 for
what the user can fix, 1 for a service that is down), settings and stores."""

from __future__ import annotations

import functools
from typing import Annotated

import typer
from sqlalchemy.exc import DBAPIError

from recap import __version__
from recap.cli.console import err, out, say  # noqa: F401  (the commands take the consoles from here)
from recap.db import database_url_or_default, require_current_schema, require_postgres, upgrade
from recap.errors import RecapError, ServiceUnavailable, describe, one_line
from recap.settings import InvalidSettings, Settings, get_settings
from recap.store import Store
from recap.transient import is_transient

app = typer.Typer(
    name="recap",
    help="Re-caption web-scale image datasets with LLaMA-3 vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
dev_app = typer.Typer(help="Developer tools: tiny offline models.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(dev_app, name="dev")


def _print_version(asked: bool) -> None:
    if asked:
        say(f"recap {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    pass  # only the options every command shares; the app's help text says what recap is


def command(group: typer.Typer, *args, **kwargs):
    """Register a command whose user errors end in one line and exit code 2."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            try:
                return fn(*a, **k)
            except RecapError as exc:
                say(str(exc), to=err, label="error:", style="red")
                raise typer.Exit(2) from None
            except Exception as exc:
                reason = _unreachable(exc)
                if reason is None:
                    raise
                say(reason, to=err, label="error:", style="red")
                raise typer.Exit(1) from None

        return group.command(*args, **kwargs)(wrapper)

    return decorate


def _unreachable(exc: BaseException) -> str | None:
    """A one-line reason when a service is down (exit 1), else None (a bug: traceback)."""
    if isinstance(exc, ServiceUnavailable):
        return str(exc)
    if not is_transient(exc):
        return None
    if isinstance(exc, DBAPIError):
        text = str(exc.orig or exc).strip()
        return f"cannot reach the database: {text.splitlines()[0] if text else type(exc).__name__}"
    return f"cannot reach the broker: {describe(exc)}"


def read_settings() -> Settings:
    """Every command's settings, checked: a bad one is one line naming it (RECAP_<NAME>)."""
    try:
        return get_settings()
    except InvalidSettings as exc:
        raise RecapError(f"invalid settings: {one_line(exc)}") from None


def local_store(create: bool = False) -> Store:
    """`recap run`/`status`/`export`: RECAP_DATABASE_URL, else ./recap.db.

    Only `run` creates the schema; the readers say what is missing instead."""
    url = database_url_or_default(read_settings().database_url)
    if create:
        upgrade(url)
    else:
        require_current_schema(url)
    return Store(url)


def fleet_store(command_name: str) -> Store:
    url = require_postgres(read_settings().database_url, command_name)
    require_current_schema(url)
    return Store(url)


# Column options shared by `run` and `submit`.
UrlCol = Annotated[str, typer.Option(help="Column holding the image URL.")]
CaptionCol = Annotated[
    str | None, typer.Option(help="Column holding the original caption (default: text, else caption).")
]
IdCol = Annotated[str | None, typer.Option(help="Column holding the item key (default: sha256 of the URL).")]
ShaCol = Annotated[str | None, typer.Option(help="Column holding the expected image sha256.")]
Inputs = Annotated[list[str], typer.Argument(help="Files, folders, globs or fsspec URLs.")]
ModelOpt = Annotated[
    str | None, typer.Option(help="Model id, local folder, or 'tiny' (default: RECAP_MODEL).")
]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="Only the first N items (a canary run).")]


def columns(url_col, caption_col, id_col, sha256_col):
    from producer.readers import ColumnOptions  # pyarrow and fsspec: only when reading

    return ColumnOptions(url_col=url_col, caption_col=caption_col, id_col=id_col, sha256_col=sha256_col)
