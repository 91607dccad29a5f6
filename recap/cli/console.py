"""The terminal: consoles that print user text (job names, paths, URLs, column names, messages
quoting them) exactly as it is. rich reads `[...]` as markup and `:name:` as an emoji code by
default, so a job named `[/]` crashed every command that printed it and `[bold]x[/bold]`
printed styled; here a style is given only as a style, never inside the text."""

from __future__ import annotations

from rich.console import Console, RenderableType
from rich.status import Status
from rich.text import Text


def plain(renderable: RenderableType) -> RenderableType:
    """A str as literal text (rich would read it as markup); any other renderable as it is."""
    return Text(renderable) if isinstance(renderable, str) else renderable


class PlainStatus(Status):
    """rich's spinner reads its text as markup whatever the console says: give it Text."""

    def __init__(self, status: RenderableType, **kwargs) -> None:
        super().__init__(plain(status), **kwargs)

    def update(self, status: RenderableType | None = None, **kwargs) -> None:
        super().update(None if status is None else plain(status), **kwargs)


class PlainConsole(Console):
    """A console with markup, emoji codes and highlighting off."""

    def __init__(self, **kwargs) -> None:
        super().__init__(markup=False, emoji=False, highlight=False, **kwargs)

    def status(self, status: RenderableType, **kwargs) -> Status:  # type: ignore[override]
        return PlainStatus(status, console=self, **kwargs)


out = PlainConsole()
err = PlainConsole(stderr=True)


def labelled(label: str, style: str, text: str) -> Text:
    """`label text`, the label styled (e.g. "error:" in red), the text exactly as given."""
    return Text.assemble((label, style), " ", text)


def say(text: str, *, to: Console = out, label: str | None = None, style: str = "") -> None:
    """Print one line as it is, optionally after a styled label; never broken at the width."""
    to.print(labelled(label, style, text) if label else Text(text), soft_wrap=True)
