"""Registering a job and its items from the command line: shared by `run` and `submit`."""

from __future__ import annotations

import shlex

from producer.jobs import open_job, register_inputs
from recap.cli.base import err, say
from recap.models import TINY_MODELS, TINY_WARNING
from recap.store import JobInfo, Store


def check_inputs(inputs: list[str]) -> None:
    """A missing input is said before any job is created (nothing is read or walked)."""
    from producer.readers import check_inputs as check  # pyarrow and fsspec: only when reading

    check(inputs)


def probe_inputs(inputs: list[str], columns) -> None:
    """Every input file's header read before any job is created (see producer.readers.probe)."""
    from producer.readers import probe_inputs as probe  # pyarrow and fsspec: only when reading

    with err.status("checking inputs…"):
        probe(inputs, columns)


def open_and_register(store, settings, name, model, inputs, columns, limit) -> JobInfo:
    """`run` and `submit` alike: the job (which owns its model, prompt and generation
    settings), then its items. A file that turns out unreadable midway (a .gz cut short)
    stops the command with one line saying what was registered and how to remove it; a job
    this command made and left empty is removed."""
    from producer.readers import InputError  # pyarrow and fsspec: only when reading

    existed = store.find_job(name) is not None
    job = open_job(store, settings, name, model)
    if model in TINY_MODELS:
        say(TINY_WARNING, to=err, label="note:", style="yellow")
    before = store.job_status(job).items.total
    try:
        register_with_spinner(store, job, inputs, columns, limit)
    except InputError as exc:
        raise InputError(f"{exc}; {_left_behind(store, job, existed, before)}") from None
    return job


def _left_behind(store: Store, job: JobInfo, existed: bool, before: int) -> str:
    added = store.job_status(job).items.total - before
    if added == 0 and not existed:
        store.drop_job(job)
        return "nothing was registered"
    drop = f"recap drop --job {shlex.quote(job.name)} --yes"
    if added == 0:
        return f"nothing was added to job {job.name}"
    held = "" if not existed else f" (it now holds {before + added:,} with those from before)"
    return (
        f"{added:,} items read before it were registered in job {job.name}{held}: fix the input and "
        f"run the same command again (what is registered is kept), or remove the job: {drop}"
    )


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
    say(f"read {read.summary()}", to=err)  # rows left out are said, with their reasons
    say(f"registered {stats.new:,} new items ({stats.duplicates:,} already known or duplicate)", to=err)
