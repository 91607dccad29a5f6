"""An original-format LLaVA-LLaMA checkpoint (workers/convert/original.py) into a transformers
`LlavaForConditionalGeneration` folder in the hub's key layout (`language_model.model.*`,
`language_model.lm_head.*`, `multi_modal_projector.*`, `vision_tower.vision_model.*`), which
the transformers and vLLM engines both load, with its processor (workers/convert/processor.py).

Every tensor is copied as it is (values, shape and dtype); only names change. The tower's
weights come from the checkpoint where it carries them (LLaVA saves them when it trained
them), else from the tower named by `mm_vision_tower` or `--vision-tower`, which gives the
vision config and image processor in any case. The new folder's config.json records where
it came from (`recap_source`). It is written beside DST and renamed into place: a failed
conversion leaves nothing behind.

torch and transformers are imported inside functions: the refusals that need only the
configs come first, before paying for them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import recap
from recap.errors import RecapError, describe
from workers.convert.checkpoint import (
    SHARD_BYTES,
    Copy,
    Located,
    TensorReader,
    fetch_weights,
    locate,
    write_checkpoint,
)
from workers.convert.original import TOWER_PREFIX, OriginalLlava, hub_name, tower_hub_name
from workers.convert.processor import (
    ImageToken,
    image_processor,
    image_token,
    llava_processor,
    load_tokenizer,
)

SOURCE_FORMAT = "llava-original"
EMBEDDINGS = "model.embed_tokens.weight"
LM_HEAD = "language_model.lm_head.weight"
CLIP_TYPES = ("clip", "clip_vision_model")


@dataclass(frozen=True, slots=True)
class Converted:
    """What a conversion made, for the command's summary."""

    out: Path
    source: Located
    tower: Located
    tower_weights: str  # "checkpoint" or "vision tower": where the tower's tensors came from
    tensors: int
    image_token: ImageToken
    image_features: int  # image tokens per image
    aspect_ratio: str


def convert_llava(
    src: str,
    out: Path,
    *,
    vision_tower: str | None = None,
    revision: str | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Converted:
    """Convert `src` (a folder or hub id) into the new folder `out`; RecapError (one line)
    for what cannot be converted."""
    out = _check_out(Path(out))
    source = locate(src, "checkpoint", revision)
    original = OriginalLlava.read(source.path, src)
    tower_name = vision_tower or original.vision_tower
    if not tower_name:
        raise RecapError(f"{src} names no vision tower (mm_vision_tower): pass --vision-tower")
    tower = locate(tower_name, "vision tower")
    _check_tower(tower, original)
    # The checks that need no weights are done: from here on, tensors and transformers.
    fetch_weights(source, "checkpoint")
    checkpoint = TensorReader(source.path, f"checkpoint {src}")
    copies, tower_weights = _plan(checkpoint, tower)
    if EMBEDDINGS not in checkpoint.names:
        raise RecapError(f"checkpoint {src} is missing its token embedding ({EMBEDDINGS})")
    vision = _vision_config(tower)
    tokenizer = load_tokenizer(source.path, f"checkpoint {src}")
    token = image_token(tokenizer, checkpoint.shape(EMBEDDINGS)[0])
    record = {
        "format": SOURCE_FORMAT,
        "source": _where(source),
        "revision": source.revision,
        "vision_tower": _where(tower),
        "vision_tower_revision": tower.revision,
        "vision_tower_weights": tower_weights,
        "image_token": token.how,
        "image_aspect_ratio": original.aspect_ratio,
        "converted_by": f"recap {recap.__version__}",
    }
    config = _llava_config(original, vision, token, record)
    _check_tensors(copies, config)
    processor = llava_processor(
        tokenizer, image_processor(tower.path, vision), vision, original.select_strategy, token
    )
    _write(out, copies, config, processor, source, shard_bytes)
    return Converted(
        out, source, tower, tower_weights, len(copies), token, config.image_seq_length, original.aspect_ratio
    )


def _where(located: Located) -> str:
    """A hub id as it is; a folder as an absolute path (a relative one says nothing later)."""
    return str(located.path) if located.is_local else located.name


def _check_out(out: Path) -> Path:
    out = out.expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise RecapError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise RecapError(f"--out {out} exists and is not empty")
    return out


def _tower_config(tower: Located) -> dict:
    path = tower.path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RecapError(
            f"vision tower {tower.name}: cannot read config.json: {describe(error, 200)}"
        ) from None
    if raw.get("model_type") not in CLIP_TYPES:
        raise RecapError(
            f"vision tower {tower.name} is a {raw.get('model_type')!r} model: LLaVA's tower is a CLIP model"
        )
    return raw


def _check_tower(tower: Located, original: OriginalLlava) -> None:
    """The tower's width must be the projector's input (a wrong --vision-tower shows here)."""
    raw = _tower_config(tower)
    vision = (raw.get("vision_config") or {}) if raw["model_type"] == "clip" else raw
    width = vision.get("hidden_size", 768)  # CLIPVisionConfig's default
    if original.mm_hidden_size is not None and width != original.mm_hidden_size:
        raise RecapError(
            f"vision tower {tower.name} is {width} wide but the checkpoint's projector takes "
            f"{original.mm_hidden_size} (mm_hidden_size): another tower?"
        )


def _vision_config(tower: Located):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tower.path)
    return config.vision_config if config.model_type == "clip" else config


