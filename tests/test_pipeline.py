"""The worker pipeline on its own: a stop is honoured while images are still loading."""

from __future__ import annotations

import threading
import time

from recap.records import InputItem
from recap.settings import Settings
from recap.store import Store
from workers.engine import TransformersEngine
from workers.pipeline import CaptionPipeline


def test_a_stop_does_not_wait_for_a_batch_of_slow_downloads(sqlite_url, image_server, tiny_model_dir):
    settings = Settings(
        device="cpu", dtype="float32", batch_size=8, max_new_tokens=4, fetch_timeout_s=30, fetch_retries=0
    )
    store = Store(sqlite_url)
    job = store.ensure_job("slow", "tiny", "describe", {}, 8)
    store.register_items(
        job, [[InputItem(f"k{i}", image_server.url(f"/slow?delay=20&seed={i}")) for i in range(8)]]
    )
    pipeline = CaptionPipeline(settings, TransformersEngine(tiny_model_dir, settings), store, "w")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    try:
        outcome = pipeline.run_chunk(job, 0, should_stop=stop.is_set)
    finally:
        pipeline.close()
    assert time.monotonic() - started < 5, "the stop waited for the downloads"
    assert (outcome.done, outcome.failed) == (0, 0)
