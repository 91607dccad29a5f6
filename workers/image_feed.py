"""Prepared images on their way to the engine: the loader's results as they come (`ImageFeed`)
and the batch being formed from them (`FormingBatch`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from recap.records import ItemResult, Prepared, Rejected
from workers import metrics

END = object()  # the loader has nothing more
STOP_POLL_S = 1.0  # how often a chunk waiting for images checks whether it should stop


class ImageFeed:
    """Runs the loader's generator on a thread so the pipeline can wait with a timeout;
    a bounded queue keeps the loader from running ahead of the engine."""

    def __init__(self, results: Iterator, size: int):
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self.results = results
        self.closed = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._pump, daemon=True, name="recap-feed")
        self.thread.start()

    def _pump(self) -> None:
        try:
            for result in self.results:
                while not self._put(result):
                    if self.closed.is_set():
                        return
                if self.closed.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self.error = exc
        finally:
            while not self._put(END) and not self.closed.is_set():
                pass  # the end (or the error) must reach the consumer
            if self.closed.is_set():
                self.results.close()  # cancels the loader's work in flight

    def _put(self, item) -> bool:
        try:
            self.queue.put(item, timeout=0.2)
            return True
        except queue.Full:
            return False

    def get(self, timeout: float | None):
        """The next result, `END`, or None when `timeout` passed first."""
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is END and self.error is not None:
            raise RuntimeError(f"loading images failed: {self.error!r}") from self.error
        return item

    def close(self) -> None:
        """Stop feeding (an early return or an error): the pump thread ends and the
        loader's items in flight are abandoned."""
        self.closed.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break


class FormingBatch:
    """What waits for the engine (prepared images) and for the store (rejections)."""

    def __init__(self):
        self.ready: list[Prepared] = []
        self.rejected: list[ItemResult] = []

    def add(self, loaded: Prepared | Rejected, rejected_result) -> None:
        """`rejected_result` turns a rejection into the item's result (`ResultWriter`)."""
        if isinstance(loaded, Rejected):
            self.rejected.append(rejected_result(loaded))
        else:
            self.ready.append(loaded)
            metrics.FETCH_SECONDS.observe(loaded.fetch_ms / 1000)

    def full(self, size: int) -> bool:
        return len(self.ready) >= size or len(self.rejected) >= size

    def empty(self) -> bool:
        return not self.ready and not self.rejected

    def __len__(self) -> int:
        return len(self.ready) + len(self.rejected)
