"""Benchmark of the load stage (fetch + prepare) against a naive downloader, on loopback.

    python bench/fetch.py [--n 3000] [--latency-ms 50] [--concurrency 64]

A server process serves a handful of photo-like JPEGs (100-300 KB, 500-1600 px) under
`--n` distinct URLs, each response delayed by about `--latency-ms` (uniform 0.5x-1.5x).
Each contender then runs in a fresh process of its own, so its CPU time and peak RSS are
its own (not the server's, not the other contender's):

- recap: `ImageLoader` with `ImageSpec(336, "pad")` (fetch, checks, JPEG draft decode,
  pad to square, one bicubic resize);
- naive: a `ThreadPoolExecutor` of `requests.get` + `Image.open().convert("RGB")
  .resize((336, 336))`, the same concurrency.

One loopback host stands in for many web hosts, so the per-host cap is set to the
concurrency. Prints images/s, CPU ms per image and peak RSS of each, and the ratios.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import random
import resource
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (width, height, noise, JPEG quality): sizes and settings that land in 100-300 KB.
PHOTOS = [
    (1600, 1200, 6, 82), (1280, 960, 7, 85), (1024, 768, 8, 88), (800, 1200, 8, 85),
    (1600, 900, 6, 80), (640, 480, 14, 92), (500, 750, 14, 92), (1200, 1200, 6, 84),
]


def make_photos(seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields, soft shapes and sensor-like noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for width, height, noise, quality in PHOTOS:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        tint = rng.uniform(40, 200, 3)
        base = np.stack([tint[0] + 60 * np.sin(x / width * 3 + c) * np.cos(y / height * 2)
                         for c in range(3)], -1) + tint[2] * 0.1
        im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(25):
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(20, width / 5)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r),
                         fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
        im = im.filter(ImageFilter.GaussianBlur(3))
        pixels = np.asarray(im, dtype=np.float32) + rng.normal(0, noise, (height, width, 3))
        im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------------------- server


def serve(port_out, latency_s: float, stop) -> None:
    """The server process: /p/<i>.jpg is photo i mod len(photos)."""
    photos = make_photos()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            try:
                index = int(self.path.rsplit("/", 1)[-1].split(".")[0])
            except ValueError:
                index = 0
            body = photos[index % len(photos)]
            if latency_s:
                time.sleep(latency_s * random.uniform(0.5, 1.5))
            try:
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    server = Server(("127.0.0.1", 0), Handler)
    port_out.put((server.server_address[1], [len(p) for p in photos]))
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop.wait()
    server.shutdown()


# ---------------------------------------------------------------------------- contenders


def run_recap(urls: list[str], concurrency: int) -> dict:
    from recap.records import ImageSpec, InputItem, Prepared
    from recap.settings import Settings
    from workers.loader import ImageLoader

    settings = Settings(fetch_allow_cidrs=["127.0.0.1/32"], fetch_concurrency=concurrency,
                        fetch_per_host=concurrency, fetch_timeout_s=30, fetch_retries=0)
    items = [InputItem(key=str(i), url=u) for i, u in enumerate(urls)]
    with ImageLoader(settings, ImageSpec(336, "pad")) as loader:
        return _measure(lambda: sum(isinstance(r, Prepared) for r in loader.load(items)))


def run_naive(urls: list[str], concurrency: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from PIL import Image

    def one(url: str) -> bool:
        resp = requests.get(url, timeout=30)
        image = Image.open(io.BytesIO(resp.content)).convert("RGB").resize((336, 336))
        return image.size == (336, 336)

    def work() -> int:
        with ThreadPoolExecutor(concurrency) as pool:
            return sum(pool.map(one, urls))

    return _measure(work)


def _measure(work) -> dict:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu, wall = time.process_time(), time.perf_counter()
    ok = work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"ok": ok, "wall_s": wall, "cpu_s": cpu,
            "rss_before_mb": rss_before / 1024,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(name: str, urls: list[str], concurrency: int, out) -> None:
    out.put({"recap": run_recap, "naive": run_naive}[name](urls, concurrency))


def contend(ctx, name: str, urls: list[str], concurrency: int) -> dict:
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, urls, concurrency, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="URLs to load (default 3000)")
    parser.add_argument("--latency-ms", type=float, default=50.0,
                        help="mean server latency per response (default 50)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="downloads in flight, recap and naive alike (default 64)")
    parser.add_argument("--skip-naive", action="store_true", help="measure recap only")
    args = parser.parse_args(argv)

    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(port_q, args.latency_ms / 1000, stop), daemon=True)
    server.start()
    port, sizes = port_q.get(timeout=60)
    urls = [f"http://127.0.0.1:{port}/p/{i}.jpg" for i in range(args.n)]
    print(f"server: {len(sizes)} JPEGs of {min(sizes) // 1024}-{max(sizes) // 1024} KB "
          f"(mean {sum(sizes) // len(sizes) // 1024} KB), {args.n} URLs, "
          f"latency ~{args.latency_ms:g} ms, concurrency {args.concurrency}, "
          f"{os.cpu_count()} CPUs")
    try:
        results = {"recap": contend(ctx, "recap", urls, args.concurrency)}
        if not args.skip_naive:
            results["naive"] = contend(ctx, "naive", urls, args.concurrency)
    finally:
        stop.set()
        server.join(timeout=10)
    for name, r in results.items():
        print(f"{name:>5}: {r['ok']}/{args.n} prepared in {r['wall_s']:.1f} s = "
              f"{r['ok'] / r['wall_s']:.0f} images/s; CPU {r['cpu_s'] * 1000 / args.n:.2f} ms "
              f"per image (this process only); peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(after imports {r['rss_before_mb']:.0f} MB)")
    if "naive" in results:
        rec, nai = results["recap"], results["naive"]
        print(f"recap vs naive: {nai['wall_s'] / rec['wall_s']:.2f}x throughput, "
              f"{nai['cpu_s'] / rec['cpu_s']:.2f}x less CPU per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
