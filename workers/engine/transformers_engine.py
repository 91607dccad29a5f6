"""The transformers engine: `AutoProcessor` + `AutoModelForImageTextToText`, batched `generate`.

It batches images through the model's own chat template with left padding, generates
greedily (by default) up to `max_new_tokens`, and decodes only the new tokens. A batch that
runs out of GPU memory is halved and retried, and the size that fits is remembered; an item
that fails on its own is isolated by bisecting its batch and gets an `inference_error`
caption while its neighbours are captioned.

torch and transformers are imported when an engine is built, not with this module.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recap.errors import describe
from recap.generation import GenerationSettings
from recap.models import TINY_WARNING
from recap.records import Caption, ImageSpec
from workers.engine.failures import is_fatal, is_oom
from workers.engine.loading import (
    ModelSource,
    common_provenance,
    converted_from,
    image_spec,
    load_processor,
    repair_processor,
    resolve_device,
    resolve_dtype,
    setup_tokens,
    special_token_pattern,
)
from workers.engine.protocol import EngineFatalError, FaultInjector, failed_caption, tidy

if TYPE_CHECKING:
    from PIL.Image import Image

    from recap.settings import Settings

log = logging.getLogger(__name__)

ENGINE_NAME = "transformers"
COMPILE_PAD_MULTIPLE = 64  # RECAP_COMPILE: prompts padded to a multiple of this many tokens

Span = tuple[int, ...]  # indices into the caller's lists


@dataclass(frozen=True, slots=True)
class _Failed:
    """How a batch failed, without the exception (whose traceback pins GPU memory)."""

    oom: bool
    message: str


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
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        located = ModelSource.of(source, revision)
        processor = load_processor(located)
        model = _load_model(located, dtype, device)
        recorded = located.recorded_revision()
        self._setup(model, processor, settings, model_id or str(source), recorded, is_tiny, fault_injector)

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

        self.settings = settings
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.model_id, self.revision = model_id, revision
        self.device, self.dtype = model.device, model.dtype
        self.family = str(model.config.model_type)
        # A tiny model says so in its config, whoever loads it and from wherever.
        self.is_tiny = is_tiny or bool(getattr(model.config, "recap_tiny", False))
        self._inject = fault_injector
        repair_processor(processor, model.config)
        self._end_ids = setup_tokens(self.tokenizer, model.config, model.generation_config)
        self._end_ids_cpu = torch.tensor(self._end_ids, dtype=torch.long)
        self._strip_specials = special_token_pattern(processor)
        self.generation_config = _generation_config(
            model, settings.generation(), settings.compile, self._end_ids, self.tokenizer.pad_token_id
        )
        # Compiled: prompt lengths rounded up, so a few shapes (compilations) cover them all.
        self._padding = {
            "padding": True,
            **({"pad_to_multiple_of": COMPILE_PAD_MULTIPLE} if settings.compile else {}),
        }
        self._configs = {None: self.generation_config}  # None: the worker's own settings
        self.image_spec = image_spec(processor, self.family, settings.image_mode)
        self.default_batch_size = settings.batch_size or _default_batch_size(
            self.family, self.device, self.is_tiny
        )
        self.max_fit = self.default_batch_size  # shrinks on OOM: the size that fits
        self.provenance = {
            **common_provenance(
                model_id=model_id,
                revision=revision,
                family=self.family,
                dtype=str(self.dtype),
                device=self.device.type,
                is_tiny=self.is_tiny,
            ),
            "engine": ENGINE_NAME,
            "engine_version": transformers.__version__,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "compiled": settings.compile and self.device.type == "cuda",  # CPU: static cache only
        }
        self.provenance |= converted_from(model.config)
        if self.device.type == "cuda":
            self.provenance["gpu"] = torch.cuda.get_device_name(self.device)
        if self.is_tiny:
            log.warning("model %r: %s", model_id, TINY_WARNING)
        if settings.compile and self.device.type != "cuda":
            log.info("RECAP_COMPILE on %s: static KV cache only; transformers compiles on GPUs", self.device)

    # -- the hot path ---------------------------------------------------------------

    def image_spec_for(self, image_mode: str) -> ImageSpec:
        """What images must look like for a job of that image mode."""
        return image_spec(self.processor, self.family, image_mode)

    def _config_for(self, generation: GenerationSettings | None):
        """The generation config of a job's recorded settings (cached per distinct value):
        a job owns its generation settings, whatever this worker's RECAP_* say."""
        if generation not in self._configs:
            self._configs[generation] = _generation_config(
                self.model, generation, self.settings.compile, self._end_ids, self.tokenizer.pad_token_id
            )
        return self._configs[generation]

    def caption(
        self, images: list[Image], prompts: list[str], generation: GenerationSettings | None = None
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
                out[batch[0]] = failed_caption(failed.message)
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
            if is_fatal(error):
                raise EngineFatalError(describe(error, 300)) from error
            failed = _Failed(oom=is_oom(error), message=describe(error, 300))
        if failed is not None:
            inputs = new_tokens = None  # drop the batch's tensors before freeing the cache
            if failed.oom and self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
            return failed
        for i, caption in zip(batch, captions, strict=True):
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
            for im, p in zip(images, prompts, strict=True)
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
        rows = [row[:n] for row, n in zip(new_tokens.tolist(), lengths.tolist(), strict=True)]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        per_item_ms = seconds * 1000.0 / max(1, len(rows))  # the batch's time, shared
        return [
            Caption(
                text=tidy(text),
                n_tokens=n,
                finish_reason="stop" if stop else "length",
                infer_ms=per_item_ms,
            )
            for text, n, stop in zip(texts, lengths.tolist(), stopped.tolist(), strict=True)
        ]


def _load_model(source: ModelSource, dtype, device):
    from transformers import AutoModelForImageTextToText
    from transformers.utils import is_accelerate_available

    kwargs: dict[str, Any] = {"revision": source.load_revision, "dtype": dtype}
    if device.type == "cuda" and is_accelerate_available():
        # Straight from the safetensors onto the GPU; without accelerate transformers
        # refuses a device_map, and the weights take a detour through host memory.
        kwargs["device_map"] = str(device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source.location, attn_implementation="sdpa", **kwargs
        )
    except (ValueError, ImportError) as error:  # a class without SDPA support
        log.warning("SDPA attention unavailable (%s); using the default", describe(error, 300))
        model = AutoModelForImageTextToText.from_pretrained(source.location, **kwargs)
    if model.device != device:
        model = model.to(device)
    return model.eval()


def _generation_config(
    model, generation: GenerationSettings, compile: bool, end_ids: list[int], pad_id: int | None
):
    config = copy.deepcopy(model.generation_config)
    sampling = generation.do_sample
    config.update(
        max_new_tokens=generation.max_new_tokens,
        do_sample=sampling,
        # Neutral values when greedy: a checkpoint's sampling defaults would only warn.
        temperature=(generation.temperature or 1.0) if sampling else 1.0,
        top_p=(generation.top_p or 1.0) if sampling else 1.0,
        top_k=(generation.top_k or config.top_k) if sampling else None,
        repetition_penalty=generation.repetition_penalty,
        eos_token_id=end_ids,
        pad_token_id=pad_id,
        num_beams=1,
    )
    config.max_length = None  # max_new_tokens rules
    if compile:
        from transformers import CompileConfig

        # A fixed-size KV cache makes the decoding step's shapes static, so transformers
        # compiles it (CUDA graphs: "reduce-overhead") instead of running it op by op.
        config.cache_implementation = "static"
        config.compile_config = CompileConfig()
    return config


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
