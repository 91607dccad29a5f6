"""`recap convert llava`: tiny checkpoints in the original LLaVA format (built in code from the
tiny LLaVA, tests/support/original_llava.py) convert tensor for tensor and caption as the
model they were made from; what cannot be converted is refused in one line."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recap.errors import RecapError
from recap.settings import Settings
from tests.support.fleet import REPO

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402  (after the skips)

from tests.support.original_llava import (  # noqa: E402
    RESERVED_IMAGE_SLOT,
    original_name,
    tiny_tensors,
    write_clip_tower,
    write_llama3_tokenizer,
    write_original_llava,
)
from workers.convert import convert_llava  # noqa: E402
from workers.engine import load_engine  # noqa: E402
from workers.prepare import ImageLimits, prepare_image  # noqa: E402

MAX_NEW = 8
PROMPT = "Please generate a detailed caption of this image."


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores, other suites running beside this one
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def tower(tiny_model_dir, root) -> Path:
    """openai/clip-vit-large-patch14-336's shape of folder: a whole CLIPModel in a .bin."""
    return write_clip_tower(tiny_model_dir, root / "clip-tower", weights="bin")


@pytest.fixture(scope="module")
def original(tiny_model_dir, root, tower) -> Path:
    return write_original_llava(tiny_model_dir, root / "llava-original", tower=str(tower))


@pytest.fixture(scope="module")
def converted(original, root) -> Path:
    convert_llava(str(original), root / "llava-converted")
    return root / "llava-converted"


@pytest.fixture(scope="module")
def settings(root) -> Settings:
    return Settings(
        cache_dir=root / "cache",
        engine="transformers",
        device="cpu",
        dtype="float32",
        max_new_tokens=MAX_NEW,
        image_mode="pad",
    )


def caption_texts(model_dir: Path, settings: Settings) -> list[str]:
    """Greedy captions of a few images of several shapes, prepared in pad mode, by the
    engine `recap run --model DIR` loads."""
    engine = load_engine(settings, str(model_dir))
    rng = np.random.default_rng(0)
    images = []
    for h, w in ((32, 32), (40, 64), (64, 36), (48, 48)):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
        prepared = prepare_image(buffer.getvalue(), engine.image_spec, ImageLimits(min_side=8))
        images.append(prepared.image)
    captions = engine.caption(images, [PROMPT] * len(images))
    assert all(c.failure is None for c in captions)
    return [c.text for c in captions]


def recap_source(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())["recap_source"]


# -- what a conversion makes ------------------------------------------------------------


def test_every_tensor_maps_to_one_tensor_unchanged(tiny_model_dir, original, tower, converted):
    """The converted tensors are the tiny model's, name for name (it is in the hub's layout):
    none lost, none invented, values, shapes and dtypes equal; the tower's text half and
    its position_ids buffer are left out."""
    made = load_file(converted / "model.safetensors")
    source = tiny_tensors(tiny_model_dir)
    assert sorted(made) == sorted(source)
    for name, tensor in source.items():
        assert made[name].dtype == tensor.dtype and made[name].shape == tensor.shape, name
        assert torch.equal(made[name], tensor), name
    tower_state = torch.load(tower / "pytorch_model.bin", weights_only=True)
    assert "vision_model.embeddings.position_ids" in tower_state and "logit_scale" in tower_state
    assert not any("position_ids" in n or "text_model" in n for n in made)


