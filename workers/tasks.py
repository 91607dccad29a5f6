"""Celery task glue: typed arguments in, one runtime per worker process."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from celery.signals import worker_process_init, worker_process_shutdown

from recap.queue import CAPTION_TASK
from recap.settings import Settings, get_settings
from recap.store import ChunkRef
from workers.celery_app import app
from workers.metrics import serve
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)
_runtime = None
_runtime_lock = threading.Lock()
_make_runtime: Callable[[Settings], WorkerRuntime] = WorkerRuntime


def use_runtime_factory(make_runtime: Callable[[Settings], WorkerRuntime]) -> None:
    """Build this process's runtime with `make_runtime(settings)` (a test app hands the
    runtime its own collaborators this way); call it before the first task."""
    global _make_runtime
    _make_runtime = make_runtime


def get_runtime() -> WorkerRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = _make_runtime(get_settings())
        return _runtime


@worker_process_init.connect
def _warm_up(**_kwargs) -> None:
    """Per-process start: cheap set-up only (store, feeder); the model loads on first use."""
    runtime = get_runtime()
    from workers.prepare import missing_codecs, pillow_build  # Pillow: in the pool child only

    serve(runtime.settings.metrics_port)
    log.info("images are prepared with %s", pillow_build())
    if missing_codecs():
        log.warning("this Pillow lacks %s: such images fail as not_image", ", ".join(missing_codecs()))


def _stop_gracefully_on_sigterm(runtime) -> None:
    """SIGTERM (a deploy, a preemption notice) lets the batch on the GPU finish and be
    written and gives the rest of the chunk back; then the task returns and the process
    exits. Installed from the task, since billiard resets signals after process init."""
    if signal.getsignal(signal.SIGTERM) != runtime.on_sigterm:
        signal.signal(signal.SIGTERM, runtime.on_sigterm)


@worker_process_shutdown.connect
def _shut_down(**_kwargs) -> None:
    if _runtime is not None:
        _runtime.close()


@app.task(name=CAPTION_TASK, ignore_result=True)
def caption_chunk(job_id: int, chunk_no: int) -> str:
    """Caption the pending items of chunk `chunk_no` of job `job_id`."""
    runtime = get_runtime()
    if threading.current_thread() is threading.main_thread():
        _stop_gracefully_on_sigterm(runtime)
    return runtime.handle_chunk(ChunkRef(int(job_id), int(chunk_no)))
