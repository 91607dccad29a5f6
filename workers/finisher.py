"""A chunk's finisher: the background thread that writes what a chunk's task left behind.

The task returns once nothing but a few stragglers (images still loading) and the batches
still in a streaming engine remain, so the next chunk starts loading and the engine stays
busy. The finisher keeps the chunk's lease meanwhile: it captions each straggler as it
arrives, writes the engine's batches as they finish, and finishes the chunk. If the
process dies first, the lease runs out and another worker takes the chunk's pending items:
nothing is done twice.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from recap.errors import describe
from recap.store import ClaimedChunk, JobInfo
from workers.engine.protocol import EngineFatalError
from workers.image_feed import END, STOP_POLL_S, FormingBatch, ImageFeed
from workers.in_flight import Flight
from workers.results import ChunkOutcome

if TYPE_CHECKING:
    from workers.pipeline import CaptionPipeline

log = logging.getLogger(__name__)


class Finisher:
    def __init__(
        self,
        pipeline: CaptionPipeline,
        job: JobInfo,
        lease: ClaimedChunk,
        flight: Flight,
        feed: ImageFeed | None,
        stragglers: int,
    ):
        self.pipeline = pipeline
        self.job = job
        self.lease = lease
        self.flight = flight
        self.feed = feed
        self.stragglers = stragglers
        flight.hand_over(ChunkOutcome(job.id, lease.chunk_no))

    def run(self) -> None:
        job_id, chunk_no = self.job.id, self.lease.chunk_no
        try:
            self._caption_stragglers()
            self.flight.wait_all(should_stop=self.lease.lost.is_set)
            if self.lease.lost.is_set():
                log.warning("chunk %s/%s was taken over: its finisher stops", job_id, chunk_no)
            elif self.stragglers:  # the worker is stopping: the rest is given back
                self.lease.release(count_attempt=False)
            else:
                self.lease.finish()
        except Exception as exc:  # give the chunk back: another worker takes what is left
            if isinstance(exc, EngineFatalError):
                self.pipeline.fatal = exc  # the worker's next chunk stops it, blaming no item
            log.exception("finishing chunk %s/%s failed", job_id, chunk_no)
            try:
                self.lease.release(error=describe(exc))
            except Exception:  # the lease runs out instead
                log.exception("could not give chunk %s/%s back", job_id, chunk_no)
        finally:
            if self.feed is not None:
                self.feed.close()
            self.pipeline.finishing.discard((job_id, chunk_no))

    def _caption_stragglers(self) -> None:
        """Each straggler as it arrives, until none is left, the worker stops or the lease
        is lost; finished batches are written meanwhile."""
        while self.stragglers and not self.pipeline.stopping.is_set() and not self.lease.lost.is_set():
            loaded = self.flight.next(self.feed, timeout=STOP_POLL_S)
            if loaded is None:
                continue
            if loaded is END:
                self.stragglers = 0
                return
            self.stragglers -= 1
            batch = FormingBatch()
            batch.add(loaded, self.pipeline.results.rejected_result)
            self.flight.send(batch)
