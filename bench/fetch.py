"""Benchmark of the load stage (fetch + prepare) against a naive downloader, on loopback.

    python bench/fetch.py [--n 3000] [--latency-ms 50] [--concurrency 64]
                          [--img2dataset PYTHON]

A server process serves a handful of photo-like JPEGs (100-300 KB, 500-1600 px) under
`--n` distinct URLs, each response delayed by about `--latency-ms` (uniform 0.5x-1.5x).
Each contender then runs in a fresh process of its own, so its CPU time and peak RSS are
its own (not the server's, not the other contender's):

- recap: `ImageLoader` with `ImageSpec(336, "pad")` (fetch, checks, JPEG draft decode,
  pad to square, one bicubic resize);
- naive: a `ThreadPoolExecutor` of `requests.get` + `Image.open().convert("RGB")
  .resize((336, 336))`, the same concurrency;
- img2dataset (only with `--img2dataset PYTHON`, an interpreter that has it installed):
  `img2dataset.download` run by that interpreter as a subprocess, 2 processes of
  `--concurrency` threads each, center-crop to 336, written as files to a temp dir, no
  retries, hashing, EXIF or wandb. Its images/s count from its first shard's start to its
  last shard's end (so interpreter start, imports and worker spawn are left out); its CPU
  is that of all its processes, with and without its start-up (measured by a second,
  100-URL run). Make the interpreter outside the project's venv:

      python3 -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset==1.47.0

One loopback host stands in for many web hosts, so the per-host cap is set to the
concurrency. Prints images/s, CPU ms per image and peak RSS of each, and the ratios.
Machines vary, so compare ratios measured in one run rather than numbers across runs.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import multiprocessing as mp
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (width, height, noise, JPEG quality): sizes and settings that land in 100-300 KB.
PHOTOS = [
    (1600, 1200, 6, 82),
    (1280, 960, 7, 85),
    (1024, 768, 8, 88),
    (800, 1200, 8, 85),
    (1600, 900, 6, 80),
    (640, 480, 14, 92),
    (500, 750, 14, 92),
    (1200, 1200, 6, 84),
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
        base = (
            np.stack(
                [tint[0] + 60 * np.sin(x / width * 3 + c) * np.cos(y / height * 2) for c in range(3)], -1
            )
            + tint[2] * 0.1
        )
        im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(25):
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(20, width / 5)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
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

    settings = Settings(
        fetch_allow_cidrs=["127.0.0.1/32"],
        fetch_concurrency=concurrency,
        fetch_per_host=concurrency,
        fetch_timeout_s=30,
        fetch_retries=0,
    )
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
    return {
        "ok": ok,
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_before_mb": rss_before / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _child(name: str, urls: list[str], concurrency: int, out) -> None:
    out.put({"recap": run_recap, "naive": run_naive}[name](urls, concurrency))


def contend(ctx, name: str, urls: list[str], concurrency: int) -> dict:
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, urls, concurrency, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


# ---------------------------------------------------------------------------- img2dataset

I2D_PROCESSES = 2
I2D_SHORT_RUN = 100  # URLs in the run that measures img2dataset's fixed start-up cost

# Run by the img2dataset interpreter: argv[1] is download()'s keyword arguments as JSON.
I2D_WRAPPER = "import json, sys; from img2dataset import download; download(**json.loads(sys.argv[1]))"


def i2d_params(url_list: str, output: str, n: int, concurrency: int) -> dict:
    """download() arguments: just fetch and center-crop to 336, one shard per process.
    The output folder is new, so "incremental" skips nothing ("overwrite" would delete
    the _tmp folder that download() has just made, and fail)."""
    return {
        "url_list": url_list,
        "input_format": "txt",
        "output_folder": output,
        "output_format": "files",
        "processes_count": I2D_PROCESSES,
        "thread_count": concurrency,
        "image_size": 336,
        "resize_mode": "center_crop",
        "number_sample_per_shard": -(-n // I2D_PROCESSES),
        "retries": 0,
        "timeout": 30,
        "disable_all_reencoding": False,
        "incremental_mode": "incremental",
        "compute_hash": None,
        "extract_exif": False,
        "enable_wandb": False,
    }


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_img2dataset(python: str, urls: list[str], concurrency: int) -> dict:
    """img2dataset in a subprocess; CPU is this process's RUSAGE_CHILDREN delta, which
    counts the subprocess and every process of its that was waited for (its pool and
    logger processes)."""
    with tempfile.TemporaryDirectory(prefix="bench-i2d-") as tmp:
        url_list, output = os.path.join(tmp, "urls.txt"), os.path.join(tmp, "out")
        log = os.path.join(tmp, "log.txt")
        with open(url_list, "w") as f:
            f.write("\n".join(urls) + "\n")
        params = i2d_params(url_list, output, len(urls), concurrency)
        # No update check (albumentations), no wandb, and loopback never through a proxy.
        env = {
            **os.environ,
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "WANDB_MODE": "disabled",
            "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        cpu, wall = children_cpu(), time.perf_counter()
        with open(log, "w") as out:
            rc = subprocess.run(
                [python, "-c", I2D_WRAPPER, json.dumps(params)], stdout=out, stderr=subprocess.STDOUT, env=env
            ).returncode
        wall, cpu = time.perf_counter() - wall, children_cpu() - cpu
        stats = []
        for path in glob.glob(os.path.join(output, "*_stats.json")):
            with open(path) as f:
                stats.append(json.load(f))
        if rc or not stats:
            with open(log) as f:
                raise RuntimeError(f"img2dataset failed (exit {rc}):\n{f.read()[-3000:]}")
    return {
        "ok": sum(s["successes"] for s in stats),
        "total_s": wall,
        "cpu_s": cpu,
        "wall_s": max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats),
    }


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from workers.prepare import pillow_build

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="URLs to load (default 3000)")
    parser.add_argument(
        "--latency-ms", type=float, default=50.0, help="mean server latency per response (default 50)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="downloads in flight, recap and naive alike, and img2dataset's threads per process (default 64)",
    )
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive one")
    parser.add_argument(
        "--img2dataset", metavar="PYTHON", help="also run img2dataset with this interpreter (see the top)"
    )
    args = parser.parse_args(argv)

    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(port_q, args.latency_ms / 1000, stop), daemon=True)
    server.start()
    port, sizes = port_q.get(timeout=60)
    urls = [f"http://127.0.0.1:{port}/p/{i}.jpg" for i in range(args.n)]
    print(
        f"server: {len(sizes)} JPEGs of {min(sizes) // 1024}-{max(sizes) // 1024} KB "
        f"(mean {sum(sizes) // len(sizes) // 1024} KB), {args.n} URLs, "
        f"latency ~{args.latency_ms:g} ms, concurrency {args.concurrency}, "
        f"{os.cpu_count()} CPUs; images prepared with {pillow_build()}"
    )
    try:
        results = {"recap": contend(ctx, "recap", urls, args.concurrency)}
        if not args.skip_naive:
            results["naive"] = contend(ctx, "naive", urls, args.concurrency)
        if args.img2dataset:
            i2d = run_img2dataset(args.img2dataset, urls, args.concurrency)
            # A short run too: the difference is img2dataset's CPU per image without its
            # fixed start-up (four processes importing cv2, albumentations and pandas).
            i2d["short"] = run_img2dataset(args.img2dataset, urls[:I2D_SHORT_RUN], args.concurrency)
    finally:
        stop.set()
        server.join(timeout=10)
    for name, r in results.items():
        print(
            f"{name:>5}: {r['ok']}/{args.n} prepared in {r['wall_s']:.1f} s = "
            f"{r['ok'] / r['wall_s']:.0f} images/s; CPU {r['cpu_s'] * 1000 / args.n:.2f} ms "
            f"per image (this process only); peak RSS {r['peak_rss_mb']:.0f} MB "
            f"(after imports {r['rss_before_mb']:.0f} MB)"
        )
    if "naive" in results:
        rec, nai = results["recap"], results["naive"]
        print(
            f"recap vs naive: {nai['wall_s'] / rec['wall_s']:.2f}x throughput, "
            f"{nai['cpu_s'] / rec['cpu_s']:.2f}x less CPU per image"
        )
    if args.img2dataset:
        report_img2dataset(results["recap"], i2d, args.n, args.concurrency)
    return 0


def report_img2dataset(rec: dict, i2d: dict, n: int, concurrency: int) -> None:
    short = i2d["short"]
    steady_ms = (i2d["cpu_s"] - short["cpu_s"]) * 1000 / (n - I2D_SHORT_RUN)
    rec_ms = rec["cpu_s"] * 1000 / n
    print(
        f"img2dataset: {i2d['ok']}/{n} prepared in {i2d['wall_s']:.1f} s = "
        f"{i2d['ok'] / i2d['wall_s']:.0f} images/s ({I2D_PROCESSES} processes x "
        f"{concurrency} threads); CPU {i2d['cpu_s'] * 1000 / n:.2f} ms per image with its "
        f"start-up, {steady_ms:.2f} ms without (its processes)"
    )
    print(
        f"img2dataset start-up: {short['cpu_s']:.1f} s CPU for a {I2D_SHORT_RUN}-URL run; "
        f"{i2d['total_s']:.1f} s in all for {n} URLs, of which downloading {i2d['wall_s']:.1f} s"
    )
    speed = (rec["ok"] / rec["wall_s"]) / (i2d["ok"] / i2d["wall_s"])
    print(
        f"recap vs img2dataset: {speed:.2f}x throughput, {steady_ms / rec_ms:.2f}x less CPU "
        f"per image ({i2d['cpu_s'] * 1000 / n / rec_ms:.2f}x counting its start-up)"
    )


if __name__ == "__main__":
    sys.exit(main())
