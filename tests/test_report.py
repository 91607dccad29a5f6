"""`recap report` end to end: a real `recap run` of the tiny model (a folder of images and
loopback URLs, SQLite and PostgreSQL), the report written, and the page opened in a real
headless Chromium (Debian's `chromium`): it renders, every image loads, nothing errs."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html import escape
from pathlib import Path

import pytest
from PIL import Image

from recap.settings import get_settings
from recap.store import Store
from recap.store.report import SampledItem
from tests.support.fleet import REPO
from workers.thumbnails import Thumbnailer

pytestmark = pytest.mark.timeout(300)

HOSTILE = '<script>alert(1)</script> & "quotes" <img src=x onerror=alert(2)>'
# Injected by the test only: records image sizes and every error the page raises into the DOM.
PROBE = """<script>
window.__errors = [];
const note = text => __errors.push(text);
addEventListener('error', e => note('error: ' + (e.message || (e.target && e.target.src) || e.type)), true);
addEventListener('securitypolicyviolation', e => note('csp: ' + e.violatedDirective + ' ' + e.blockedURI));
for (const level of ['error', 'warn']) {
  const original = console[level];
  console[level] = (...args) => { __errors.push(level + ': ' + args.join(' ')); original(...args); };
}
addEventListener('load', () => {
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({
    images: [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
    svgs: document.querySelectorAll('svg').length,
    errors: __errors,
  });
  document.body.appendChild(probe);
});
</script>"""
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    return path


def run_recap(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "recap.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def make_inputs(tmp_path: Path, image_server) -> tuple[Path, Path]:
    """A folder of six images with captions (one hostile), and a JSONL of loopback URLs, some failing."""
    folder = tmp_path / "images"
    shutil.copytree(REPO / "examples" / "images", folder)
    (folder / "red-circle.txt").write_text(HOSTILE)
    rows = [
        {"url": image_server.url(f"/img/{64 + i}x{48 + i}.jpg?seed={i}"), "text": f"web {i}"}
        for i in range(8)
    ]
    rows += [
        {"url": image_server.url(p), "text": "gone"} for p in ("/status/404", "/status/404?x=1", "/html")
    ]
    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, urls


def env_for(tmp_path: Path, tiny_model_dir, database_url: str, **extra: str) -> dict:
    return {
        **os.environ,
        "RECAP_DATABASE_URL": database_url,
        "RECAP_MODEL": str(tiny_model_dir),
        "RECAP_CHUNK_SIZE": "4",
        "RECAP_BATCH_SIZE": "4",
        "RECAP_MAX_NEW_TOKENS": "6",
        "RECAP_FETCH_RETRIES": "0",
        "PYTHONPATH": str(REPO),
        **extra,
    }


def run_and_report(
    tmp_path, image_server, tiny_model_dir, database_url, sample: int, **extra: str
) -> tuple[str, Path]:
    folder, urls = make_inputs(tmp_path, image_server)
    env = env_for(tmp_path, tiny_model_dir, database_url, **extra)
    run_recap(
        ["run", str(folder), str(urls), "--job", "report-job", "--out", str(tmp_path / "out.jsonl")], env
    )
    (folder / "sunset.jpg").unlink()  # gone since: the report shows a placeholder
    out = tmp_path / "report.html"
    result = run_recap(["report", "--job", "report-job", "--out", str(out), "--sample", str(sample)], env)
    assert "wrote a report" in result.stdout
    return out.read_text(), out


def browse(html_path: Path, tmp_path: Path) -> dict:
    """The page as headless Chromium loads it, with the probe's findings."""
    page = html_path.read_text()
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    assert f'content="{csp}"' in page
    # The probe is a script: allow inline scripts, nothing else (images still data: only).
    probed = page.replace(f'content="{csp}"', f"content=\"{csp}; script-src 'unsafe-inline'\"")
    probed = probed.replace("<head>", "<head>" + PROBE, 1)
    target = tmp_path / "probed.html"
    target.write_text(probed)
    result = subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            target.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the page did not finish loading: {result.stderr[-2000:]}"
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    return {**json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")), "console": console}


def screenshot(html_path: Path, png: Path, tmp_path: Path) -> None:
    subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'chromium-shot'}",
            "--hide-scrollbars",
            "--window-size=1200,900",
            f"--screenshot={png}",
            html_path.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )


def check_page(html: str, done: int) -> None:
    assert html.count("<img ") == done - 1  # every done item but the deleted file
    assert html.count('class="missing"') == 1 and "no such file" in html.lower()
    assert "<script" not in html  # the hostile caption is escaped, and the page has no script
    assert escape(HOSTILE) in html
    for heading in ("Caption length", "Flag rates", "error class", "Throughput", "generation", "provenance"):
        assert heading in html, heading
    assert "http_4xx: 2 items" in html and "not_image: 1 items" in html
    assert html.count("<svg") == 4


