"""Tiny checkpoints in the original LLaVA repository's format, built in code from recap's tiny
LLaVA (workers/tiny_model.py, saved in the hub's key layout): the inverse of
`recap convert llava`, written here on its own so that the test does not check the
converter's mapping against itself.

Original layout: config.json of model type `llava_llama` (the LLaMA fields at the top, the
`mm_*` fields beside them), tensors `model.embed_tokens`, `model.layers.N.*`, `model.norm`,
`lm_head`, `model.mm_projector.0/2`, and the CLIP tower in a folder of its own (a whole
CLIPModel, as `openai/clip-vit-large-patch14-336` is) or inside the checkpoint under
`model.vision_tower.vision_tower.vision_model.*`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESERVED_IMAGE_SLOT = "<|reserved_special_token_250|>"
_LLAMA_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "hidden_act",
    "initializer_range",
    "attention_bias",
    "attention_dropout",
)


def tiny_tensors(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(tiny_dir / "model.safetensors")


def original_name(hub_name: str) -> str:
    """The original LLaVA name of a hub-layout tensor (the tower's: inside the checkpoint)."""
    renames = {
        "language_model.model.": "model.",
        "language_model.lm_head.": "lm_head.",
        "multi_modal_projector.linear_1.": "model.mm_projector.0.",
        "multi_modal_projector.linear_2.": "model.mm_projector.2.",
        "vision_tower.": "model.vision_tower.vision_tower.",
    }
    for old, new in renames.items():
        if hub_name.startswith(old):
            return new + hub_name.removeprefix(old)
    raise ValueError(hub_name)


def write_clip_tower(tiny_dir: Path, out: Path, *, weights: str | None = "bin") -> Path:
    """A CLIP folder whose vision half is the tiny LLaVA's tower: config, image processor
    (in the legacy format of openai's CLIP folders) and, unless `weights` is None, the
    whole CLIPModel's weights ("bin": a pytorch_model.bin with the position_ids buffers
    old checkpoints saved; "safetensors": as transformers saves it)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    llava = json.loads((tiny_dir / "config.json").read_text())
    vision = llava["vision_config"]
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=16)
    out.mkdir(parents=True)
    side = vision["image_size"]
    (out / "preprocessor_config.json").write_text(json.dumps(_legacy_clip_preprocessor(side)))
    if weights is None:
        config.save_pretrained(out)
        return out
    torch.manual_seed(1)
    model = CLIPModel(config)
    prefix = "vision_tower.vision_model."
    tower = {k.removeprefix(prefix): v for k, v in tiny_tensors(tiny_dir).items() if k.startswith(prefix)}
    model.vision_model.load_state_dict(tower, strict=True)
    if weights == "safetensors":
        model.save_pretrained(out)
        return out
    config.save_pretrained(out)
    state = dict(model.state_dict())
    state["vision_model.embeddings.position_ids"] = torch.arange((side // vision["patch_size"]) ** 2 + 1)[
        None
    ]
    state["text_model.embeddings.position_ids"] = torch.arange(text.max_position_embeddings)[None]
    torch.save(state, out / "pytorch_model.bin")
    return out


def _legacy_clip_preprocessor(side: int) -> dict:
    """openai/clip-vit-large-patch14-336's preprocessor_config.json, at the tiny size."""
    return {
        "crop_size": side,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": side,
    }


def write_original_llava(
    tiny_dir: Path,
    out: Path,
    *,
    tower: str | None,
    shards: int = 2,
    weights: str = "safetensors",
    dtype: torch.dtype | None = None,
    tower_inside: bool = False,
    rotary_buffers: bool = False,
    config: dict | None = None,
) -> Path:
    """The tiny LLaVA at `tiny_dir` in the original format: `shards` weight files with an
    index ("safetensors" or "bin"), the language model and projector cast to `dtype` where
    given, the tower's tensors inside when `tower_inside`, rotary inv_freq buffers as
    checkpoints of transformers 4.31 saved them, `config` merged into config.json."""
    state = {}
    for name, tensor in tiny_tensors(tiny_dir).items():
        is_tower = name.startswith("vision_tower.")
        if is_tower and not tower_inside:
            continue
        state[original_name(name)] = tensor if is_tower or dtype is None else tensor.to(dtype)
    llava = json.loads((tiny_dir / "config.json").read_text())
    if rotary_buffers:
        head_dim = llava["text_config"]["head_dim"]
        for layer in range(llava["text_config"]["num_hidden_layers"]):
            state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.rand(head_dim // 2)
    out.mkdir(parents=True)
    _save_shards(state, out, shards, weights)
    (out / "config.json").write_text(json.dumps({**original_config(llava, tower, dtype), **(config or {})}))
    shutil.copyfile(tiny_dir / "generation_config.json", out / "generation_config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_dir / name, out / name)
    _strip_processor_fields(out / "tokenizer_config.json")
    return out


def original_config(llava: dict, tower: str | None, dtype: torch.dtype | None) -> dict:
    text = llava["text_config"]
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        **{field: text[field] for field in _LLAMA_FIELDS},
        "pretraining_tp": 1,
        "rope_scaling": None,
        "rope_theta": text["rope_parameters"]["rope_theta"],
        "torch_dtype": str(dtype or torch.float32).removeprefix("torch."),
        "transformers_version": "4.37.2",
        "use_cache": True,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": llava["vision_config"]["hidden_size"],
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": llava["vision_feature_layer"],
        "mm_vision_tower": tower,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": False,
        "use_mm_proj": True,
        "recap_tiny": True,
    }


def write_llama3_tokenizer(folder: Path, image_slot: str = RESERVED_IMAGE_SLOT) -> None:
    """Give the checkpoint a LLaMA-3-like tokenizer: the tiny model's vocabulary, with the
    image token's slot named `image_slot` (one of LLaMA-3's reserved tokens), and no
    image token."""
    from workers.tiny_model import train_tokenizer

    tokenizer = train_tokenizer(image_slot)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(folder)
    _strip_processor_fields(folder / "tokenizer_config.json")


def _strip_processor_fields(path: Path) -> None:
    """An original LLaVA's tokenizer knows nothing of images or processors."""
    config = json.loads(path.read_text())
    for key in ("image_token", "processor_class", "model_specific_special_tokens", "chat_template"):
        config.pop(key, None)
    if path.parent.joinpath("chat_template.jinja").exists():
        path.parent.joinpath("chat_template.jinja").unlink()
    path.write_text(json.dumps(config))


def _save_shards(state: dict[str, torch.Tensor], out: Path, shards: int, weights: str) -> None:
    names = sorted(state)
    size = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = {n: state[n].contiguous() for n in names[i * size : (i + 1) * size]}
        if weights == "bin":
            file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, out / file)
        else:
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = "pytorch_model.bin.index.json" if weights == "bin" else "model.safetensors.index.json"
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
