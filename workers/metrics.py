"""Prometheus metrics of a worker process, served on RECAP_METRICS_PORT (0 = off), on
RECAP_METRICS_ADDRESS (loopback unless opened up: the metrics name jobs and hosts).

`recap worker` gives each of its worker processes its own port: the base port plus the
GPU's number (GPU 0 → base, GPU 1 → base + 1, …; the CPU worker → base).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

ITEMS = Counter("recap_items_total", "Items finished, by status and error class", ["status", "error_class"])
CHUNKS = Counter("recap_chunks_total", "Chunks handled, by outcome", ["outcome"])
BATCH_SIZE = Histogram("recap_batch_size", "Images per engine batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BATCH_SECONDS = Histogram(
    "recap_batch_seconds", "Engine time per batch", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
)
FETCH_SECONDS = Histogram(
    "recap_fetch_seconds",
    "Fetch + prepare time per image",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40),
)
IMAGES_PER_SECOND = Gauge("recap_images_per_second", "Images captioned per second (last minute)")
GPU_BUSY = Gauge("recap_gpu_busy_ratio", "Share of wall time the engine was busy (last minute)")
BUFFER_DEPTH = Gauge("recap_buffer_depth", "Prepared images waiting for the engine")


class BusyMeter:
    """Engine-busy share and images/s over a sliding window, fed once per batch and read
    when Prometheus scrapes: an idle or starved worker shows its drop, not its last batch."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self.events: deque[tuple[float, float, int]] = deque()  # (end time, busy seconds, images)
        self._lock = threading.Lock()
        GPU_BUSY.set_function(lambda: self._rates()[0])
        IMAGES_PER_SECOND.set_function(lambda: self._rates()[1])

    def record(self, busy_s: float, images: int) -> None:
        with self._lock:
            self.events.append((time.monotonic(), busy_s, images))

    def _rates(self) -> tuple[float, float]:
        """(busy share, images per second) over the window, or since the first batch in it."""
        now = time.monotonic()
        with self._lock:
            while self.events and self.events[0][0] < now - self.window_s:
                self.events.popleft()
            if not self.events:
                return 0.0, 0.0
            span = max(now - (self.events[0][0] - self.events[0][1]), 1e-6)
            return min(1.0, sum(e[1] for e in self.events) / span), sum(e[2] for e in self.events) / span


def serve(port: int, address: str = "127.0.0.1") -> None:
    if port <= 0:
        return
    try:
        start_http_server(port, addr=address)
        log.info("metrics on %s:%d/metrics", address, port)
    except OSError as exc:  # a taken port must not stop the worker
        log.warning("metrics on %s:%d unavailable: %s", address, port, exc)