def test_report_of_a_sqlite_run_renders_in_chromium_with_its_images(tmp_path, image_server, tiny_model_dir):
    html, path = run_and_report(tmp_path, image_server, tiny_model_dir, f"sqlite:///{tmp_path}/recap.db", 100)
    check_page(html, done=6 + 8)
    assert html.count('class="key"') >= 14 + 3  # the failed examples are listed too
    seen = browse(path, tmp_path)
    assert len(seen["images"]) == 13
    assert all(complete and width > 0 and height > 0 for complete, width, height in seen["images"])
    assert seen["svgs"] == 4
    assert seen["errors"] == [] and seen["console"] == []
    shot = tmp_path / "report.png"
    screenshot(path, shot, tmp_path)
    assert shot.stat().st_size > 10_000


def test_report_shows_clip_scores_when_the_job_has_them(tmp_path, image_server, tiny_model_dir):
    database = f"sqlite:///{tmp_path}/recap.db"
    html, path = run_and_report(
        tmp_path, image_server, tiny_model_dir, database, 100, RECAP_SCORE_MODEL="tiny-clip"
    )
    assert html.count('<div class="score">re_clip_score ') == 14  # every done item
    assert html.count('<div class="score">org_clip_score ') == 9  # those with an original caption
    assert "Scores (sample)" in html and html.count("<svg") == 5
    seen = browse(path, tmp_path)
    assert seen["svgs"] == 5 and seen["errors"] == [] and seen["console"] == []


def test_report_of_a_postgres_run_samples_the_partition(tmp_path, image_server, tiny_model_dir, pg_url):
    html, path = run_and_report(tmp_path, image_server, tiny_model_dir, pg_url, 100)
    check_page(html, done=6 + 8)
    seen = browse(path, tmp_path)
    assert len(seen["images"]) == 13 and all(w > 0 for _, w, _ in seen["images"])
    assert seen["errors"] == [] and seen["console"] == []

    store = Store(pg_url)
    job = store.get_job("report-job")
    few = store.sample_items(job, 5, expected=14)
    assert len(few) == 5 and len({i.key for i in few}) == 5
    assert all(i.caption and i.provenance_id for i in few)
    # Told the job is large, it starts from a 2% page sample and widens it until it has enough.
    assert len(store.sample_items(job, 2, expected=1000)) == 2
    points = store.throughput(job)
    assert sum(p.items for p in points) == 14 + 3


def test_thumbnails_go_through_the_guarded_fetcher(image_server, tmp_path):
    """A web image is fetched again and shrunk; one gone since, or on an address the guard
    refuses, gets a placeholder reason instead."""

    def item(key: str, url: str, local: bool = False) -> SampledItem:
        return SampledItem(key, url, local, "c", None, [], None, None, None, None)

    items = [
        item("big", image_server.url("/img/900x600.jpg?seed=3")),
        item("gone", image_server.url("/status/404")),
        item("internal", "http://127.0.0.2:9/x.jpg"),
        item("tiny", image_server.url("/tiny.png")),
        item("file", (REPO / "examples" / "images" / "blue-square.png").as_uri(), local=True),
    ]
    seen = []
    with Thumbnailer(get_settings()) as thumbnailer:
        thumbs = {t.key: t for t in thumbnailer.thumbnails(items, seen.append)}
    assert seen == [1, 2, 3, 4, 5]
    assert thumbs["big"].data_uri.startswith("data:image/jpeg;base64,")

    big = Image.open(io.BytesIO(base64.b64decode(thumbs["big"].data_uri.split(",", 1)[1])))
    assert big.size == (256, 171)
    assert thumbs["gone"].data_uri is None and thumbs["gone"].missing.startswith("http_4xx")
    assert thumbs["internal"].data_uri is None and thumbs["internal"].missing.startswith("blocked_address")
    assert thumbs["tiny"].data_uri and thumbs["file"].data_uri


def test_failed_examples_never_show_items_removed_or_refused_on_request(sqlite_url):
    from recap.generation import GenerationSettings
    from recap.records import InputItem, ItemResult
    from recap.states import ItemStatus
    from recap.store.forget import BLOCKED, REMOVED

    store = Store(sqlite_url)
    job = store.ensure_job("removal", "tiny", "describe", GenerationSettings.from_json({}), 10)
    store.register_items(job, [[InputItem(k, f"http://127.0.0.1/{k}.jpg") for k in ("a", "b", "c")]])
    failed = [
        ItemResult("a", ItemStatus.FAILED, error_class="opted_out", error=REMOVED),
        ItemResult("b", ItemStatus.FAILED, error_class="opted_out", error=BLOCKED),
        ItemResult("c", ItemStatus.FAILED, error_class="opted_out", error="X-Robots-Tag: noai"),
    ]
    store.write_results(job.id, 0, failed)
    shown = store.failed_examples(job, ["opted_out"], per_class=10)
    assert [example.key for example in shown] == ["c"]


def test_report_refuses_an_out_it_cannot_write_before_reading_anything(tmp_path, sqlite_url):
    pipe = tmp_path / "pipe.html"
    os.mkfifo(pipe)
    env = {**os.environ, "RECAP_DATABASE_URL": sqlite_url}
    for out in (str(pipe), "/proc/x.html", str(tmp_path)):
        result = subprocess.run(
            [sys.executable, "-m", "recap.cli", "report", "--job", "no-such-job", "--out", out],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode == 2, result.stderr
        assert "--out" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert pipe.is_fifo()
