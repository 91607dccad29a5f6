"""Does the GPU wait? The worker pipeline against simulated engines.

A loopback image server (its own process) answers with `--latency-ms` of latency; a
share of the URLs fail fast (HTTP 500) or hang until the fetch deadline.

Fetch overlap: a simulated engine holds a "GPU" for `--batch-s` per full batch. Printed:
engine-busy share and images/s against the engine-bound ideal, for recap's pipeline
(fetching overlaps the engine) and, in the same run, the same worker without overlap
(fetch the chunk, then caption it).

Keeping a continuous-batching engine full: a simulated serving engine (vLLM-like) runs at
most `--max-seqs` sequences at once, one token each per `--step-ms`, captions of 20-100 %
of `--max-tokens`. Called synchronously (the baseline), its queue drains at the end of
every call: a batch's tail of long captions runs with the slots half empty, and nothing
runs while a chunk's first images load. Fed as a stream (`StreamingEngine`, as recap
feeds vLLM), the next batch and chunk join the running sequences. Printed: images/s and
the engine's fill (mean share of its slots in use over the run), as ratios to the baseline.

    python bench/pipeline.py            # both; 4 chunks of 256, 50 ms latency
    python bench/pipeline.py --only stream
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recap.records import Caption, ImageSpec
from workers.engine.protocol import StreamingEngine


class SimulatedEngine:
    """Holds the "GPU" for a fixed time per batch; returns a fixed caption."""

    model_id = "simulated"
    revision = None
    is_tiny = False
    image_spec = ImageSpec(336, "pad")
    provenance: ClassVar[dict] = {"engine": "simulated"}

    def __init__(self, batch_size: int, batch_s: float):
        self.default_batch_size = batch_size
        self.per_image_s = batch_s / batch_size
        self.busy_s = 0.0

    def image_spec_for(self, image_mode: str) -> ImageSpec:
        return self.image_spec

    def caption(self, images, prompts, generation=None):
        hold = self.per_image_s * len(images)
        time.sleep(hold)
        self.busy_s += hold
        return [Caption("a simulated caption of an image", 6, "stop", hold * 1000) for _ in images]


@dataclass(eq=False)
class _Sequence:
    tokens_left: int
    batch: _SimBatch


@dataclass(eq=False)
class _SimBatch:
    size: int
    future: Future = field(default_factory=Future)
    unfinished: int = 0


class ContinuousEngine(StreamingEngine):
    """A simulated serving engine: at most `max_seqs` sequences in flight, each advancing one
    token per step of `step_s`; a finished sequence's slot is refilled at once from the
    queue (continuous batching). Captions are 20-100 % of `max_tokens` long (a fixed spread),
    so a batch ends with a tail of long ones."""

    model_id = "simulated-continuous"
    revision = None
    is_tiny = False
    image_spec = ImageSpec(336, "pad")
    provenance: ClassVar[dict] = {"engine": "simulated-continuous"}

    def __init__(self, max_seqs: int, step_s: float, max_tokens: int):
        self.max_seqs = max_seqs
        self.step_s = step_s
        self.max_tokens = max_tokens
        self.default_batch_size = 2 * max_seqs  # as VllmEngine's default
        self.mean_tokens = max_tokens * 0.6
        self.fill_s = 0.0  # seconds x share of the slots in use
        self._lengths = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, daemon=True).start()

    def image_spec_for(self, image_mode: str) -> ImageSpec:
        return self.image_spec

    def caption(self, images, prompts, generation=None):
        return self.submit(images, prompts, generation).result()

    def submit(self, images, prompts, generation=None) -> Future:
        batch = _SimBatch(len(images), unfinished=len(images))
        self._inbox.put(batch)
        return batch.future

    def _length(self) -> int:
        spread = (next(self._lengths) * 37) % 101 / 100  # 0..1, evenly spread
        return max(1, round(self.max_tokens * (0.2 + 0.8 * spread)))

    def _serve(self) -> None:
        waiting: deque[_Sequence] = deque()
        running: list[_Sequence] = []
        while True:
            if not waiting and not running:
                self._queue(waiting, self._inbox.get())
            while not self._inbox.empty():
                self._queue(waiting, self._inbox.get())
            while waiting and len(running) < self.max_seqs:
                running.append(waiting.popleft())
            time.sleep(self.step_s)
            self.fill_s += self.step_s * len(running) / self.max_seqs
            for seq in running:
                seq.tokens_left -= 1
            for seq in [s for s in running if s.tokens_left == 0]:
                running.remove(seq)
                seq.batch.unfinished -= 1
                if not seq.batch.unfinished:
                    caption = Caption("a simulated caption of an image", 6, "stop", 0.0)
                    seq.batch.future.set_result([caption] * seq.batch.size)

    def _queue(self, waiting: deque, batch: _SimBatch) -> None:
        waiting.extend(_Sequence(self._length(), batch) for _ in range(batch.size))

    @property
    def ideal_per_s(self) -> float:
        """Images per second with every slot always in use."""
        return self.max_seqs / (self.mean_tokens * self.step_s)


class SynchronousCalls:
    """The same engine, called and waited for batch by batch (not a `StreamingEngine`): its
    queue drains at the end of every call, as vLLM's did before recap streamed to it."""

    def __init__(self, engine: ContinuousEngine):
        self.engine = engine
        for name in ("model_id", "revision", "is_tiny", "image_spec", "provenance", "default_batch_size"):
            setattr(self, name, getattr(engine, name))
        self.image_spec_for = engine.image_spec_for
        self.caption = engine.caption


