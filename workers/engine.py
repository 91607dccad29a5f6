"""Caption engines: the interface the pipeline uses, and the transformers implementation.

Importing this module is cheap: torch and transformers are imported when an engine is
built, so the pipeline can name `CaptionEngine` without paying 5-7 s of imports.

The transformers engine batches images through the model's own chat template with left
padding, generates greedily (by default) up to `max_new_tokens`, and decodes only the new
tokens. A batch that runs out of GPU memory is halved and retried, and the size that fits
is remembered; an item that fails on its own is isolated by bisecting its batch and gets
an `inference_error` caption while its neighbours are captioned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from recap.errors import ErrorClass, Failure
from recap.records import Caption, ImageSpec

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from recap.settings import Settings

log = logging.getLogger(__name__)

ENGINE_NAME = "transformers"
TINY_MODELS = {
    "tiny": "llava",
    "tiny-llava": "llava",
    "tiny-llava-next": "llava-next",
    "tiny-mllama": "mllama",
}
TINY_WARNING = "model {model!r} is a tiny random-weight test model: its captions are meaningless"
# Llama-3 turn and text ends: without <|eot_id|> a chat model runs to max_new_tokens.
END_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
# Pad tokens Llama-3 checkpoints carry (Meta's tokenizer has none), in order of preference.
PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")
# Messages of errors that mean the GPU (not the item) is broken: no item is to blame.
_FATAL_MARKERS = (
    "CUDA error",
    "device-side assert",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "illegal memory access",
)
_OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")
COMPILE_PAD_MULTIPLE = 64  # RECAP_COMPILE: prompts padded to a multiple of this many tokens

FaultInjector = Callable[[int, list], None]
"""Test hook called before each forward with the batch size and the batch's images; it
may raise to simulate a failure."""


class EngineFatalError(RuntimeError):
    """The device is unusable (e.g. a CUDA error): stop the worker, blame no item."""


class CaptionEngine(Protocol):
    """What the pipeline needs from an engine."""

    model_id: str
    revision: str | None
    image_spec: ImageSpec
    default_batch_size: int
    provenance: dict
    is_tiny: bool

    def caption(
        self, images: list[Image], prompts: list[str], generation: dict | None = None
    ) -> list[Caption]:
        """Exactly one Caption per image, in order; `generation` is the job's recorded
        generation settings (None: the worker's own).

        A bad item gets a Caption with finish_reason "error" and its Failure; the call
        raises only when the device itself is unusable (EngineFatalError).
        """
        ...

    def image_spec_for(self, image_mode: str) -> ImageSpec:
        """What images must look like for a job of that image mode (pad or crop)."""
        ...


Span = tuple[int, ...]  # indices into the caller's lists


@dataclass(frozen=True, slots=True)
class _Failed:
    """How a batch failed, without the exception (whose traceback pins GPU memory)."""

    oom: bool
    message: str

    def caption(self) -> Caption:
        failure = Failure.of(ErrorClass.INFERENCE_ERROR, self.message)
        return Caption(text="", n_tokens=0, finish_reason="error", failure=failure)


def is_oom(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MARKERS)


def _is_fatal(error: BaseException) -> bool:
    return (
        isinstance(error, RuntimeError) and not is_oom(error) and any(m in str(error) for m in _FATAL_MARKERS)
    )


class TransformersEngine:
    """`AutoProcessor` + `AutoModelForImageTextToText`, batched greedy generation."""

    def __init__(
        self,
        source: str | Path,
        settings: Settings,
        *,
        model_id: str | None = None,
        revision: str | None = None,
        is_tiny: bool = False,
        fault_injector: FaultInjector | None = None,
    ) -> None:
        """Load `source` (a local folder or a hub id at `revision`) onto settings' device."""
        device = _resolve_device(settings.device)
        dtype = _resolve_dtype(settings.dtype, device)
        local = Path(source).expanduser()
        is_local = local.is_dir()
        load_from = str(local) if is_local else str(source)
        # One commit for processor and weights, even if the branch moves meanwhile.
        pinned = None if is_local else _resolve_hub_revision(load_from, revision)
        processor = _load_processor(load_from, pinned or revision)
        model = _load_model(load_from, pinned or revision, dtype, device)
        resolved = _local_revision(local) if is_local else _hub_commit(load_from, pinned or revision)
        self._setup(model, processor, settings, model_id or str(source), resolved, is_tiny, fault_injector)

    @classmethod
    def from_loaded(
        cls,
        model,
        processor,
        settings: Settings,
        *,
        model_id: str,
        is_tiny: bool = False,
    ) -> TransformersEngine:
        """An engine over a model and processor already in memory (the benchmark)."""
        processor.tokenizer.padding_side = "left"
        engine = cls.__new__(cls)
        engine._setup(model.eval(), processor, settings, model_id, None, is_tiny, None)
        return engine

    def _setup(self, model, processor, settings, model_id, revision, is_tiny, fault_injector) -> None:
        import torch
        import transformers

        import recap
        from workers.prepare import pillow_build

        self.settings = settings
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.model_id, self.revision = model_id, revision
        self.device, self.dtype = model.device, model.dtype
        self.family = str(model.config.model_type)
        # A tiny model says so in its config, whoever loads it and from wherever.
        self.is_tiny = is_tiny or bool(getattr(model.config, "recap_tiny", False))
        self._inject = fault_injector
        _repair_processor(processor, model.config)
        self._end_ids = _setup_tokens(self.tokenizer, model)
        self._end_ids_cpu = torch.tensor(self._end_ids, dtype=torch.long)
        self._strip_specials = _special_token_pattern(processor)
        self.generation_config = _generation_config(
            model, settings, self._end_ids, self.tokenizer.pad_token_id
        )
        # Compiled: prompt lengths rounded up, so a few shapes (compilations) cover them all.
        self._padding = {
            "padding": True,
            **({"pad_to_multiple_of": COMPILE_PAD_MULTIPLE} if settings.compile else {}),
        }
        self._configs = {None: self.generation_config}
        self.image_spec = _image_spec(processor, self.family, settings.image_mode)
        self.default_batch_size = settings.batch_size or _default_batch_size(
            self.family, self.device, self.is_tiny
        )
        self.max_fit = self.default_batch_size  # shrinks on OOM: the size that fits
        self.provenance = {
            "model": model_id,
            "revision": revision,
            "family": self.family,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,  # not the index: cuda:0 and cuda:3 make the same captions
            "engine": ENGINE_NAME,
            "engine_version": transformers.__version__,
            "torch_version": torch.__version__.split("+")[0],
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "is_tiny": self.is_tiny,
            "compiled": settings.compile and self.device.type == "cuda",  # CPU: static cache only
            "image_library": pillow_build(),  # Pillow-SIMD resizes a little differently
            "recap_version": recap.__version__,
        }
        if self.device.type == "cuda":
            self.provenance["gpu"] = torch.cuda.get_device_name(self.device)
        if self.is_tiny:
            log.warning(TINY_WARNING.format(model=model_id))
        if settings.compile and self.device.type != "cuda":
            log.info("RECAP_COMPILE on %s: static KV cache only; transformers compiles on GPUs", self.device)

    # -- the hot path ---------------------------------------------------------------

    def image_spec_for(self, image_mode: str) -> ImageSpec:
        """What images must look like for a job of that image mode."""
        return _image_spec(self.processor, self.family, image_mode)

    def _config_for(self, generation: dict | None):
        """The generation config of a job's recorded settings (cached per distinct value):
        a job owns its generation settings, whatever this worker's RECAP_* say."""
        key = None if not generation else json.dumps(generation, sort_keys=True)
        if key not in self._configs:
            fields = ("max_new_tokens", "do_sample", "temperature", "top_p", "repetition_penalty")
            update = {f: generation[f] for f in fields if generation.get(f) is not None}
            settings = self.settings.model_copy(update=update)
            self._configs[key] = _generation_config(
                self.model, settings, self._end_ids, self.tokenizer.pad_token_id
            )
        return self._configs[key]

    def caption(
        self, images: list[Image], prompts: list[str], generation: dict | None = None
    ) -> list[Caption]:
        """One caption per image; `generation` is the job's recorded generation settings.
        Not to be called from two threads at once (the pipeline holds a lock)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        self.generation_config = self._config_for(generation)
        results: list[Caption | None] = [None] * len(images)
        self._caption_span(tuple(range(len(images))), images, prompts, results)
        return results  # type: ignore[return-value]

    def _caption_span(self, span: Span, images: list, prompts: list[str], out: list) -> None:
        """Caption `span` in batches of the size that fits.

        Out of memory: the size halves and the same items go again. Any other failure:
        the batch is bisected until the item that fails alone is found.
        """
        pos = 0
        while pos < len(span):
            batch = span[pos : pos + self.max_fit]
            failed = self._try(batch, images, prompts, out)
            if failed is None:
                pos += len(batch)
            elif len(batch) == 1:
                log.warning("item %d failed alone: %s", batch[0], failed.message)
                out[batch[0]] = failed.caption()
                pos += 1
            elif failed.oom:
                self.max_fit = min(self.max_fit, (len(batch) + 1) // 2)
                log.warning("out of memory at batch size %d; now %d", len(batch), self.max_fit)
            else:
                log.info("batch of %d failed (%s); bisecting to find the item", len(batch), failed.message)
                mid = len(batch) // 2
                self._caption_span(batch[:mid], images, prompts, out)
                self._caption_span(batch[mid:], images, prompts, out)
                pos += len(batch)

    def _try(self, batch: Span, images: list, prompts: list[str], out: list) -> _Failed | None:
        """Run one batch into `out`, or say how it failed.

        Only a summary of the error leaves this frame: the exception's traceback holds the
        batch's GPU tensors, which must be freed before a retry.
        """
        batch_images = [images[i] for i in batch]
        failed = None
        try:
            started = time.perf_counter()
            inputs = self._encode(batch_images, [prompts[i] for i in batch])
            if self._inject is not None:
                self._inject(len(batch), batch_images)
            new_tokens = self._generate(inputs)
            captions = self._decode(new_tokens, time.perf_counter() - started)
        except Exception as error:
            if _is_fatal(error):
                raise EngineFatalError(_one_line(error)) from error
            failed = _Failed(oom=is_oom(error), message=_one_line(error))
        if failed is not None:
            inputs = new_tokens = None  # drop the batch's tensors before freeing the cache
            if failed.oom and self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
            return failed
        for i, caption in zip(batch, captions):
            out[i] = caption
        return None

    def _encode(self, images: list, prompts: list[str]) -> dict:
        conversations = [
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": im}, {"type": "text", "text": self._clean(p)}],
                }
            ]
            for im, p in zip(images, prompts)
        ]
        batch = self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs=self._padding,
        )
        return self._to_device(batch)

    def _clean(self, prompt: str) -> str:
        # Prompts carry web alt text: a literal "<image>" or "<|eot_id|>" in it must not
        # become a control token (an image-token count mismatch fails the whole batch).
        return self._strip_specials.sub("", prompt) if "<" in prompt else prompt

    def _to_device(self, batch) -> dict:
        """Floats to the model dtype on the host (half the bytes), then pinned async copies."""
        import torch

        cuda = self.device.type == "cuda"
        moved = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                if value.is_floating_point():
                    value = value.to(self.dtype)
                if cuda:
                    value = value.pin_memory().to(self.device, non_blocking=True)
                elif value.device != self.device:
                    value = value.to(self.device)
            moved[key] = value
        return moved

    def _generate(self, inputs: dict):
        import torch

        prompt_len = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=self.generation_config)
        return output[:, prompt_len:].cpu()

    def _decode(self, new_tokens, seconds: float) -> list[Caption]:
        """Cut each row at its first end token; the rest is padding."""
        import torch

        is_end = torch.isin(new_tokens, self._end_ids_cpu)
        stopped = is_end.any(dim=1)
        lengths = torch.where(stopped, is_end.int().argmax(dim=1), new_tokens.shape[1])
        rows = [row[:n] for row, n in zip(new_tokens.tolist(), lengths.tolist())]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        per_item_ms = seconds * 1000.0 / max(1, len(rows))  # the batch's time, shared
        return [
            Caption(
                text=_tidy(text),
                n_tokens=n,
                finish_reason="stop" if stop else "length",
                infer_ms=per_item_ms,
            )
            for text, n, stop in zip(texts, lengths.tolist(), stopped.tolist())
        ]


# -- loading ------------------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        # bf16 on GPUs (the checkpoints' own precision); fp32 on CPU, where bf16 is slow.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _load_processor(source: str, revision: str | None):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(source, revision=revision)
    # Batched generation needs left padding: right padding changes the tokens.
    processor.tokenizer.padding_side = "left"
    return processor


def _load_model(source: str, revision: str | None, dtype, device):
    from transformers import AutoModelForImageTextToText
    from transformers.utils import is_accelerate_available

    kwargs: dict[str, Any] = {"revision": revision, "dtype": dtype}
    if device.type == "cuda" and is_accelerate_available():
        # Straight from the safetensors onto the GPU; without accelerate transformers
        # refuses a device_map, and the weights take a detour through host memory.
        kwargs["device_map"] = str(device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as error:  # a class without SDPA support
        log.warning("SDPA attention unavailable (%s); using the default", _one_line(error))
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    if model.device != device:
        model = model.to(device)
    return model.eval()


def _resolve_hub_revision(repo: str, revision: str | None):
    """The commit a hub revision points to (from the local cache when offline), or None."""
    try:
        from transformers.utils.hub import resolve_revision

        resolved = resolve_revision(repo, revision)
    except Exception:
        return None
    return getattr(resolved, "resolved", None)


def _hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit hash of the snapshot the model was loaded from."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:
        return None
    if isinstance(path, str):
        commit = Path(path).parent.name
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            return commit
    return None


def _local_revision(path: Path) -> str:
    """A content hash of a local model folder (a hub snapshot folder: its commit).

    Small files are hashed whole; big weight files by name, size and their first and last
    MiB, so an 8B checkpoint is identified in milliseconds.
    """
    path = path.resolve()
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
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


def _repair_processor(processor, config) -> None:
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


def _setup_tokens(tokenizer, model) -> list[int]:
    """Set a pad token where missing; return every id that ends a caption."""
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pad = next((t for t in PAD_CANDIDATES if t in vocab), None)
        tokenizer.pad_token = pad or tokenizer.eos_token
    ends: list[int] = []
    for source in (
        tokenizer.eos_token_id,
        model.generation_config.eos_token_id,
        model.config.get_text_config().eos_token_id,
    ):
        ends.extend(source if isinstance(source, list) else [source] if source is not None else [])
    for token in END_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ends.append(token_id)
    return sorted(set(ends))


def _special_token_pattern(processor) -> re.Pattern[str]:
    tokenizer = processor.tokenizer
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials.update(tokenizer.all_special_tokens)
    image_token = getattr(processor, "image_token", None)
    if image_token:
        specials.add(image_token)
    specials.discard("")
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))


def _generation_config(model, settings: Settings, end_ids: list[int], pad_id: int | None):
    import copy

    config = copy.deepcopy(model.generation_config)
    sampling = settings.do_sample
    config.update(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sampling,
        # Neutral values when greedy: a checkpoint's sampling defaults would only warn.
        temperature=settings.temperature if sampling else 1.0,
        top_p=settings.top_p if sampling else 1.0,
        top_k=None if not sampling else config.top_k,
        repetition_penalty=settings.repetition_penalty,
        eos_token_id=end_ids,
        pad_token_id=pad_id,
        num_beams=1,
    )
    config.max_length = None  # max_new_tokens rules
    if settings.compile:
        from transformers import CompileConfig

        # A fixed-size KV cache makes the decoding step's shapes static, so transformers
        # compiles it (CUDA graphs: "reduce-overhead") instead of running it op by op.
        config.cache_implementation = "static"
        config.compile_config = CompileConfig()
    return config


def _image_spec(processor, family: str, mode: str) -> ImageSpec:
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


def _default_batch_size(family: str, device, is_tiny: bool) -> int:
    """A starting point; OOM halving finds what actually fits."""
    if is_tiny:
        return 8
    if device.type != "cuda":
        return 2
    import torch

    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    base = {"llava": 64, "llava_next": 16, "mllama": 16}.get(family, 16)
    return base if gib >= 70 else max(1, base // 4)


# -- small helpers -------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def _tidy(text: str) -> str:
    # PostgreSQL text cannot hold NUL; models (and tiny ones) can emit it.
    return text.replace("\x00", "").strip()


# -- the one entry point ----------------------------------------------------------------


def tiny_family(model: str) -> str | None:
    """The tiny model family a model name means, or None (see TINY_MODELS)."""
    return TINY_MODELS.get(model)


def load_engine(settings: Settings, model: str | None = None) -> CaptionEngine:
    """The engine for `model` (default `settings.model`).

    "tiny" (or "tiny-llava", "tiny-llava-next", "tiny-mllama") is a tiny random model built
    into `settings.cache_dir` on first use; a local directory is loaded as it is; anything
    else is a hub id loaded at `settings.model_revision`. A tiny model says so in its
    config (`recap_tiny`), wherever it is loaded from.
    """
    from transformers.utils import logging as hf_logging

    from workers.tiny_model import ensure_tiny_model

    hf_logging.disable_progress_bar()  # recap draws its own; tqdm bars garble worker logs
    name = model or settings.model
    family = tiny_family(name)
    if family is not None:
        path = ensure_tiny_model(settings.cache_dir, family)  # type: ignore[arg-type]
        return TransformersEngine(path, settings, model_id=name)
    local = Path(name).expanduser()
    if local.is_dir():
        return TransformersEngine(local, settings, model_id=name)
    return TransformersEngine(name, settings, model_id=name, revision=settings.model_revision)


__all__ = [
    "TINY_MODELS",
    "CaptionEngine",
    "EngineFatalError",
    "TransformersEngine",
    "is_oom",
    "load_engine",
    "tiny_family",
]
