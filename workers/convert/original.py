"""The original LLaVA repository's checkpoint format (haotian-liu/LLaVA, in which the paper's
captioner `tennant/llava-llama-3-8b-hqedit` is published): what its config.json says, what
its tensors are called in the hub layout of transformers' LLaVA, and what recap refuses to
convert. JSON and names only: no torch here, so a refusal answers at once.

Original names: `model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head` (the
LLaMA language model), `model.mm_projector.0` and `.2` (the `mlp2x_gelu` projector) and,
where the checkpoint carries its CLIP tower, `model.vision_tower.vision_tower.*`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from recap.errors import RecapError, describe

LLAVA_LLAMA = "llava_llama"
PROJECTOR = "mlp2x_gelu"  # Linear, GELU, Linear: transformers' LlavaMultiModalProjector
# mm_vision_select_feature -> vision_feature_select_strategy ("patch" drops CLIP's CLS token)
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}
ASPECT_RATIOS = ("pad", "square")  # "anyres" is LLaVA-NeXT's tiling

TOWER_PREFIX = "model.vision_tower.vision_tower."
_PROJECTOR_NAMES = {
    "model.mm_projector.0.": "multi_modal_projector.linear_1.",
    "model.mm_projector.2.": "multi_modal_projector.linear_2.",
}
# A CLIP checkpoint's text half and projections: LLaVA uses the vision half only.
_CLIP_NOT_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
# Buffers old checkpoints saved that transformers computes itself.
DERIVED_BUFFERS = ("embeddings.position_ids", "rotary_emb.inv_freq")

# Config fields of LLaVA's, not of the language model (kept out of text_config).
_LLAVA_ONLY_PREFIXES = ("mm_", "tune_", "freeze_", "unfreeze_", "tokenizer_", "image_", "s2")
_LLAVA_ONLY_KEYS = frozenset(
    {
        "architectures",
        "_name_or_path",
        "model_type",
        "transformers_version",
        "use_mm_proj",
        "vision_tower",
        "recap_tiny",
    }
)


@dataclass(frozen=True, slots=True)
class OriginalLlava:
    """An original-format LLaVA-LLaMA checkpoint's config, checked for conversion."""

    text_config: dict  # the LLaMA language model's own fields
    vision_tower: str | None  # mm_vision_tower: a hub id or a folder, loaded apart
    select_layer: int  # mm_vision_select_layer
    select_strategy: str  # transformers' name for mm_vision_select_feature
    aspect_ratio: str  # image_aspect_ratio
    mm_hidden_size: int | None
    dtype: str | None
    is_tiny: bool  # recap's tiny models say so wherever they go

    @classmethod
    def read(cls, folder: Path, name: str) -> OriginalLlava:
        raw = _config(folder, name)
        _check_format(raw, name)
        feature = raw.get("mm_vision_select_feature", "patch")
        if feature not in SELECT_STRATEGY:
            raise RecapError(f"{name}: unknown mm_vision_select_feature {feature!r}: use patch or cls_patch")
        aspect = raw.get("image_aspect_ratio") or "square"  # LLaVA's default
        if aspect not in ASPECT_RATIOS:
            raise RecapError(
                f"{name}: image_aspect_ratio {aspect!r} is LLaVA-NeXT's tiling: only pad and square convert"
            )
        text = {
            k: v
            for k, v in raw.items()
            if k not in _LLAVA_ONLY_KEYS and not k.startswith(_LLAVA_ONLY_PREFIXES)
        }
        return cls(
            text_config=text,
            vision_tower=raw.get("mm_vision_tower") or raw.get("vision_tower"),
            select_layer=int(raw.get("mm_vision_select_layer", -1)),  # LLaVA's default
            select_strategy=SELECT_STRATEGY[feature],
            aspect_ratio=aspect,
            mm_hidden_size=raw.get("mm_hidden_size"),
            dtype=raw.get("torch_dtype") or raw.get("dtype"),
            is_tiny=bool(raw.get("recap_tiny")),
        )


def _config(folder: Path, name: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise RecapError(f"{name} has no config.json: not a LLaVA checkpoint")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RecapError(f"{name}: cannot read config.json: {describe(error, 200)}") from None


def _check_format(raw: dict, name: str) -> None:
    """Refuse, in one line, what transformers' LLaVA cannot hold."""
    model_type = raw.get("model_type")
    if model_type == "llava":
        raise RecapError(f"{name} is already a transformers LLaVA checkpoint: pass it to --model as it is")
    if model_type != LLAVA_LLAMA:
        if isinstance(model_type, str) and model_type.startswith("llava"):
            raise RecapError(
                f"{name}: the language model of a {model_type} checkpoint is not LLaMA; "
                f"only {LLAVA_LLAMA} converts"
            )
        raise RecapError(f"{name} is not an original LLaVA checkpoint (model type {model_type!r})")
    projector = raw.get("mm_projector_type", "linear")  # LLaVA's default
    if projector != PROJECTOR:
        raise RecapError(f"{name}: unknown projector type {projector!r}: only {PROJECTOR} converts")
    if raw.get("mm_use_im_start_end"):
        raise RecapError(
            f"{name} wraps images in <im_start>/<im_end> tokens, which transformers' LLaVA lacks"
        )
    if raw.get("mm_patch_merge_type", "flat") != "flat":
        raise RecapError(f"{name}: mm_patch_merge_type {raw['mm_patch_merge_type']!r} is LLaVA-NeXT's")


def hub_name(key: str) -> str | None:
    """The hub-layout name (transformers' LLaVA) of a tensor of the LLaVA checkpoint; None
    for a buffer transformers computes; RecapError for a tensor it has no place for."""
    if key.endswith(DERIVED_BUFFERS):
        return None
    if key.startswith(TOWER_PREFIX):
        return tower_hub_name(key.removeprefix(TOWER_PREFIX))
    for old, new in _PROJECTOR_NAMES.items():
        if key.startswith(old):
            return new + key.removeprefix(old)
    if key.startswith("lm_head.") or (key.startswith("model.") and not key.startswith("model.mm_projector.")):
        return "language_model." + key
    raise RecapError(f"the checkpoint has a tensor transformers' LLaVA has no place for: {key}")


def tower_hub_name(key: str) -> str | None:
    """The hub-layout name of a CLIP tower tensor (`vision_model.*` as CLIPModel and older
    CLIPVisionModel checkpoints have it, or bare as transformers 5 saves CLIPVisionModel);
    None for what the LLaVA does not use (the text half, the projections) and buffers."""
    if key.startswith(_CLIP_NOT_VISION) or key.endswith(DERIVED_BUFFERS):
        return None
    return "vision_tower.vision_model." + key.removeprefix("vision_model.")
