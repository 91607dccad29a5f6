"""Celery task glue: typed arguments in, one runtime per worker process."""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_process_init, worker_process_shutdown

from recap.settings import get_settings
from recap.store import ChunkRef
from workers.celery_app import CAPTION_TASK, app

log = logging.getLogger(__name__)
_runtime = None
_runtime_lock = threading.Lock()


def get_runtime():
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from workers.runtime import WorkerRuntime

            _runtime = WorkerRuntime(get_settings())
        return _runtime


@worker_process_init.connect
def _warm_up(**_kwargs) -> None:
    """Per-process start: cheap set-up only (store, feeder); the model loads on first use."""
    get_runtime()


@worker_process_shutdown.connect
def _shut_down(**_kwargs) -> None:
    if _runtime is not None:
        _runtime.close()


@app.task(name=CAPTION_TASK, ignore_result=True)
def caption_chunk(job_id: int, chunk_no: int) -> str:
    """Caption the pending items of chunk `chunk_no` of job `job_id`."""
    return get_runtime().handle_chunk(ChunkRef(int(job_id), int(chunk_no)))