def serve(port_queue, latency_s: float) -> None:
    from tests.support.http_server import ImageServer

    server = ImageServer(host="127.0.0.1")
    server.latency_s = latency_s
    server.start()
    port_queue.put(server.base_url)
    while True:
        time.sleep(3600)


def make_urls(base: str, n: int, bad_share: float, deadline_s: float) -> list[str]:
    urls = []
    for i in range(n):
        slot = i % 20
        if slot < bad_share * 10:  # half of the bad share fails fast…
            urls.append(f"{base}/status/500?i={i}")
        elif slot >= 20 - bad_share * 10:  # …half hangs until the deadline
            urls.append(f"{base}/slow?delay={deadline_s + 1}&seed={i}")
        else:
            urls.append(f"{base}/img/{320 + i % 200}x{240 + i % 150}.jpg?seed={i}")
    return urls


@dataclass(frozen=True, slots=True)
class VariantResult:
    name: str
    wall_s: float
    done: int
    failed: int
    busy: float  # share of the wall time the engine was busy
    ideal_per_s: float  # images per second of an engine that never waits

    @property
    def images_per_s(self) -> float:
        return self.done / self.wall_s


def run_variant(name: str, urls: list[str], args, engine, measured, overlap: bool = True) -> VariantResult:
    """`engine` through `recap run`'s pipeline; `measured` is the simulated engine whose
    busy share (or fill) is read."""
    from producer.jobs import open_job
    from recap.db import upgrade
    from recap.records import InputItem
    from recap.settings import Settings
    from recap.store import Store
    from workers.loader import ImageLoader
    from workers.local import run_job_locally

    settings = Settings(
        chunk_size=args.chunk_size,
        fetch_timeout_s=args.deadline_s,
        fetch_retries=0,
        fetch_concurrency=args.concurrency,
        fetch_allow_cidrs=["127.0.0.1/32"],
    )
    db = Path(tempfile.mkdtemp()) / "bench.db"
    upgrade(f"sqlite:///{db}")
    store = Store(f"sqlite:///{db}")
    job = open_job(store, settings, name, "simulated")
    store.register_items(job, [[InputItem(f"k{i:06d}", u) for i, u in enumerate(urls)]])

    class FetchThenCaption(ImageLoader):
        def load(self, items, **kwargs):
            return iter(list(super().load(items, **kwargs)))

    loader = None if overlap else FetchThenCaption(settings, engine.image_spec)
    started = time.monotonic()
    run_job_locally(settings, store, job, engine, loader=loader)
    wall = time.monotonic() - started
    items = store.job_status(job).items
    if isinstance(measured, ContinuousEngine):
        busy, ideal = measured.fill_s / wall, measured.ideal_per_s
    else:
        busy, ideal = measured.busy_s / wall, 1 / measured.per_image_s
    return VariantResult(name, wall, items.done, items.failed, busy, ideal)


