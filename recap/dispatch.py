"""Dispatch: keep each model's queue fed from the chunks Postgres says are not done.

Part of the core's queue contract. Used by `recap submit` and `recap reconcile`, and by
every worker after each chunk and on a timer, so no long-lived producer is needed and a
Redis that lost its lists costs only time.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

from recap.queue import CAPTION_TASK, producer_app, queue_name
from recap.settings import Settings
from recap.states import ChunkState, JobState
from recap.store import ChunkRef, JobInfo, Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DispatchReport:
    queue: str
    depth_before: int
    enqueued: int


class Dispatcher:
    def __init__(self, store: Store, settings: Settings, app=None):
        self.store = store
        self.settings = settings
        self.app = app or producer_app()  # tasks are sent by name: no worker code needed
        self._redis = None

    def top_up(self, jobs: list[JobInfo] | None = None, model: str | None = None) -> list[DispatchReport]:
        """Enqueue what each model's queue lacks, up to RECAP_MAX_QUEUED_CHUNKS: for `jobs`,
        or else every unfinished job (of `model`, where given); never chunks of a paused or
        cancelled job. Higher-priority jobs' chunks go first (`Store.take_chunks_to_enqueue`)."""
        jobs = self.store.unfinished_jobs(model) if jobs is None else jobs
        by_model: dict[str, list[JobInfo]] = defaultdict(list)
        for job in jobs:
            if job.state is JobState.RUNNING:
                by_model[job.model].append(job)
        return [self._top_up_queue(m, model_jobs) for m, model_jobs in by_model.items()]

    def _top_up_queue(self, model: str, jobs: list[JobInfo]) -> DispatchReport:
        queue = queue_name(model)
        depth = self.queue_depth(queue)
        lost = max(0, self.store.count_chunks([j.id for j in jobs], ChunkState.QUEUED) - depth)
        room = max(0, self.settings.max_queued_chunks - depth)
        refs = self.store.take_chunks_to_enqueue(
            jobs, room, lost, lambda r: self._send(queue, r), lock_key=queue
        )
        if refs:
            log.info("enqueued %d chunk(s) on %s (depth was %d, %d lost)", len(refs), queue, depth, lost)
        return DispatchReport(queue, depth, len(refs))

    def _send(self, queue: str, refs: list[ChunkRef]) -> None:
        with self.app.producer_or_acquire() as producer:
            for ref in refs:
                self.app.send_task(
                    CAPTION_TASK,
                    kwargs={"job_id": ref.job_id, "chunk_no": ref.chunk_no},
                    queue=queue,
                    producer=producer,
                )

    def queue_depth(self, queue: str) -> int:
        """Messages waiting in the Redis list (in-flight ones sit in `unacked`)."""
        if self._redis is None:
            import redis  # a third of a second to import: only once a queue is looked at

            self._redis = redis.Redis.from_url(self.settings.broker_url)
        return int(self._redis.llen(queue))

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
