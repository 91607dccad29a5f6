"""What every engine does before its first caption: find the model's files and their
revision, pick device and dtype, load and repair the processor, find the end tokens, and
write the provenance every caption carries.

torch and transformers are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import recap
from recap.records import ImageSpec
from workers.prepare import pillow_build

if TYPE_CHECKING:
    import torch

# Llama-3 turn and text ends: without <|eot_id|> a chat model runs to max_new_tokens.
END_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
# Pad tokens Llama-3 checkpoints carry (Meta's tokenizer has none), in order of preference.
PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")
_COMMIT = re.compile(r"[0-9a-f]{40}")


# -- where the model comes from -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model's files: a local folder, or a hub id pinned to one commit."""

    location: str  # what from_pretrained reads: a folder path or a hub id
    load_revision: str | None  # the commit (or branch) to read; None for a folder
    is_local: bool

    @classmethod
    def of(cls, source: str | Path, revision: str | None = None) -> ModelSource:
        local = Path(source).expanduser()
        if local.is_dir():
            return cls(str(local), None, True)
        # One commit for processor and weights, even if the branch moves meanwhile.
        pinned = resolve_hub_revision(str(source), revision)
        return cls(str(source), pinned or revision, False)

    def recorded_revision(self) -> str | None:
        """The revision recorded with every caption (call it after loading: the hub's
        files are in the cache by then)."""
        if self.is_local:
            return local_revision(Path(self.location))
        return hub_commit(self.location, self.load_revision)


def resolve_hub_revision(repo: str, revision: str | None) -> str | None:
    """The commit a hub revision points to (from the local cache when offline), or None."""
    try:
        from transformers.utils.hub import resolve_revision

        resolved = resolve_revision(repo, revision)
    except Exception:
        return None
    return getattr(resolved, "resolved", None)


def hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit hash of the snapshot the model was loaded from."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:
        return None
    if isinstance(path, str):
        commit = Path(path).parent.name
        if _COMMIT.fullmatch(commit):
            return commit
    return None


def local_revision(path: Path) -> str:
    """A content hash of a local model folder (a hub snapshot folder: its commit).

    Small files are hashed whole; big weight files by name, size and their first and last
    MiB, so an 8B checkpoint is identified in milliseconds.
    """
    path = path.resolve()
    if path.parent.name == "snapshots" and _COMMIT.fullmatch(path.name):
        return path.name
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path)}\0{size}\0".encode())
        with open(file, "rb") as fh:
            if size <= 16 << 20:
                digest.update(fh.read())
            else:
                digest.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                digest.update(fh.read())
    return "sha256:" + digest.hexdigest()[:16]


# -- device and precision ---------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        # bf16 on GPUs (the checkpoints' own precision); fp32 on CPU, where bf16 is slow.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


# -- processor and tokens ------------------------------------------------------------------


def load_processor(source: ModelSource):
    """The model's processor, with left padding (repair it with `repair_processor`)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(source.location, revision=source.load_revision)
    # Batched generation needs left padding: right padding changes the tokens.
    processor.tokenizer.padding_side = "left"
    return processor


def repair_processor(processor, config) -> None:
    """Fill the LLaVA processor fields older checkpoints (xtuner's, 2024) lack.

    The image token count the processor writes must equal the vision features the model
    makes, or generate fails with "Image features and image tokens do not match".
    """
    if not hasattr(processor, "patch_size"):
        return  # not a LLaVA-style processor (Mllama uses cross-attention)
    vision = getattr(config, "vision_config", None)
    if processor.patch_size is None and vision is not None:
        processor.patch_size = vision.patch_size
    strategy = getattr(config, "vision_feature_select_strategy", None)
    if getattr(processor, "vision_feature_select_strategy", None) is None and strategy:
        processor.vision_feature_select_strategy = strategy
    has_cls = getattr(vision, "model_type", "") == "clip_vision_model"
    if has_cls and not getattr(processor, "num_additional_image_tokens", 0):
        processor.num_additional_image_tokens = 1  # CLIP's CLS token


def setup_tokens(tokenizer, config, generation_config) -> list[int]:
    """Set a pad token where missing; return every id that ends a caption."""
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pad = next((t for t in PAD_CANDIDATES if t in vocab), None)
        tokenizer.pad_token = pad or tokenizer.eos_token
    ends: list[int] = []
    for source in (
        tokenizer.eos_token_id,
        generation_config.eos_token_id,
        config.get_text_config().eos_token_id,
    ):
        ends.extend(source if isinstance(source, list) else [source] if source is not None else [])
    for token in END_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ends.append(token_id)
    return sorted(set(ends))


def special_token_pattern(processor) -> re.Pattern[str]:
    """Every control token the processor knows (to strip from prompts that carry alt text)."""
    tokenizer = processor.tokenizer
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials.update(tokenizer.all_special_tokens)
    image_token = getattr(processor, "image_token", None)
    if image_token:
        specials.add(image_token)
    specials.discard("")
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))


def image_spec(processor, family: str, mode: str) -> ImageSpec:
    """The square the prepare stage should make, or None where the processor tiles."""
    ip = processor.image_processor
    if family == "mllama":
        tile = ip.size["height"]
        canvas = tile * max(1, int(ip.max_image_tiles**0.5))
        return ImageSpec(size=canvas if mode == "pad" else None, mode=mode)
    pinpoints = getattr(ip, "image_grid_pinpoints", None)
    if pinpoints:
        # LLaVA-NeXT "anyres": pad mode gives the largest square grid; crop lets it choose.
        square = max(min(h, w) for h, w in pinpoints)
        return ImageSpec(size=square if mode == "pad" else None, mode=mode)
    crop = getattr(ip, "crop_size", None)
    if getattr(ip, "do_center_crop", False) and crop:
        return ImageSpec(size=int(crop["height"]), mode=mode)
    size = ip.size
    side = size.get("shortest_edge") or size.get("height")
    return ImageSpec(size=int(side), mode=mode)


# -- provenance -----------------------------------------------------------------------------


def converted_from(config) -> dict:
    """Where a model `recap convert` made came from (its config's `recap_source`): the
    original checkpoint and its revision, the vision tower. Nothing for other models, so
    their provenance rows stay what they were."""
    source = getattr(config, "recap_source", None)
    return {"converted_from": source} if source else {}


def common_provenance(
    *, model_id: str, revision: str | None, family: str, dtype: str, device: str, is_tiny: bool
) -> dict:
    """The provenance fields every engine records (each adds its engine and version)."""
    import torch  # loaded by then: the engine that asks has imported it

    return {
        "model": model_id,
        "revision": revision,
        "family": family,
        "dtype": dtype.removeprefix("torch."),
        "device": device,  # the type, not the index: cuda:0 and cuda:3 make the same captions
        "torch_version": torch.__version__.split("+")[0],
        "is_tiny": is_tiny,
        "image_library": pillow_build(),  # Pillow-SIMD resizes a little differently
        "recap_version": recap.__version__,
    }
