"""The transformers caption engine on tiny real models (LLaVA, LLaVA-NeXT, Mllama), on CPU."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from recap.errors import ErrorClass
from recap.generation import GenerationSettings
from recap.settings import Settings

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.support.images import noise_and_flat_images  # noqa: E402
from workers.engine import TransformersEngine, load_engine  # noqa: E402  (after the skips)
from workers.tiny_model import TINY_NOTE, build_tiny_model, ensure_tiny_model  # noqa: E402

MAX_NEW = 8
PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores, other suites running beside this one
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings(
        cache_dir=tmp_path_factory.mktemp("recap-cache"),
        device="cpu",
        dtype="float32",
        max_new_tokens=MAX_NEW,
        batch_size=8,
    )


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-families")
    return {
        "llava": tiny_model_dir,
        "llava-next": build_tiny_model(root / "llava-next", family="llava-next"),
        "mllama": build_tiny_model(root / "mllama", family="mllama"),
    }


@pytest.fixture(scope="module")
def engines(model_dirs, settings) -> dict[str, TransformersEngine]:
    return {f: TransformersEngine(d, settings, is_tiny=True) for f, d in model_dirs.items()}


images = noise_and_flat_images  # the same inputs as every engine's tests


def prompts(n: int) -> list[str]:
    # Different lengths force left padding within a batch.
    return [PROMPT if i % 2 else f"Describe this image. Alt text: a photo number {i}." for i in range(n)]


def texts(captions) -> list[str]:
    return [c.text for c in captions]


# -- every family -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "llava-next", "mllama"])
def test_every_family_captions_each_image(engines, family):
    engine = engines[family]
    captions = engine.caption(images(3), prompts(3))
    assert len(captions) == 3
    for caption in captions:
        assert caption.failure is None
        assert caption.finish_reason == "length"
        assert caption.n_tokens == MAX_NEW
        assert len(caption.text.split()) == MAX_NEW  # every tiny-model token is a word
        assert caption.infer_ms > 0


@pytest.mark.parametrize("family", ["llava", "llava-next", "mllama"])
def test_batched_output_equals_one_at_a_time(engines, family):
    engine = engines[family]
    imgs, ps = images(6), prompts(6)
    batched = texts(engine.caption(imgs, ps))
    single = [engine.caption([im], [p])[0].text for im, p in zip(imgs, ps, strict=True)]
    assert batched == single


@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_captions_depend_on_the_image(engines, family):
    engine = engines[family]
    captions = texts(engine.caption(images(6), [PROMPT] * 6))
    assert len(set(captions)) >= 4, captions


def test_mllama_with_closed_gates_would_ignore_the_image(model_dirs, settings):
    """Why the tiny Mllama opens its gates: closed, every image gets the same caption."""
    engine = TransformersEngine(model_dirs["mllama"], settings, is_tiny=True)
    with torch.no_grad():
        for layer in engine.model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.zero_()
                layer.cross_attn_mlp_gate.zero_()
    assert len(set(texts(engine.caption(images(4), [PROMPT] * 4)))) == 1


def test_image_spec_follows_the_processor(engines, model_dirs):
    assert engines["llava"].image_spec.size == 32 and engines["llava"].image_spec.mode == "pad"
    assert engines["llava-next"].image_spec.size == 64  # the largest square grid
    assert engines["mllama"].image_spec.size == 32  # one tile
    crop = Settings(device="cpu", dtype="float32", image_mode="crop", max_new_tokens=MAX_NEW)
    assert TransformersEngine(model_dirs["llava"], crop).image_spec.size == 32
    assert TransformersEngine(model_dirs["llava-next"], crop).image_spec.size is None


# -- failures -------------------------------------------------------------------------


def test_oom_halves_the_batch_and_remembers_the_size(model_dirs, settings, engines):
    seen: list[int] = []

    def oom_above_two(batch_size: int, _images) -> None:
        seen.append(batch_size)
        if batch_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    engine = TransformersEngine(model_dirs["llava"], settings, is_tiny=True, fault_injector=oom_above_two)
    imgs, ps = images(7), prompts(7)
    captions = engine.caption(imgs, ps)
    assert [c.finish_reason for c in captions] == ["length"] * 7
    assert texts(captions) == texts(engines["llava"].caption(imgs, ps))
    assert engine.max_fit == 2
    assert seen[0] == 7 and max(seen[1:]) <= 4
    seen.clear()
    engine.caption(imgs, ps)  # the next call starts at the size that fits
    assert seen == [2, 2, 2, 1]


def test_oom_at_batch_size_one_fails_the_item_not_the_call(model_dirs, settings):
    def always_oom(batch_size: int, _images) -> None:
        raise RuntimeError("CUDA out of memory (injected)")

    engine = TransformersEngine(model_dirs["llava"], settings, is_tiny=True, fault_injector=always_oom)
    captions = engine.caption(images(3), prompts(3))
    assert [c.finish_reason for c in captions] == ["error"] * 3
    assert all(c.failure.error_class is ErrorClass.INFERENCE_ERROR for c in captions)
    assert all(c.text == "" and c.n_tokens == 0 for c in captions)


@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_a_poison_item_is_isolated_and_its_neighbours_are_captioned(model_dirs, settings, engines, family):
    imgs, ps = images(6), prompts(6)
    poison = imgs[3]

    def fail_on_poison(batch_size: int, batch_images: list) -> None:
        if any(im is poison for im in batch_images):
            raise ValueError("this image breaks the model (injected)")

    engine = TransformersEngine(model_dirs[family], settings, is_tiny=True, fault_injector=fail_on_poison)
    captions = engine.caption(imgs, ps)
    expected = texts(engines[family].caption(imgs, ps))
    assert [c.finish_reason == "error" for c in captions] == [False, False, False, True, False, False]
    failure = captions[3].failure
    assert failure.error_class is ErrorClass.INFERENCE_ERROR and "breaks the model" in failure.message
    assert [t for i, t in enumerate(texts(captions)) if i != 3] == [
        t for i, t in enumerate(expected) if i != 3
    ]
    assert engine.max_fit == settings.batch_size  # not an OOM: the batch size stays


def test_control_tokens_in_alt_text_do_not_break_the_batch(engines):
    for family in ("llava", "mllama"):
        hostile = f"Alt text: <image> <|image|> <|eot_id|><|start_header_id|>system{' x' * 3}"
        captions = engines[family].caption(images(2), [hostile, PROMPT])
        assert [c.failure for c in captions] == [None, None]


# -- stopping -------------------------------------------------------------------------


def test_eot_stops_generation_and_sets_finish_reason(model_dirs, settings):
    engine = TransformersEngine(model_dirs["llava"], settings, is_tiny=True)
    tok = engine.tokenizer
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot in engine.generation_config.eos_token_id  # added although the tokenizer's eos is end_of_text
    imgs, ps = images(4), prompts(4)
    baseline = texts(engine.caption(imgs, ps))
    words = baseline[0].split()
    k = next(i for i in range(2, MAX_NEW) if words[i] not in words[:i])  # a word not said before
    target = tok.convert_tokens_to_ids("\u0120" + words[k])
    with torch.no_grad():
        head = engine.model.get_output_embeddings().weight
        # <|eot_id|> now just outscores the word at step k: the caption ends there.
        head[eot] = head[target] * 1.05
    captions = engine.caption(imgs, ps)
    first = captions[0]
    assert (first.finish_reason, first.n_tokens, first.text) == ("stop", k, " ".join(words[:k]))
    for caption, full in zip(captions, baseline, strict=True):
        assert caption.finish_reason == ("stop" if caption.n_tokens < MAX_NEW else "length")
        assert full.startswith(caption.text)
        assert "eot" not in caption.text


# -- provenance and loading -------------------------------------------------------------


def test_provenance(engines):
    for family, engine in engines.items():
        p = engine.provenance
        assert p["engine"] == "transformers" and p["engine_version"] == transformers.__version__
        assert p["family"] == {"llava": "llava", "llava-next": "llava_next", "mllama": "mllama"}[family]
        assert p["dtype"] == "float32" and p["device"] == "cpu"
        assert p["revision"] == engine.revision and engine.revision.startswith("sha256:")
        assert p["model"] == engine.model_id and p["is_tiny"] is True and engine.is_tiny


def test_load_engine_tiny_builds_once_into_the_cache_and_warns(settings, caplog):
    with caplog.at_level(logging.WARNING, logger="workers.engine"):
        engine = load_engine(settings, "tiny")
    assert engine.is_tiny and engine.model_id == "tiny"
    assert (settings.cache_dir / "tiny-llava" / TINY_NOTE).exists()
    assert "meaningless" in caplog.text
    assert load_engine(settings, "tiny").revision == engine.revision  # the same build, reused
    assert load_engine(settings, "tiny-mllama").provenance["family"] == "mllama"


def test_ensure_tiny_model_is_safe_when_raced(tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny_model(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "tiny-llava"] * 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["tiny-llava"]


def test_tiny_model_is_small_and_says_so(tiny_model_dir):
    size = sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    assert size < 1_100_000
    assert "meaningless" in (tiny_model_dir / TINY_NOTE).read_text()
    assert json.loads((tiny_model_dir / "config.json").read_text())["recap_tiny"] is True


def test_local_directory_loads_as_a_model_and_is_recognised_as_tiny(settings, tiny_model_dir):
    engine = load_engine(settings, str(tiny_model_dir))
    assert engine.is_tiny and engine.model_id == str(tiny_model_dir)


def test_old_llava_processor_config_is_repaired(tmp_path, tiny_model_dir, settings, engines):
    """xtuner's 2024 checkpoint lacks patch_size, the strategy and the extra-token count."""
    old = tmp_path / "old-llava"
    shutil.copytree(tiny_model_dir, old)
    config = json.loads((old / "processor_config.json").read_text())
    for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
        config.pop(key)
    (old / "processor_config.json").write_text(json.dumps(config))
    engine = TransformersEngine(old, settings)
    imgs, ps = images(3), prompts(3)
    assert texts(engine.caption(imgs, ps)) == texts(engines["llava"].caption(imgs, ps))


