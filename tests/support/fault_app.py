"""A worker app for fault tests: the real app and task, with chunks listed in
RECAP_TEST_POISON_CHUNKS made to crash inside the task (a poison chunk). The crash comes
from a pipeline handed to the runtime through its constructor, not from a patch."""

from __future__ import annotations

import os

from workers import tasks
from workers.celery_app import app  # noqa: F401  (celery -A finds it here)
from workers.pipeline import CaptionPipeline
from workers.runtime import WorkerRuntime

_POISON = {int(n) for n in os.environ.get("RECAP_TEST_POISON_CHUNKS", "").split(",") if n}


class PoisonedPipeline(CaptionPipeline):
    def run_chunk(self, job, chunk_no, **kwargs):
        if chunk_no in _POISON:
            raise RuntimeError(f"injected crash in chunk {chunk_no}")
        return super().run_chunk(job, chunk_no, **kwargs)


tasks.use_runtime_factory(lambda settings: WorkerRuntime(settings, pipeline_factory=PoisonedPipeline))
