"""Registering a job and its items from the command line: shared by `run` and `submit`."""

from __future__ import annotations

from producer.jobs import open_job, register_inputs
from recap.cli.base import err
from recap.models import TINY_MODELS, TINY_WARNING


def check_inputs(inputs: list[str]) -> None:
    """A missing input is said before any job is created (nothing is read or walked)."""
    from producer.readers import check_inputs as check  # pyarrow and fsspec: only when reading

    check(inputs)


def open_and_register(store, settings, name, model, inputs, columns, limit):
    """`run` and `submit` alike: the job (which owns its model, prompt and generation
    settings), then its items."""
    job = open_job(store, settings, name, model)
    if model in TINY_MODELS:
        err.print(f"[yellow]note:[/yellow] {TINY_WARNING}")
    register_with_spinner(store, job, inputs, columns, limit)
    return job


def register_with_spinner(store, job, inputs, columns, limit) -> None:
    from producer.readers import ReadStats  # pyarrow and fsspec: only when reading

    read = ReadStats()
    with err.status("reading inputs…") as spinner:
        stats = register_inputs(
            store,
            job,
            inputs,
            columns,
            limit=limit,
            read_stats=read,
            on_batch=lambda s: spinner.update(f"reading inputs… {s.read:,} read, {s.new:,} new"),
        )
    err.print(f"read {read.summary()}")  # rows left out are said, with their reasons
    err.print(f"registered {stats.new:,} new items ({stats.duplicates:,} already known or duplicate)")