def test_the_folder_is_a_transformers_llava_that_records_its_source(original, tower, converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["model_type"] == "llava"
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["image_seq_length"] == 16 and config["recap_tiny"] is True
    source = recap_source(converted)
    assert source["format"] == "llava-original" and source["source"] == str(original)
    assert source["revision"].startswith("sha256:") and source["vision_tower"] == str(tower)
    assert source["vision_tower_weights"] == "vision tower" and source["image_token"] == "reused"
    processor = json.loads((converted / "processor_config.json").read_text())
    assert processor["image_token"] == "<image>" and processor["patch_size"] == 8
    assert processor["image_processor"]["crop_size"] == {"height": 32, "width": 32}
    assert "<|start_header_id|>" in (converted / "chat_template.jinja").read_text()


def test_the_converted_model_captions_as_the_model_it_was_made_from(tiny_model_dir, converted, settings):
    assert caption_texts(converted, settings) == caption_texts(tiny_model_dir, settings)


def test_a_hub_id_converts_offline_from_the_cache_and_records_its_commit(original, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--recap-test--tiny-llava-original"
    shutil.copytree(original, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    done = convert_llava("recap-test/tiny-llava-original", tmp_path / "out")
    assert done.source.revision == commit and not done.source.is_local
    source = recap_source(tmp_path / "out")
    assert source["source"] == "recap-test/tiny-llava-original" and source["revision"] == commit


def test_bins_mixed_dtypes_and_a_tower_inside_the_checkpoint(tiny_model_dir, root):
    """pytorch_model*.bin shards, a bf16 language model beside an fp32 tower saved in the
    checkpoint, rotary buffers to leave out; the tower folder gives only configs; the
    output is sharded, and transformers loads it with no tensor missing or left over."""
    from transformers import AutoModelForImageTextToText

    tower = write_clip_tower(tiny_model_dir, root / "tower-configs-only", weights=None)
    src = write_original_llava(
        tiny_model_dir,
        root / "llava-bins",
        tower=str(tower),
        shards=3,
        weights="bin",
        dtype=torch.bfloat16,
        tower_inside=True,
        rotary_buffers=True,
    )
    out = root / "llava-bins-converted"
    done = convert_llava(str(src), out, shard_bytes=40_000)
    assert done.tower_weights == "checkpoint" and recap_source(out)["vision_tower_weights"] == "checkpoint"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    made = {}
    for shard in sorted(set(index["weight_map"].values())):
        made.update(load_file(out / shard))
    assert len(set(index["weight_map"].values())) > 1 and sorted(made) == sorted(index["weight_map"])
    originals = {}
    for shard in sorted(src.glob("pytorch_model-*.bin")):
        originals.update(torch.load(shard, weights_only=True))
    for name, tensor in made.items():
        source = originals.pop(original_name(name))
        assert tensor.dtype == source.dtype and torch.equal(tensor, source), name
    assert sorted(originals) == [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)]
    assert made["language_model.lm_head.weight"].dtype == torch.bfloat16
    assert made["vision_tower.vision_model.pre_layrnorm.weight"].dtype == torch.float32
    _, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_without_an_image_token_the_tokenizer_gets_one_in_a_reserved_slot(
    tiny_model_dir, original, root, settings
):
    """A LLaMA-3 tokenizer has no image token and no embedding row to spare: `<image>`
    takes its last reserved token's id, so no tensor changes, and captions stay the same."""
    src = root / "llava-reserved"
    shutil.copytree(original, src)
    write_llama3_tokenizer(src)
    out = root / "llava-reserved-converted"
    done = convert_llava(str(src), out)
    assert (
        done.image_token.text == "<image>" and done.image_token.how == f"reserved slot {RESERVED_IMAGE_SLOT}"
    )
    tiny_config = json.loads((tiny_model_dir / "config.json").read_text())
    assert done.image_token.id == tiny_config["image_token_index"]
    tokens = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    assert {t["content"]: t["id"] for t in tokens}["<image>"] == done.image_token.id
    assert RESERVED_IMAGE_SLOT not in {t["content"] for t in tokens}
    assert caption_texts(out, settings) == caption_texts(tiny_model_dir, settings)


def test_an_image_token_is_added_where_the_embedding_has_a_row_to_spare(tmp_path):
    from workers.convert.processor import image_token, load_tokenizer

    write_llama3_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path, "test")
    size = len(tokenizer)
    token = image_token(tokenizer, embedding_rows=size + 64)  # a vocabulary padded to a multiple of 64
    assert (token.text, token.id, token.how) == ("<image>", size, "added")
    assert tokenizer.convert_tokens_to_ids(RESERVED_IMAGE_SLOT) == size - 2  # left as it was


def test_no_image_token_and_no_room_for_one_is_refused(tmp_path):
    from workers.convert.processor import image_token, load_tokenizer

    write_llama3_tokenizer(tmp_path, image_slot="<|python_tag|>")  # no reserved tokens at all
    tokenizer = load_tokenizer(tmp_path, "test")
    with pytest.raises(RecapError, match="no unused row or reserved token"):
        image_token(tokenizer, embedding_rows=len(tokenizer))


def test_cls_patch_keeps_the_cls_token_and_counts_it(tiny_model_dir, root, tower, settings):
    src = write_original_llava(
        tiny_model_dir, root / "llava-cls", tower=str(tower), config={"mm_vision_select_feature": "cls_patch"}
    )
    out = root / "llava-cls-converted"
    assert convert_llava(str(src), out).image_features == 17  # 4x4 patches and the CLS token
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == "full" and config["image_seq_length"] == 17
    assert len(caption_texts(out, settings)) == 4  # image tokens and features agree


def test_missing_tensors_are_refused(original, root):
    src = root / "llava-incomplete"
    shutil.copytree(original, src)
    shard = src / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    from safetensors.torch import save_file

    save_file(tensors, shard)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(RecapError, match=r"missing tensors \(1\)"):
        convert_llava(str(src), root / "never-written")
    assert not (root / "never-written").exists()
    assert not [p for p in root.iterdir() if ".converting-" in p.name]  # staging cleaned up


# -- the command ------------------------------------------------------------------------


def recap(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recap.cli", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def edited_copy(original: Path, dest: Path, **config) -> Path:
    shutil.copytree(original, dest)
    raw = json.loads((dest / "config.json").read_text())
    raw.update(config)
    (dest / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return dest


@pytest.mark.parametrize(
    ("config", "tower_option", "message"),
    [
        ({"mm_projector_type": "linear"}, None, "unknown projector type 'linear'"),
        ({"mm_projector_type": "qformer"}, None, "unknown projector type 'qformer'"),
        ({"mm_vision_tower": None}, None, "names no vision tower (mm_vision_tower): pass --vision-tower"),
        ({}, "/nonexistent/clip-tower", "vision tower /nonexistent/clip-tower is not a folder"),
        ({"model_type": "llava_mistral"}, None, "is not LLaMA"),
        ({"image_aspect_ratio": "anyres"}, None, "LLaVA-NeXT"),
        ({"mm_hidden_size": 1024}, None, "another tower?"),
    ],
)
def test_what_cannot_be_converted_is_refused_in_one_line(original, tmp_path, config, tower_option, message):
    src = edited_copy(original, tmp_path / "src", **config)
    extra = ["--vision-tower", tower_option] if tower_option else []
    result = recap("convert", "llava", str(src), "--out", str(tmp_path / "out"), *extra)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_tower_without_weights_is_refused(tiny_model_dir, original, tmp_path):
    tower = write_clip_tower(tiny_model_dir, tmp_path / "configs-only", weights=None)
    with pytest.raises(RecapError, match="has no weights"):
        convert_llava(str(original), tmp_path / "out", vision_tower=str(tower))


def test_a_filled_out_folder_and_an_unreachable_hub_id_are_refused(original, tmp_path):
    filled = tmp_path / "filled"
    filled.mkdir()
    (filled / "keep.txt").write_text("mine")
    result = recap("convert", "llava", str(original), "--out", str(filled))
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert (filled / "keep.txt").read_text() == "mine"
    result = recap(
        "convert", "llava", "nobody/no-such-llava", "--out", str(tmp_path / "out"), HF_HUB_OFFLINE="1"
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "checkpoint nobody/no-such-llava is not a folder here, and the Hugging Face Hub" in result.stderr


def test_the_command_converts_into_an_empty_folder_and_says_how_to_caption(original, tmp_path):
    out = tmp_path / "converted"
    out.mkdir()  # an empty folder is fine
    result = recap("convert", "llava", str(original), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "64 tensors copied unchanged" in result.stdout
        and "image token <image> (id 516, reused)" in result.stdout
    )
    assert f"RECAP_IMAGE_MODE=pad recap run INPUT... --out PATH --model {out}" in result.stdout
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".converted.converting-*"))


def test_importing_the_converter_does_not_import_torch():
    """The configs are checked before torch and transformers load: refusals answer at once."""
    code = (
        "import sys, workers.convert, workers.convert.processor; "
        "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_converted_models_captions_name_their_source_in_the_provenance(converted, settings):
    from workers.engine import TransformersEngine

    engine = TransformersEngine(converted, settings)
    assert engine.provenance["converted_from"] == recap_source(converted)
    assert engine.provenance["converted_from"]["format"] == "llava-original"