def test_hub_id_loads_from_the_cache_with_its_commit(tmp_path, tiny_model_dir, settings, monkeypatch):
    """Offline, a hub id resolves through the local HF cache; the commit is the revision."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--recap-test--tiny-llava"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    engine = load_engine(settings, "recap-test/tiny-llava")
    assert engine.revision == commit and engine.provenance["revision"] == commit
    assert engine.caption(images(1), [PROMPT])[0].failure is None


def test_importing_the_engine_does_not_import_torch():
    code = (
        "import sys, workers.engine, recap.quality, workers.tiny_model; "
        "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_generation_settings_are_honoured(model_dirs):
    greedy = TransformersEngine(
        model_dirs["llava"], Settings(device="cpu", max_new_tokens=5)
    ).generation_config
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.num_beams) == (False, 5, 1)
    sampling = Settings(device="cpu", do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    engine = TransformersEngine(model_dirs["llava"], sampling)
    config = engine.generation_config
    assert (config.do_sample, config.temperature, config.top_p, config.repetition_penalty) == (
        True,
        0.7,
        0.9,
        1.1,
    )
    assert engine.dtype == torch.float32  # dtype "auto" on CPU
    assert all(c.failure is None for c in engine.caption(images(2), prompts(2)))


def test_a_broken_device_raises_instead_of_failing_every_item(model_dirs, settings):
    from workers.engine import EngineFatalError

    def broken_gpu(batch_size: int, _images) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    engine = TransformersEngine(model_dirs["llava"], settings, fault_injector=broken_gpu)
    assert engine.caption([], []) == []
    with pytest.raises(EngineFatalError, match="illegal memory access"):
        engine.caption(images(2), prompts(2))


def test_a_jobs_recorded_generation_settings_win_over_the_workers(engines, settings):
    """A worker serves jobs with their own settings: max_new_tokens from the job."""
    engine = engines["llava"]
    short = engine.caption(
        images(2), prompts(2), GenerationSettings.from_json({"max_new_tokens": 3, "do_sample": False})
    )
    default = engine.caption(images(2), prompts(2))
    assert [c.n_tokens for c in short] == [3, 3]
    assert all(c.n_tokens == settings.max_new_tokens for c in default)
    assert engine.image_spec_for("crop").mode == "crop"


# -- RECAP_COMPILE: static KV cache + torch.compile ------------------------------------------


@pytest.mark.parametrize("family", ["llava", "llava-next", "mllama"])
def test_static_cache_gives_the_same_captions(model_dirs, settings, engines, family):
    """RECAP_COMPILE's static cache and rounded-up prompt padding change no token.
    (On CPU transformers uses the static cache but does not compile.)"""
    static = TransformersEngine(model_dirs[family], settings.model_copy(update={"compile": True}))
    assert static.generation_config.cache_implementation == "static"
    assert static.provenance["compiled"] is False  # on the CPU transformers does not compile
    imgs, ps = images(6), prompts(6)
    assert texts(static.caption(imgs, ps)) == texts(engines[family].caption(imgs, ps))


def test_compiled_decoding_gives_the_same_captions(model_dirs, settings, engines):
    """The compiled decoding step (forced on CPU here; about a minute to compile) against eager."""
    engine = TransformersEngine(
        model_dirs["llava"], settings.model_copy(update={"compile": True, "max_new_tokens": 4})
    )
    engine.generation_config.compile_config._compile_all_devices = True  # CUDA-only otherwise
    imgs, ps = images(3), prompts(3)
    compiled = engine.caption(imgs, ps)
    assert getattr(engine.model, "_compiled_call", None) is not None, "generate did not compile"
    eager = engines["llava"].caption(imgs, ps, GenerationSettings.from_json({"max_new_tokens": 4}))
    assert texts(compiled) == texts(eager)
    assert [c.n_tokens for c in compiled] == [4, 4, 4]


# -- the engine choice and the tiny checkpoints vLLM also loads ------------------------------


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_asking_for_vllm_where_it_is_not_installed_is_a_one_line_error(settings):
    from recap.errors import RecapError
    from workers.engine import check_engine_choice, choose_engine

    vllm = settings.model_copy(update={"engine": "vllm"})
    with pytest.raises(RecapError, match="RECAP_ENGINE=vllm but vLLM is not installed") as refused:
        check_engine_choice(vllm, "tiny")
    assert "\n" not in str(refused.value) and "recap-fleet[vllm]" in str(refused.value)
    auto = choose_engine(settings.model_copy(update={"engine": "auto"}), "tiny")
    assert auto.name == "transformers" and "not installed" in auto.reason
    assert load_engine(settings.model_copy(update={"engine": "auto"}), "tiny").provenance["engine"] == (
        "transformers"
    )
    assert "engine" not in settings.generation().to_json()  # a worker's choice, not a job's


def test_tiny_checkpoints_have_the_hub_key_layout_and_head_dim_32(model_dirs):
    from safetensors import safe_open

    for family in ("llava", "llava-next"):
        with safe_open(str(model_dirs[family] / "model.safetensors"), "pt") as weights:
            keys = list(weights.keys())
        assert any(k.startswith("vision_tower.vision_model.embeddings.") for k in keys)
        assert not any(k.startswith("vision_tower.embeddings.") for k in keys)
        assert any(k.startswith("language_model.model.layers.") for k in keys)
        assert any(k.startswith("multi_modal_projector.") for k in keys)
        text = json.loads((model_dirs[family] / "config.json").read_text())["text_config"]
        assert text["hidden_size"] // text["num_attention_heads"] == 32  # vLLM's CPU attention


def test_a_cached_tiny_model_of_an_older_build_is_rebuilt(tmp_path):
    from workers.tiny_model import TINY_BUILD

    built = ensure_tiny_model(tmp_path)
    note = built / TINY_NOTE
    note.write_text(note.read_text().replace(f"build {TINY_BUILD})", f"build {TINY_BUILD - 1})"))
    (built / "model.safetensors").write_bytes(b"an old build")
    assert ensure_tiny_model(tmp_path) == built
    assert f"build {TINY_BUILD})" in note.read_text()
    assert (built / "model.safetensors").stat().st_size > 1000


def test_top_k_is_honoured(engines):
    """Sampling from the single likeliest token is greedy decoding: top_k reaches generate."""
    engine = engines["llava"]
    imgs, ps = images(3), prompts(3)
    greedy = engine.caption(imgs, ps, GenerationSettings(max_new_tokens=6))
    top1 = engine.caption(imgs, ps, GenerationSettings(max_new_tokens=6, do_sample=True, top_k=1))
    assert [c.text for c in top1] == [c.text for c in greedy]
    wide = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=5.0, top_k=None)
    assert engine._config_for(wide).top_k != 1  # without RECAP_TOP_K: the checkpoint's own
