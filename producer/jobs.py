"""Jobs as the producer makes them: the one job-name rule, the name `recap run` derives,
opening a job, and registering inputs into it (shared by `recap run` and `recap submit`)."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Callable, Iterable, Iterator

from producer.blocklist import Screen
from recap.errors import RecapError
from recap.models import model_slug
from recap.records import InputItem
from recap.settings import Settings
from recap.store import JobInfo, RegisterStats, Store

# The jobs table's name column holds 200 characters (varchar(200) on PostgreSQL); SQLite
# would take more, so the rule is checked here, the same for both.
MAX_JOB_NAME = 200


def job_name_problem(name: str) -> str | None:
    """What breaks the job-name rule, or None: 1 to 200 characters, no control characters,
    no leading or trailing whitespace; any other character (brackets, quotes, non-ASCII)."""
    if not name:
        return "is empty: a job name has 1 to 200 characters"
    if len(name) > MAX_JOB_NAME:
        return f"has {len(name)} characters: a job name has at most {MAX_JOB_NAME}"
    if name != name.strip():
        return "starts or ends with whitespace"
    for char in name:
        category = unicodedata.category(char)
        if category == "Cc":
            return f"holds a control character (U+{ord(char):04X})"
        if category == "Cs":  # undecodable bytes in the command line
            return "is not valid text (undecodable bytes)"
    return None


def check_job_name(name: str, flag: str = "--job") -> str:
    """`name` when it keeps the rule, else a one-line `RecapError` naming it."""
    problem = job_name_problem(name)
    if problem is not None:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise RecapError(f"{flag} {shown!r} {problem}")
    return name


def derive_job_name(inputs: list[str], settings: Settings, model: str) -> str:
    """Same inputs, model, prompt and generation settings, same name: running `recap run`
    again resumes; changing any of them starts a new job. (Inputs as typed: a file whose
    contents change keeps its name; `producer.input_job` finds the job of its contents.)"""
    recipe = json.dumps(
        [model, settings.prompt, settings.generation().to_json(), sorted(inputs)], sort_keys=True
    )
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    return check_job_name(f"run-{model_slug(model)[:40]}-{digest}")


def open_job(store: Store, settings: Settings, name: str, model: str) -> JobInfo:
    """Create (or reopen) the job with the model, prompt and generation settings it owns."""
    return store.ensure_job(
        name=check_job_name(name),
        model=model,
        prompt=settings.prompt,
        generation=settings.generation(),
        chunk_size=settings.chunk_size,
    )


def register_inputs(
    store: Store,
    job: JobInfo,
    inputs: list[str],
    columns,
    limit: int | None = None,
    on_batch: Callable[[RegisterStats], None] | None = None,
    read_stats=None,
) -> RegisterStats:
    """Read `inputs` into the job's items; `read_stats` (a `ReadStats`) learns what the
    readers saw and left out. Items on the blocklist (a domain, a key, a URL, the input's
    sha256) are registered, then end failed `opted_out` before any request."""
    from producer.readers import read_items  # pyarrow and fsspec: only when reading

    screen = Screen(store.blocklist())
    items = screen.batches(read_items(inputs, columns, stats=read_stats))
    stats = store.register_items(job, items, on_batch=on_batch, limit=limit)
    if screen.blocked:
        store.refuse_blocked(job, screen.blocked)
    return stats


def first_rows(batches: Iterable[list[InputItem]], limit: int | None) -> Iterator[list[InputItem]]:
    """The batches cut after `limit` rows (duplicates count), as `register_items` cuts them."""
    read = 0
    for batch in batches:
        if limit is not None:
            batch = batch[: max(0, limit - read)]
        if not batch:
            return
        read += len(batch)
        yield batch
