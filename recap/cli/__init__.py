"""The `recap` command line, the top layer: the only part of recap/ that imports producer/
or workers/ (docs/ARCHITECTURE.md, "Layers"). Never imports torch or transformers at import
time, so `recap --help` answers fast and producer hosts need no GPU stack."""

from __future__ import annotations

import sys

import typer

try:  # typer 0.2x vendors click under typer._click; older typer uses click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

# Each module registers its commands on the app.
from recap.cli import (  # noqa: F401
    admin,
    convert,
    export,
    fleet,
    forget,
    ops,
    processes,
    report,
    run,
    status,
)
from recap.cli.base import app, err, say

__all__ = ["app", "main"]


def main() -> None:
    """Run the command; a usage error (a bad option or argument) is one line, exit 2."""
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        say(exc.ctx.get_help(), to=err)
        sys.exit(2)
    except click_errors.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "recap"
        say(f"{exc.format_message()} (see {where} --help)", to=err, label="error:", style="red")
        sys.exit(2)
    except typer.Abort:  # Ctrl-C before a command took over
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
