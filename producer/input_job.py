"""The job of `recap run`'s input as it is now.

`recap run X --out Y` writes exactly the items of X. Its job is named from X as typed (so
the job of an unchanged input keeps its name, and a job made before this rule resumes), and
a job is the input's only while every item it holds is still in the input: a re-run after a
crash, or an input with lines appended, finds all of the job's items and resumes it (only
what is new is captioned). A file whose contents were replaced or cut no longer holds all
of them: its items go to a job of their own, `NAME~2` (then `~3`...), and the earlier job is
kept as it was, captions included; an input that holds every item of it again finds it again.

The input's keys are read once into a scratch set on disk (`InputKeys`) before anything is
written; each candidate job's keys are then looked up in it (a streaming pass over the
job's items, stopped at the first one missing). Registration is untouched, so `recap
submit` pays nothing for this, at any size.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from producer.input_keys import InputKeys
from producer.jobs import MAX_JOB_NAME, first_rows
from recap.states import ItemStatus
from recap.store import JobInfo, Store

_SUCCESSOR = re.compile(r"(.*)~(\d+)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class InputJob:
    """The job name for this input, and the job it no longer matches (kept), if any."""

    name: str
    replaces: str | None = None


def collect_keys(inputs: list[str], columns, limit: int | None, keys: InputKeys, stats) -> None:
    """Every item key of the inputs (the first `limit` rows) into `keys`: reads every file
    in full, so a file that cannot be read fails here, before any job is written."""
    from producer.readers import read_items  # pyarrow and fsspec: only when reading

    for batch in first_rows(read_items(inputs, columns, stats=stats), limit):
        keys.add(batch)


def successor_name(name: str, n: int) -> str:
    """`name~n`, the name cut so that the whole keeps the 200-character rule."""
    suffix = f"~{n}"
    return name[: MAX_JOB_NAME - len(suffix)] + suffix


def job_for_input(store: Store, name: str, keys: InputKeys) -> InputJob:
    """Of `name` and its successors, the biggest job whose items are all in the input (most
    captions reused); else `name` when it is free; else the next free successor."""
    jobs = _family(store, name)
    fitting = [job for n, job in jobs.items() if _held_by(store, job, keys)]
    if fitting:
        best = max(fitting, key=lambda job: store.job_status(job).items.total)
        return InputJob(best.name)
    if 1 not in jobs:
        return InputJob(name)
    n = max(jobs) + 1
    return InputJob(successor_name(name, n), replaces=jobs[max(jobs)].name)


def _family(store: Store, name: str) -> dict[int, JobInfo]:
    """`name` (as 1) and its successors, by number."""
    family = {}
    for job in store.list_jobs():
        if job.name == name:
            family[1] = job
        elif (match := _SUCCESSOR.fullmatch(job.name)) and successor_name(name, int(match[2])) == job.name:
            family[int(match[2])] = job
    return family


def _held_by(store: Store, job: JobInfo, keys: InputKeys) -> bool:
    """Whether every item of `job` is in the input."""
    if store.job_status(job).items.total > len(keys):
        return False
    # closing(): the read ends at the first item missing, with its cursor.
    with contextlib.closing(store.iter_items(job, list(ItemStatus))) as batches:
        return all(keys.count_missing(columns.key) == 0 for columns in batches)
