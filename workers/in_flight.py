"""A chunk's batches between the engine and the store (`Flight`).

A synchronous engine captions a batch while the chunk waits, and the batch is written at
once (the transformers engine). A streaming engine (`StreamingEngine`, vLLM) takes the
next batch while earlier ones run: the chunk submits it and goes on loading, finished
batches are written as they come, and what is still in the engine when the chunk's task
returns goes to its finisher with the `Flight` (`workers.finisher`). `EngineSlots` bounds
the batches in the engine across a worker's chunks, so a fast loader cannot queue work
that a stopping worker would have to wait for.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from recap.records import Caption, ItemResult, Prepared
from workers import metrics
from workers.image_feed import FormingBatch, ImageFeed
from workers.results import ChunkOutcome, OnWritten

if TYPE_CHECKING:
    from recap.store import JobInfo
    from workers.pipeline import CaptionPipeline

# Batches a streaming engine holds at once: one running and the next queued behind it
# (a batch is twice the sequences the engine runs at once), so it never drains while
# images are ready, and a SIGTERM waits for two batches at most.
BATCHES_IN_ENGINE = 2
_WRITE_POLL_S = 0.05  # how often a chunk waiting for images or a slot writes finished batches


def format_prompt(template: str, org_caption: str | None) -> str:
    """Fill `{org_caption}`; other braces in a prompt are left alone."""
    return template.replace("{org_caption}", org_caption or "")


class EngineSlots:
    """Room for batches in a streaming engine, shared by a worker's chunks and finishers;
    a slot is freed when the engine finishes a batch, and its busy time is recorded then."""

    def __init__(self, busy: metrics.BusyMeter, size: int = BATCHES_IN_ENGINE):
        self._free = threading.Semaphore(size)
        self._busy = busy
        self._lock = threading.Lock()
        self._busy_until = 0.0

    def take(self, timeout: float) -> bool:
        return self._free.acquire(timeout=timeout)

    def give_back(self, submitted: float, images: int) -> None:
        """A batch ended: its slot is free. Busy time is the union of the batches' spans
        in the engine (they overlap), recorded in the order they end."""
        finished = time.monotonic()
        with self._lock:
            busy = max(0.0, finished - max(submitted, self._busy_until))
            self._busy_until = max(self._busy_until, finished)
        metrics.BATCH_SIZE.observe(images)
        metrics.BATCH_SECONDS.observe(finished - submitted)
        self._busy.record(busy, images)
        self.release()

    def release(self) -> None:
        self._free.release()


@dataclass(eq=False, slots=True)
class _Sent:
    ready: list[Prepared]
    rejected: list[ItemResult]
    future: Future[list[Caption]] = field(default_factory=Future)

    def __len__(self) -> int:
        return len(self.ready) + len(self.rejected)


class Flight:
    """One chunk's batches from the engine to the store."""

    def __init__(
        self,
        pipeline: CaptionPipeline,
        job: JobInfo,
        chunk_no: int,
        outcome: ChunkOutcome,
        on_written: OnWritten | None,
    ):
        self.pipeline = pipeline
        self.job = job
        self.chunk_no = chunk_no
        self.outcome = outcome
        self.on_written = on_written
        self._sent: deque[_Sent] = deque()  # in the engine, or finished and not yet written

    @property
    def items(self) -> int:
        """Items sent to the engine and not yet written."""
        return sum(len(s) for s in self._sent)

    def hand_over(self, outcome: ChunkOutcome) -> None:
        """From now on the finisher's: its writes count in its own outcome."""
        self.outcome = outcome

    def send(self, batch: FormingBatch) -> None:
        """Caption a batch: at once (a synchronous engine), or queued in a streaming engine."""
        if batch.empty():
            return
        if self.pipeline.slots is None:
            captions = self.pipeline.caption_now(self.job, batch.ready)
            self._write(self._results(batch.ready, captions) + batch.rejected)
            return
        sent = _Sent(batch.ready, batch.rejected)
        if batch.ready:
            while not self.pipeline.slots.take(timeout=_WRITE_POLL_S):
                self.write_finished()
            sent.future = self._submit(batch.ready)
        else:
            sent.future.set_result([])
        self._sent.append(sent)
        self.write_finished()

    def _submit(self, ready: list[Prepared]) -> Future[list[Caption]]:
        prompts = [format_prompt(self.job.prompt, p.item.org_caption) for p in ready]
        submitted = time.monotonic()
        try:
            future = self.pipeline.engine.submit([p.image for p in ready], prompts, self.job.generation)
        except BaseException:
            self.pipeline.slots.release()
            raise
        future.add_done_callback(lambda _: self.pipeline.slots.give_back(submitted, len(ready)))
        return future

    def next(self, feed: ImageFeed, timeout: float | None):
        """The feed's next result (as `ImageFeed.get`), writing finished batches meanwhile."""
        if not self._sent:
            return feed.get(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _WRITE_POLL_S if deadline is None else min(_WRITE_POLL_S, deadline - time.monotonic())
            loaded = feed.get(max(0.0, wait))
            self.write_finished()
            if loaded is not None or (deadline is not None and time.monotonic() >= deadline):
                return loaded

    def write_finished(self) -> None:
        """Write every batch the engine has finished (an EngineFatalError is raised here)."""
        for sent in [s for s in self._sent if s.future.done()]:
            self._sent.remove(sent)
            self._write_sent(sent)

    def wait_all(self, should_stop=None) -> None:
        """Write the batches still in the engine as each finishes (`should_stop`: a lost
        lease leaves them unwritten)."""
        while self._sent:
            if should_stop is not None and should_stop():
                return
            oldest = self._sent[0]
            try:
                oldest.future.result(timeout=_WRITE_POLL_S)
            except TimeoutError:
                continue
            except Exception:  # raised again below, where its batch is written
                pass
            self.write_finished()

    def _write_sent(self, sent: _Sent) -> None:
        self._write(self._results(sent.ready, sent.future.result()) + sent.rejected)

    def _results(self, ready: list[Prepared], captions: list[Caption]) -> list[ItemResult]:
        return self.pipeline.results.caption_results(ready, captions)

    def _write(self, results: list[ItemResult]) -> None:
        self.pipeline.results.write(self.job.id, self.chunk_no, results, self.outcome, self.on_written)
