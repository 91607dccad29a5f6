"""A worker app for fault tests: the real app and task, with chunks listed in
RECAP_TEST_POISON_CHUNKS made to crash inside the task (a poison chunk)."""

from __future__ import annotations

import os

from workers import runtime as _runtime
from workers import tasks  # noqa: F401  (registers the task)
from workers.celery_app import app  # noqa: F401  (celery -A finds it here)

_POISON = {int(n) for n in os.environ.get("RECAP_TEST_POISON_CHUNKS", "").split(",") if n}
_original = _runtime.WorkerRuntime.pipeline


def _pipeline_with_poison(self):
    pipeline = _original(self)
    if not getattr(pipeline, "_poisoned", False):
        run_chunk = pipeline.run_chunk

        def run_chunk_or_crash(job, chunk_no, **kwargs):
            if chunk_no in _POISON:
                raise RuntimeError(f"injected crash in chunk {chunk_no}")
            return run_chunk(job, chunk_no, **kwargs)

        pipeline.run_chunk = run_chunk_or_crash
        pipeline._poisoned = True
    return pipeline


_runtime.WorkerRuntime.pipeline = _pipeline_with_poison