def fetch_overlap(urls: list[str], args) -> None:
    print(f"fetch overlap: engine {args.batch_s}s per {args.batch_size} images")
    results = []
    for name, overlap in (("overlap", True), ("fetch-then-caption", False)):
        engine = SimulatedEngine(args.batch_size, args.batch_s)
        results.append(run_variant(name, urls, args, engine, engine, overlap))
    for r in results:
        print(
            f"{r.name:>20}: {r.images_per_s:6.1f} images/s ({r.images_per_s / r.ideal_per_s:.0%} "
            f"of the engine-bound {r.ideal_per_s:.1f}/s), engine busy {r.busy:.0%}, "
            f"{r.done} done, {r.failed} failed, {r.wall_s:.1f}s"
        )
    print(f"overlap / fetch-then-caption: {results[0].images_per_s / results[1].images_per_s:.2f}x")


def keep_full(urls: list[str], args) -> None:
    print(
        f"continuous batching: {args.max_seqs} sequences at once, {args.step_ms:.0f} ms per token, "
        f"captions of {0.2 * args.max_tokens:.0f}-{args.max_tokens} tokens, batches of {2 * args.max_seqs}"
    )
    results = []
    for name in ("synchronous calls", "streaming feed"):
        engine = ContinuousEngine(args.max_seqs, args.step_ms / 1000, args.max_tokens)
        caller = SynchronousCalls(engine) if name == "synchronous calls" else engine
        results.append(run_variant(name, urls, args, caller, engine))
    for r in results:
        print(
            f"{r.name:>20}: {r.images_per_s:6.1f} images/s ({r.images_per_s / r.ideal_per_s:.0%} "
            f"of the slot-bound {r.ideal_per_s:.1f}/s), slots in use {r.busy:.0%}, "
            f"{r.done} done, {r.failed} failed, {r.wall_s:.1f}s"
        )
    base, streamed = results
    print(
        f"streaming / synchronous: {streamed.images_per_s / base.images_per_s:.2f}x images/s, "
        f"{streamed.busy / base.busy:.2f}x slots in use"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("fetch", "stream"), help="one comparison only")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch-s", type=float, default=1.2)
    parser.add_argument("--max-seqs", type=int, default=64, help="the streaming comparison's engine slots")
    parser.add_argument("--step-ms", type=float, default=40.0, help="... its time per token")
    parser.add_argument("--max-tokens", type=int, default=60, help="... its longest caption")
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--bad-share", type=float, default=0.1, help="share of failing or hanging URLs")
    parser.add_argument("--deadline-s", type=float, default=3.0, help="RECAP_FETCH_TIMEOUT_S")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("RECAP_CACHE_DIR", tempfile.mkdtemp())

    ports = mp.Queue()
    server = mp.Process(target=serve, args=(ports, args.latency_ms / 1000), daemon=True)
    server.start()
    base = ports.get(timeout=30)
    urls = make_urls(base, args.chunks * args.chunk_size, args.bad_share, args.deadline_s)
    print(
        f"{len(urls)} URLs ({args.bad_share:.0%} failing or hanging {args.deadline_s}s), "
        f"{args.latency_ms:.0f} ms latency"
    )
    if args.only != "stream":
        fetch_overlap(urls, args)
    if args.only != "fetch":
        keep_full(urls, args)
    server.terminate()


if __name__ == "__main__":
    main()