def _plan(checkpoint: TensorReader, tower: Located) -> tuple[list[Copy], str]:
    """Every tensor to write, by its hub name; the tower's from the checkpoint where it has them."""
    copies = [Copy(name, checkpoint, key) for key in checkpoint.names if (name := hub_name(key)) is not None]
    if any(key.startswith(TOWER_PREFIX) for key in checkpoint.names):
        return copies, "checkpoint"
    fetch_weights(tower, "vision tower")
    reader = TensorReader(tower.path, f"vision tower {tower.name}")
    copies += [Copy(name, reader, key) for key in reader.names if (name := tower_hub_name(key)) is not None]
    return copies, "vision tower"


def _llava_config(original: OriginalLlava, vision, token: ImageToken, record: dict):
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig.from_dict(original.text_config)
    features = (vision.image_size // vision.patch_size) ** 2 + (original.select_strategy == "full")
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=token.id,
        projector_hidden_act="gelu",  # mlp2x_gelu: nn.GELU(), the exact GELU
        multimodal_projector_bias=True,
        vision_feature_select_strategy=original.select_strategy,
        vision_feature_layer=original.select_layer,
        image_seq_length=features,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    config.architectures = ["LlavaForConditionalGeneration"]  # vLLM picks its class by it
    if original.dtype:
        config.dtype = original.dtype
    config.recap_source = record
    if original.is_tiny:
        config.recap_tiny = True  # a tiny model says so wherever it is loaded from
    return config


def _check_tensors(copies: list[Copy], config) -> None:
    """The tensors must be exactly those of a LLaVA of this config, shape for shape."""
    expected = _expected_shapes(config)
    got = {copy.name: copy for copy in copies}
    if config.tie_word_embeddings and LM_HEAD not in got:
        expected.pop(LM_HEAD, None)  # tied: read from the embedding
    missing = sorted(expected.keys() - got.keys())
    if missing:
        raise RecapError(f"missing tensors ({len(missing)}): {_some(missing)}")
    extra = sorted(f"{got[n].key} ({got[n].reader.label})" for n in got.keys() - expected.keys())
    if extra:
        raise RecapError(f"tensors transformers' LLaVA has no place for ({len(extra)}): {_some(extra)}")
    for name, copy in got.items():
        shape = copy.reader.shape(copy.key)
        if shape != expected[name]:
            raise RecapError(
                f"{copy.key} ({copy.reader.label}) has shape {list(shape)}, the configs say "
                f"{list(expected[name])}: a config that does not match its weights, or another tower?"
            )


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Each tensor's hub name and shape, from a LLaVA of `config` built on the meta device."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):  # no memory, no initialisation: names and shapes only
        model = LlavaForConditionalGeneration(config)
    parts = {
        "language_model.model.": model.model.language_model,
        "language_model.lm_head.": model.lm_head,
        "multi_modal_projector.": model.model.multi_modal_projector,
        "vision_tower.vision_model.": model.model.vision_tower,
    }
    return {
        prefix + key.removeprefix("vision_model."): tuple(tensor.shape)
        for prefix, module in parts.items()
        for key, tensor in module.state_dict().items()
    }


def _write(out: Path, copies: list[Copy], config, processor, source: Located, shard_bytes: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    need = sum(copy.nbytes for copy in copies)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise RecapError(f"{out.parent} has {free / 2**30:.1f} GiB free; the model needs {need / 2**30:.1f}")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        write_checkpoint(staging, copies, shard_bytes)
        config.save_pretrained(staging)
        processor.save_pretrained(staging)
        if (source.path / "generation_config.json").is_file():
            shutil.copyfile(source.path / "generation_config.json", staging / "generation_config.json")
        try:
            os.rename(staging, out)  # replaces an empty folder; refuses a filled one
        except OSError as error:
            raise RecapError(f"cannot move the converted model to {out}: {describe(error, 200)}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
