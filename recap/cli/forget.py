"""`recap forget`: remove images after the fact, on request, and keep them out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recap.cli.base import app, command, local_store, say
from recap.errors import RecapError
from recap.store.forget import BlockKind


@command(app, "forget")
def forget(
    urls: Annotated[Path | None, typer.Option("--urls", help="A file of image URLs, one a line.")] = None,
    keys: Annotated[Path | None, typer.Option("--keys", help="A file of item keys, one a line.")] = None,
    sha256: Annotated[
        Path | None, typer.Option("--sha256", help="A file of image sha256s, one a line.")
    ] = None,
    domains: Annotated[
        Path | None, typer.Option("--domains", help="A file of domains (and their subdomains), one a line.")
    ] = None,
    job: Annotated[str | None, typer.Option(help="Only this job (default: every job).")] = None,
) -> None:
    """Remove these images' captions and metadata from every job (or one), and block them:
    later `submit` and `run` end them `opted_out` without captioning them. No prompt."""
    from producer.blocklist import read_selection  # reads files only when asked to

    given = {
        BlockKind.URL_HASH: urls,
        BlockKind.KEY: keys,
        BlockKind.SHA256: sha256,
        BlockKind.DOMAIN: domains,
    }
    chosen = [(kind, path) for kind, path in given.items() if path is not None]
    if len(chosen) != 1:
        raise RecapError("give exactly one of --urls, --keys, --sha256 or --domains")
    kind, path = chosen[0]
    selection, values = read_selection(path, kind)
    store = local_store()
    jobs = [store.get_job(job)] if job else store.list_jobs()
    store.block(kind, values, f"recap forget --{_FLAG[kind]} {path.name}")  # first: workers refuse them now
    removed = store.forget(selection, jobs)
    for entry in removed:
        say(f"job {entry.job}: removed {entry.items} item{'' if entry.items == 1 else 's'}")
    say(f"blocklist: {len(values)} {kind.value} entr{'y' if len(values) == 1 else 'ies'} kept")
    say(
        "files exported before now cannot be recalled by recap: delete or re-export them "
        "(`recap export` no longer shows the removed items)",
        label="note:",
        style="yellow",
    )


_FLAG = {
    BlockKind.URL_HASH: "urls",
    BlockKind.KEY: "keys",
    BlockKind.SHA256: "sha256",
    BlockKind.DOMAIN: "domains",
}
