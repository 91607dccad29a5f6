"""`recap run` end to end: loopback URLs with mixed failures, resume after a kill, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from producer.export import EXPORT_COLUMNS
from tests.support.fleet import REPO, wait_until

pytestmark = pytest.mark.timeout(240)

EXPECTED_FAILURES = {
    "/status/404": "http_4xx",
    "/status/503": "http_5xx",
    "/html": "not_image",
    "/svg": "not_image",
    "/truncated.jpg": "decode_error",
    "/tiny.png": "too_small",
    "/wide.png": "bad_aspect",
    "/bomb.png": "too_many_pixels",
    "/redirect-loop": "too_many_redirects",
}


def run_env(tmp_path, tiny_model_dir, **extra):
    return {
        **os.environ,
        "RECAP_DATABASE_URL": f"sqlite:///{tmp_path}/recap.db",
        "RECAP_MODEL": str(tiny_model_dir),
        "RECAP_CHUNK_SIZE": "25",
        "RECAP_BATCH_SIZE": "8",
        "RECAP_MAX_NEW_TOKENS": "4",
        "RECAP_FETCH_RETRIES": "0",
        "PYTHONPATH": str(REPO),
        **extra,
    }


def transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def item_rows(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path}/recap.db")
    with engine.connect() as conn:
        rows = (
            conn.execute(sa.text("SELECT key, url, status, error_class, caption, attempts FROM items"))
            .mappings()
            .all()
        )
    engine.dispose()
    return [dict(r) for r in rows]


def test_run_captions_good_urls_and_classifies_every_failure(tmp_path, image_server, tiny_model_dir):
    good = [image_server.url(f"/img/{48 + i % 30}x{40 + i % 20}.jpg?seed={i}") for i in range(200)]
    good += [image_server.url(f"/img/64x64.{fmt}?seed=1") for fmt in ("png", "webp", "gif", "bmp")]
    bad = [image_server.url(path) for path in EXPECTED_FAILURES]
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join(good + bad + good[:5]) + "\n")  # 5 duplicates
    out = tmp_path / "out.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "recap.cli", "run", str(urls), "--out", str(out), "--export-status", "all"],
        env=run_env(tmp_path, tiny_model_dir, RECAP_MAX_PIXELS="50000000"),
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    rows = item_rows(tmp_path)
    assert len(rows) == len(good) + len(bad)  # one row each; duplicates once
    by_url = {r["url"]: r for r in rows}
    assert all(by_url[u]["status"] == "done" and by_url[u]["caption"] for u in good)
    for path, error_class in EXPECTED_FAILURES.items():
        row = by_url[image_server.url(path)]
        assert (row["status"], row["error_class"]) == ("failed", error_class), path

    table = pq.read_table(out)
    assert table.schema.names == EXPORT_COLUMNS
    assert table.num_rows == len(rows)
    first_done = next(r for r in table.to_pylist() if r["status"] == "done")
    assert first_done["re_length"] == len(first_done["re_caption"].split())
    assert first_done["model"] == str(tiny_model_dir)
    assert "max_new_tokens" in first_done["generation"]
    provenance = json.loads(first_done["provenance"])
    assert (provenance["engine"], provenance["engine_version"]) == ("transformers", transformers_version())
    assert (provenance["dtype"], provenance["device"], provenance["family"]) == ("float32", "cpu", "llava")
    assert provenance["revision"] == first_done["model_revision"]


def test_run_resumes_after_a_kill_without_redoing_done_items(tmp_path, image_server, tiny_model_dir):
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join(image_server.url(f"/slow?delay=0.05&seed={i}") for i in range(150)) + "\n")
    argv = [sys.executable, "-m", "recap.cli", "run", str(urls), "--out", str(tmp_path / "out.jsonl")]
    env = run_env(tmp_path, tiny_model_dir, RECAP_FETCH_CONCURRENCY="4")
    first = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )

    def some_done():
        try:
            return sum(r["status"] == "done" for r in item_rows(tmp_path)) >= 20
        except sa.exc.OperationalError:
            return False

    wait_until(some_done, 120, what="progress before the kill")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = {r["key"]: r["caption"] for r in item_rows(tmp_path) if r["status"] == "done"}
    assert 20 <= len(before) < 150

    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = item_rows(tmp_path)
    assert len(rows) == 150 and all(r["status"] == "done" for r in rows)
    assert all(r["attempts"] == 1 for r in rows), "a done item was captioned again"
    assert {r["key"]: r["caption"] for r in rows if r["key"] in before} == before
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 150


def test_other_families_recaption_the_same_inputs_as_jobs_side_by_side(tmp_path):
    """The other tiny families, on local images (no fetching), one after the other into one
    database: each model is a job of its own, and the exports line up by key."""
    exports = {}
    for family in ("llava-next", "mllama"):
        out = tmp_path / f"{family}.parquet"
        env = {
            **run_env(tmp_path, "unused"),
            "RECAP_MODEL": f"tiny-{family}",
            "RECAP_CACHE_DIR": str(tmp_path / "cache"),
        }
        result = subprocess.run(
            [sys.executable, "-m", "recap.cli", "run", str(REPO / "examples" / "images"), "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=200,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "meaningless" in result.stderr
        table = pq.read_table(out).to_pylist()
        assert len(table) == 6 and all(r["re_caption"] for r in table)
        assert {r["key"] for r in table} >= {"red-circle.jpg", "sunset.jpg"}
        assert (
            next(r for r in table if r["key"] == "red-circle.jpg")["org_caption"]
            == "a red circle on a white background"
        )
        exports[family] = {r["key"]: r for r in table}

    next_rows, mllama_rows = exports["llava-next"], exports["mllama"]
    assert next_rows.keys() == mllama_rows.keys()
    for key in next_rows:
        a, b = next_rows[key], mllama_rows[key]
        assert (a["model"], b["model"]) == ("tiny-llava-next", "tiny-mllama")
        assert a["job"] != b["job"] and a["sha256"] == b["sha256"]
        assert json.loads(a["provenance"])["family"] == "llava_next"
        assert json.loads(b["provenance"])["family"] == "mllama"


def test_a_straggler_does_not_hold_the_engine_its_chunk_finishes_later(
    tmp_path, image_server, tiny_model_dir
):
    """One URL of chunk 0 answers after 5 s: chunk 1 is captioned meanwhile, and the
    straggler still gets its caption, once."""
    urls = [image_server.url(f"/img/48x48.jpg?seed={i}") for i in range(40)]
    urls[3] = image_server.url("/slow?delay=5&seed=3")
    path = tmp_path / "urls.txt"
    path.write_text("\n".join(urls) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "recap.cli", "run", str(path), "--out", str(tmp_path / "out.parquet")],
        env=run_env(
            tmp_path,
            tiny_model_dir,
            RECAP_CHUNK_SIZE="20",
            RECAP_FETCH_TIMEOUT_S="15",
            RECAP_STRAGGLER_GRACE_S="0.5",
        ),
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    engine = sa.create_engine(f"sqlite:///{tmp_path}/recap.db")
    with engine.connect() as conn:
        rows = (
            conn.execute(sa.text("SELECT url, chunk_no, status, attempts, updated_at FROM items"))
            .mappings()
            .all()
        )
        chunks = conn.execute(sa.text("SELECT state FROM chunks")).scalars().all()
    engine.dispose()
    assert len(rows) == 40 and all(r["status"] == "done" and r["attempts"] == 1 for r in rows)
    assert chunks == ["done", "done"]
    straggler = next(r for r in rows if "/slow" in r["url"])
    chunk1_last = max(r["updated_at"] for r in rows if r["chunk_no"] == 1)
    assert straggler["updated_at"] > chunk1_last, "chunk 1 should not have waited for the straggler"


def test_webdataset_shards_are_captioned_from_their_own_bytes(tmp_path, tiny_model_dir):
    """A shard of already-downloaded images: read, never fetched; keys and captions kept."""
    import io
    import json
    import tarfile

    from PIL import Image

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(12):
            key = f"{i:09d}"
            buffer = io.BytesIO()
            Image.new("RGB", (64 + i, 48), (20 * i, 100, 200)).save(buffer, "JPEG")
            members = {
                f"{key}.jpg": buffer.getvalue(),
                f"{key}.txt": f"alt text {i}".encode(),
                f"{key}.json": json.dumps({"url": f"http://images.example.invalid/{i}.jpg"}).encode(),
            }
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "recap.cli", "run", str(shard), "--out", str(out)],
        env=run_env(tmp_path, tiny_model_dir),
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["key"]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 12 and all(r["status"] == "done" and r["re_caption"] for r in rows.values())
    assert rows["000000003"]["org_caption"] == "alt text 3"
    assert rows["000000003"]["url"].startswith("tar://000000003.jpg::")
    assert (rows["000000003"]["width"], rows["000000003"]["height"]) == (67, 48)
