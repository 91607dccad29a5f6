"""`recap report`: one self-contained HTML page of a job: a random sample of done items with
their images and both captions, failed items by error class, charts, and the job's set-up.
The store samples and counts (recap/store/report.py), workers/thumbnails.py reads the
images again, producer/report/ renders the page."""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from producer.report import ReportPage, SampleRow, render
from recap.cli.base import app, command, err, local_store, read_settings, say
from recap.errors import RecapError
from recap.store import JobInfo, Store
from recap.store.report import SampledItem
from workers.thumbnails import Thumbnailer

EXAMPLES_PER_CLASS = 5


@command(app, "report")
def report(
    job: Annotated[str, typer.Option(help="Job name.")],
    out_path: Annotated[Path, typer.Option("--out", help="The HTML file to write.")],
    sample: Annotated[int, typer.Option(min=0, max=10_000, help="Random done items to show.")] = 100,
) -> None:
    """Write one HTML page that opens offline: a random sample of done items with their
    images, original and new captions, flags and scores; failed items by error class;
    charts; the job's model, prompt, generation settings and provenance."""
    _check_out(out_path)  # before anything is sampled or fetched
    settings = read_settings()
    store = local_store()
    job_info = store.get_job(job)
    page = _page(store, job_info, sample, settings)
    _write(out_path, render(page))
    say(f"wrote a report of {len(page.sample)} sampled items to {out_path}")


def _page(store: Store, job: JobInfo, sample_size: int, settings) -> ReportPage:
    status = store.job_status(job)
    items = store.sample_items(job, sample_size, expected=status.items.done)
    return ReportPage(
        job=job,
        status=status,
        sample=_thumbnails(items, settings),
        failures=store.failed_examples(job, list(status.errors), EXAMPLES_PER_CLASS),
        throughput=store.throughput(job),
        provenances=store.provenances(i.provenance_id for i in items if i.provenance_id is not None),
        generated_at=datetime.now(UTC),
    )


def _thumbnails(items: list[SampledItem], settings) -> list[SampleRow]:
    progress = Progress(
        TextColumn("reading images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )
    with progress, Thumbnailer(settings) as thumbnailer:
        task = progress.add_task("images", total=len(items))
        thumbs = list(thumbnailer.thumbnails(items, lambda n: progress.update(task, completed=n)))
    return [SampleRow(item, t.data_uri, t.missing) for item, t in zip(items, thumbs, strict=True)]


def _check_out(path: Path) -> None:
    """One line, exit 2, for a path the page cannot go to: empty, a folder, a device or
    other non-file, a place where no file can be made."""
    if not str(path).strip() or str(path) == ".":
        raise RecapError("--out is empty: name the HTML file to write")
    if path.is_dir():
        raise RecapError(f"--out {path} is a folder; give the HTML file to write")
    if os.path.lexists(path) and not path.is_file():
        raise RecapError(f"--out {path} exists and is not a regular file: name a new file")
    if not path.parent.is_dir():
        raise RecapError(f"--out {path}: no folder {path.parent}")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise RecapError(f"--out {path} cannot be written: {exc.strerror or exc}") from None


def _write(path: Path, html: str) -> None:
    """Written under a temporary name and renamed: a killed report leaves the old one whole."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as any new file (mkstemp makes it private)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
