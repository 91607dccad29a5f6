"""Registering a job and its items: shared by `recap run` and `recap submit`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from recap.models import model_slug
from recap.settings import Settings
from recap.store import JobInfo, RegisterStats, Store


def derive_job_name(inputs: list[str], settings: Settings, model: str) -> str:
    """Same inputs, model, prompt and generation settings, same name: running `recap run`
    again resumes; changing any of them starts a new job."""
    recipe = json.dumps([model, settings.prompt, settings.generation(), sorted(inputs)], sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    return f"run-{model_slug(model)[:40]}-{digest}"


def open_job(store: Store, settings: Settings, name: str, model: str) -> JobInfo:
    """Create (or reopen) the job with the model, prompt and generation settings it owns."""
    return store.ensure_job(
        name=name,
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
    readers saw and left out."""
    from producer.readers import read_items

    items = read_items(inputs, columns, stats=read_stats)
    return store.register_items(job, items, on_batch=on_batch, limit=limit)
