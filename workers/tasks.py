"""Celery task glue: typed arguments in, one runtime per worker process."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from celery.signals import worker_process_init, worker_process_shutdown, worker_shutting_down

from recap.queue import CAPTION_TASK
from recap.settings import Settings, get_settings
from recap.store import ChunkRef
from workers.celery_app import app
from workers.children import ask_for_signal_on_parent_death, child_pids, send
from workers.metrics import serve
from workers.runtime import WorkerRuntime
from workers.threads import apply_torch_threads

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
    """Per-process start: cheap set-up only (store, feeder); the model loads on first use.
    A pool child stops gracefully when its Celery main process dies, even by SIGKILL."""
    ask_for_signal_on_parent_death(signal.SIGTERM)
    runtime = get_runtime()
    apply_torch_threads(runtime.settings)  # before torch is imported
    from workers.prepare import missing_codecs, pillow_build  # Pillow: in the pool child only

    serve(runtime.settings.metrics_port, runtime.settings.metrics_address)
    log.info("images are prepared with %s", pillow_build())
    if missing_codecs():
        log.warning("this Pillow lacks %s: such images fail as not_image", ", ".join(missing_codecs()))


def _stop_gracefully_on_sigterm(runtime) -> None:
    """SIGTERM (a deploy, a preemption notice) lets the batch on the GPU finish and be
    written and gives the rest of the chunk back; then the task returns and the process
    exits. Installed from the task, since billiard resets signals after process init."""
    if signal.getsignal(signal.SIGTERM) != runtime.on_sigterm:
        signal.signal(signal.SIGTERM, runtime.on_sigterm)


@worker_shutting_down.connect
def _stop_pool_children(how: str = "", **_kwargs) -> None:
    """In the Celery main process: a warm shutdown, however it was asked for (the launcher
    died, or SIGTERM reached this process alone), is the same graceful stop as the
    launcher's SIGTERM to the whole group: each pool child finishes the batch on the GPU,
    gives the rest of its chunk back and exits, instead of running the chunk to its end."""
    if how == "Warm":
        send(child_pids(), signal.SIGTERM)


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
    apply_torch_threads(runtime.settings)  # engine processes may have come or gone since the last chunk
    return runtime.handle_chunk(ChunkRef(int(job_id), int(chunk_no)))
