"""CLIP scores (RECAP_SCORE_MODEL): a real `recap run` with the tiny CLIP, scores checked
against an independent computation with transformers' CLIPModel, the `score_truncated`
flag, provenance, and the migration that adds the columns."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.request

import pyarrow.parquet as pq
import pytest

from producer.export import EXPORT_COLUMNS
from tests.test_run import run_env

pytestmark = pytest.mark.timeout(300)

LONG = " ".join(["a photo of a dog sitting on the green grass in a park next to a red ball"] * 8)


@pytest.fixture(scope="module")
def tiny_clip_cache(tmp_path_factory):
    """A cache folder holding the tiny CLIP, built once for this module's runs."""
    from workers.tiny_model import ensure_tiny_model

    cache = tmp_path_factory.mktemp("cache")
    ensure_tiny_model(cache, "clip")
    return cache


def independent_score(clip_dir, image, text: str) -> float:
    """Cosine similarity of CLIP's image and text embeddings, straight from transformers."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=[text], images=[image], return_tensors="pt", truncation=True, max_length=77)
    with torch.no_grad():
        image_out = model.get_image_features(pixel_values=inputs["pixel_values"])
        text_out = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
    i = getattr(image_out, "pooler_output", image_out)
    t = getattr(text_out, "pooler_output", text_out)
    return float(torch.nn.functional.cosine_similarity(i, t).item())


def decoded(url: str):
    from PIL import Image

    with urllib.request.urlopen(url) as response:  # loopback only
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def recap_run(tmp_path, tiny_model_dir, rows: list[dict], **env) -> list[dict]:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "recap.cli", "run", str(inputs), "--out", str(out)],
        env=run_env(tmp_path, tiny_model_dir, **env),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = pq.read_table(out)
    assert table.schema.names == EXPORT_COLUMNS
    return table.to_pylist()


def test_a_run_exports_clip_scores_equal_to_transformers_own(
    tmp_path, image_server, tiny_model_dir, tiny_clip_cache
):
    from workers.tiny_model import ensure_tiny_model

    rows = [
        {"url": image_server.url("/img/64x48.png?seed=1"), "caption": "a dog on the grass"},
        {"url": image_server.url("/img/40x72.jpg?seed=2"), "caption": "two cats on a table"},
        {"url": image_server.url("/img/50x50.png?seed=3")},  # no original caption
        {"url": image_server.url("/img/80x60.png?seed=4"), "caption": LONG},  # over 77 tokens
    ]
    exported = recap_run(
        tmp_path, tiny_model_dir, rows, RECAP_SCORE_MODEL="tiny-clip", RECAP_CACHE_DIR=str(tiny_clip_cache)
    )
    by_url = {r["url"]: r for r in exported}
    assert [by_url[r["url"]]["status"] for r in rows] == ["done"] * 4
    clip_dir = ensure_tiny_model(tiny_clip_cache, "clip")
    for row in rows:
        got = by_url[row["url"]]
        image = decoded(row["url"])
        assert got["re_clip_score"] == pytest.approx(
            independent_score(clip_dir, image, got["re_caption"]), abs=1e-4
        )
        if "caption" in row:
            assert got["org_clip_score"] == pytest.approx(
                independent_score(clip_dir, image, row["caption"]), abs=1e-4
            )
        else:
            assert got["org_clip_score"] is None
        provenance = json.loads(got["provenance"])
        assert provenance["score_model"] == "tiny-clip" and provenance["score_revision"]
    assert "score_truncated" in by_url[rows[3]["url"]]["flags"]
    assert "score_truncated" not in by_url[rows[0]["url"]]["flags"]


def test_scores_are_null_when_scoring_is_off(tmp_path, image_server, tiny_model_dir):
    rows = [{"url": image_server.url("/img/64x48.png?seed=5"), "caption": "a dog"}]
    (got,) = recap_run(tmp_path, tiny_model_dir, rows, RECAP_SCORE_MODEL="")
    assert got["status"] == "done"
    assert (got["re_clip_score"], got["org_clip_score"]) == (None, None)
    assert "score_model" not in json.loads(got["provenance"])


def test_a_large_image_is_scored_from_its_thumbnail_as_from_the_full_decode(tiny_clip_cache):
    """The prepare stage keeps a thumbnail no larger than CLIP's input side; CLIP's processor
    makes the same pixels of it as of the full-size decode."""
    from PIL import Image

    from recap.records import ImageSpec
    from tests.support.http_server import render_image
    from workers.prepare import ImageLimits, prepare_image
    from workers.scoring import ClipScorer, ScoreRequest
    from workers.tiny_model import ensure_tiny_model

    clip_dir = ensure_tiny_model(tiny_clip_cache, "clip")
    scorer = ClipScorer.load(clip_dir, "tiny-clip")
    data = render_image(300, 200, "png", 7)
    prepared = prepare_image(data, ImageSpec(32, "pad", clip_side=scorer.side), ImageLimits())
    assert max(prepared.clip_image.size) < 300 and min(prepared.clip_image.size) == scorer.side
    (scores,) = scorer.score([ScoreRequest(prepared.clip_image, "a dog", LONG)])
    full = Image.open(io.BytesIO(data)).convert("RGB")
    assert scores.re_clip_score == pytest.approx(independent_score(clip_dir, full, "a dog"), abs=1e-4)
    assert scores.org_clip_score == pytest.approx(independent_score(clip_dir, full, LONG), abs=1e-4)
    assert scores.truncated


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_migration_adds_the_score_columns_to_a_job_s_items(database, request):
    from sqlalchemy import inspect

    from alembic import command
    from recap.db import alembic_config, get_engine
    from recap.generation import GenerationSettings
    from recap.records import InputItem
    from recap.store import Store

    url = request.getfixturevalue("sqlite_url" if database == "sqlite" else "pg_url")
    store = Store(url)
    job = store.ensure_job("older", "tiny", "describe", GenerationSettings.from_json({}), 2)
    store.register_items(job, [[InputItem(f"k{i}", f"http://127.0.0.1/{i}") for i in range(4)]])
    command.downgrade(alembic_config(url), "0003")
    table = f"items_p{job.id}" if database == "postgresql" else "items"

    def columns() -> set[str]:
        engine = get_engine(url)
        engine.dispose()  # no cached table shapes from before the migration
        return {c["name"] for c in inspect(engine).get_columns(table)}

    assert not {"re_clip_score", "org_clip_score"} & columns()
    command.upgrade(alembic_config(url), "head")
    assert {"re_clip_score", "org_clip_score"} <= columns()
    assert store.job_status(store.find_job("older")).items.pending == 4


def test_the_dev_command_builds_a_tiny_clip(tmp_path):
    from transformers import CLIPModel

    result = subprocess.run(
        [sys.executable, "-m", "recap.cli", "dev", "tiny-model", str(tmp_path / "clip"), "--family", "clip"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert CLIPModel.from_pretrained(tmp_path / "clip").config.text_config.max_position_embeddings == 77
