"""Does the GPU wait? The worker pipeline against a simulated engine.

A loopback image server (its own process) answers with `--latency-ms` of latency; a
share of the URLs fail fast (HTTP 500) or hang until the fetch deadline. The simulated
engine holds a "GPU" for `--batch-s` per full batch. Printed: engine-busy share and
images/s against the engine-bound ideal, for recap's pipeline (fetching overlaps the
engine) and, in the same run, the same worker without overlap (fetch the chunk, then
caption it).

    python bench/pipeline.py            # 4 chunks of 256, 50 ms latency, 1.2 s per 32 images
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recap.records import Caption, ImageSpec


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


def run_variant(name: str, urls: list[str], args, overlap: bool) -> VariantResult:
    from producer.jobs import open_job
    from recap.db import upgrade
    from recap.records import InputItem
    from recap.settings import Settings
    from recap.store import Store
    from workers.loader import ImageLoader
    from workers.local import run_job_locally

    settings = Settings(
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
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
    engine = SimulatedEngine(args.batch_size, args.batch_s)

    class FetchThenCaption(ImageLoader):
        def load(self, items, **kwargs):
            return iter(list(super().load(items, **kwargs)))

    loader = None if overlap else FetchThenCaption(settings, engine.image_spec)
    started = time.monotonic()
    run_job_locally(settings, store, job, engine, loader=loader)
    wall = time.monotonic() - started
    items = store.job_status(job).items
    return VariantResult(name, wall, items.done, items.failed, engine.busy_s / wall, 1 / engine.per_image_s)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch-s", type=float, default=1.2)
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
        f"{args.latency_ms:.0f} ms latency, engine {args.batch_s}s per {args.batch_size} images"
    )
    results = [run_variant("overlap", urls, args, True), run_variant("fetch-then-caption", urls, args, False)]
    server.terminate()
    for r in results:
        print(
            f"{r.name:>20}: {r.images_per_s:6.1f} images/s ({r.images_per_s / r.ideal_per_s:.0%} "
            f"of the engine-bound {r.ideal_per_s:.1f}/s), engine busy {r.busy:.0%}, "
            f"{r.done} done, {r.failed} failed, {r.wall_s:.1f}s"
        )
    print(f"overlap / fetch-then-caption: {results[0].images_per_s / results[1].images_per_s:.2f}x")


if __name__ == "__main__":
    main()
