"""Prometheus metrics of a worker process, served on RECAP_METRICS_PORT (0 = off), on
RECAP_METRICS_ADDRESS (loopback unless opened up: the metrics name jobs and hosts).

`recap worker` gives each of its worker processes its own port: the base port plus the
GPU's number (GPU 0 → base, GPU 1 → base + 1, …; the CPU worker → base).
docker/monitoring/ holds the Prometheus scrape configuration and Grafana dashboard for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from recap.queue import queue_name
from recap.settings import get_settings

log = logging.getLogger(__name__)

ITEMS = Counter("recap_items_total", "Items finished, by status and error class", ["status", "error_class"])
CHUNKS = Counter("recap_chunks_total", "Chunks handled, by outcome", ["outcome"])
# One series per job (the job's name): a fleet runs a handful of jobs at once, not thousands.
ENGINE_SECONDS = Counter(
    "recap_engine_seconds_total", "Engine busy seconds of the batches written, by job", ["job"]
)
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
QUEUE_DEPTH = Gauge(
    "recap_queue_depth", "Chunks waiting in the model's queue (-1: the broker did not answer)", ["queue"]
)
BROKER_TIMEOUT_S = 1.0  # per scrape: Prometheus's own scrape timeout is 10 s


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


class QueueDepthProbe:
    """The length of one queue's Redis list, read when Prometheus scrapes (the messages
    waiting; in-flight ones sit in `unacked`), as the dispatcher measures it.

    Its own client on the broker URL, not Celery's connection (which the task's thread
    uses), with a short timeout and no retry: a scrape must not hang on a Redis that is
    down or unreachable; it reads -1 then."""

    def __init__(self, queue: str, broker_url: str, timeout_s: float = BROKER_TIMEOUT_S):
        import redis  # a third of a second to import: only where metrics are served
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.queue = queue
        self._errors = (redis.RedisError, OSError)
        self._redis = redis.Redis.from_url(
            broker_url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )

    def read(self) -> float:
        try:
            return float(self._redis.llen(self.queue))
        except self._errors as exc:
            log.debug("queue depth of %s unavailable: %s", self.queue, exc)
            return -1.0

    def export(self) -> None:
        """Report this queue as recap_queue_depth{queue=...} from now on."""
        QUEUE_DEPTH.labels(self.queue).set_function(self.read)

    def close(self) -> None:
        self._redis.close()


def serve(port: int, address: str = "127.0.0.1") -> None:
    """Serve this process's metrics, its queue's depth among them (this process's settings
    name the model, hence the queue, and the broker)."""
    if port <= 0:
        return
    try:
        start_http_server(port, addr=address)
        log.info("metrics on %s:%d/metrics", address, port)
    except OSError as exc:  # a taken port must not stop the worker
        log.warning("metrics on %s:%d unavailable: %s", address, port, exc)
        return
    settings = get_settings()
    QueueDepthProbe(queue_name(settings.model), settings.broker_url).export()
