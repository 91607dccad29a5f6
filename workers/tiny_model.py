"""Tiny random-weight vision-language models (and a tiny CLIP scorer), built in code, for
tests and offline smoke runs.

Real transformers classes (LLaVA, LLaVA-NeXT, Mllama), a real byte-level BPE tokenizer
trained in code with the Llama-3 special tokens and chat template, a real processor, saved
with `save_pretrained` and reloaded with `AutoProcessor` / `AutoModelForImageTextToText`.
Nothing is downloaded. Their captions are meaningless.

The weights are shaped so that tests are steady:
- the end tokens (and every other special token) can never win the argmax, so a caption
  never stops at once and always runs to `max_new_tokens` (a test that needs a stop edits
  the `<|eot_id|>` row of the output layer of its own copy);
- the output layer is scaled up so that the logits are peaked (greedy choices are far
  apart, batched and single runs pick the same tokens);
- Mllama's cross-attention gates are opened (a fresh Mllama's are zero, so its captions
  would ignore the image); different images then give different captions.

The tiny CLIP ("clip", `RECAP_SCORE_MODEL=tiny-clip`) is a real `CLIPModel` with a byte-level
BPE tokenizer (CLIP's start and end tokens, 77-token context) and CLIP's image processor at
32 px; its scores are meaningless too.

torch, transformers and tokenizers are imported inside the builders: `recap dev tiny-model`
and the engines import this module, `recap --help` must not pay for them.

LLaVA and LLaVA-NeXT load in vLLM unchanged too: their weights are saved in the key layout
of hub checkpoints (`vision_tower.vision_model.*`), and the text model's head_dim is 32
(vLLM's CPU attention refuses 16).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from recap.models import TINY_FAMILIES, TINY_WARNING, TinyFamily

TINY_NOTE = "RECAP_TINY.md"
# Raise it whenever the built model changes: a cached tiny model of another build is rebuilt.
# 2: head_dim 32 and the hub's key layout, so that vLLM loads it too.
TINY_BUILD = 2
TINY_MARKER = "recap_tiny"  # key written into config.json: loaders can tell a tiny model

BOS, EOT, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<pad>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
PYTHON_TAG = "<|python_tag|>"  # MllamaProcessor looks it up
IMAGE_TOKEN = {"llava": "<image>", "llava-next": "<image>", "mllama": "<|image|>"}

# Llama-3's chat format; image blocks become the family's image token (LLaVA: before the
# text with a newline, as xtuner's LLaVA-LLaMA-3; Mllama: the bare token, as Meta's).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'image' %}{{ '__IMAGE__' }}"
    "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def chat_template(image_text: str) -> str:
    """The Llama-3 chat template with image blocks written as `image_text`."""
    escaped = image_text.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'")
    return CHAT_TEMPLATE.replace("__IMAGE__", escaped)


# Enough English for a few hundred BPE merges; the words are what the garbage is made of.
_CORPUS = (
    "a photo of a dog sitting on the green grass in a park next to a red ball. "
    "the image shows a woman wearing a blue dress standing near a white wall. "
    "two cats are sleeping on a wooden table under a window with bright light. "
    "a city street at night with cars, buildings, people walking and colorful signs. "
    "a plate of food with rice, vegetables and meat on a dark background. "
    "mountains covered with snow under a clear sky, a lake in the foreground. "
    "Please generate a detailed caption of this image. Please be as descriptive as possible. "
    "The picture is a close-up of a yellow flower with small insects on its petals. "
)

_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 32: vLLM's CPU attention refuses 16
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,  # vLLM's max_model_len: prompt, image tokens and caption
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_IMAGE = 32  # LLaVA/NeXT base resolution and Mllama tile size
TINY_PATCH = 8
OUTPUT_SCALE = 8.0  # makes the logits peaked
GATE = 1.5  # Mllama cross-attention gates (tanh(1.5) ~ 0.9)


def train_tokenizer(image_token: str = "<image>"):
    """A byte-level BPE tokenizer with Llama-3's special tokens, as a transformers tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    tok.add_special_tokens(
        special_tokens(image_token)
    )  # after training: at the end of the vocabulary, as Llama-3
    bos_id = tok.token_to_id(BOS)
    # Like Llama-3: BOS on every encoded text (the chat template path turns it off).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,  # a base Llama-3 tokenizer's: the engine must add <|eot_id|> itself
        pad_token=PAD,
        padding_side="left",
        extra_special_tokens={"image_token": image_token},
    )


def special_tokens(image_token: str) -> list[str]:
    """Llama-3's special tokens that the tiny tokenizer has, and the family's image token."""
    return [BOS, EOS, HEADER_START, HEADER_END, EOT, PYTHON_TAG, image_token, PAD]


def _vision_text_configs(vocab: int, ids: dict[str, int]):
    from transformers import CLIPVisionConfig, LlamaConfig

    text = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        **_TEXT,
    )
    vision = CLIPVisionConfig(image_size=TINY_IMAGE, patch_size=TINY_PATCH, projection_dim=32, **_VISION)
    return vision, text


def _llava(family: TinyFamily, tokenizer, ids: dict[str, int]):
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    vision, text = _vision_text_configs(len(tokenizer), ids)
    image_token = IMAGE_TOKEN[family]
    common = {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": ids[image_token],
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
    }
    size = {"size": {"shortest_edge": TINY_IMAGE}, "crop_size": {"height": TINY_IMAGE, "width": TINY_IMAGE}}
    proc_kwargs = {
        "patch_size": TINY_PATCH,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,  # CLIP's CLS token
        "image_token": image_token,
        "chat_template": chat_template(image_token + "\n"),
    }
    if family == "llava":
        config = LlavaConfig(image_seq_length=(TINY_IMAGE // TINY_PATCH) ** 2, **common)
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(LlavaImageProcessorPil(**size), tokenizer, **proc_kwargs)
    else:
        pins = [[TINY_IMAGE, 2 * TINY_IMAGE], [2 * TINY_IMAGE, TINY_IMAGE], [2 * TINY_IMAGE, 2 * TINY_IMAGE]]
        config = LlavaNextConfig(image_grid_pinpoints=pins, **common)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=pins, **size)
        processor = LlavaNextProcessor(image_processor, tokenizer, **proc_kwargs)
    return model, processor


def _mllama(tokenizer, ids: dict[str, int]):
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    image_token = IMAGE_TOKEN["mllama"]
    vision = MllamaVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        image_size=TINY_IMAGE,
        patch_size=TINY_PATCH,
        max_num_tiles=2,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        intermediate_layers_indices=[0],
        vision_output_dim=32 * 2,  # last hidden state + one intermediate layer
    )
    text = MllamaTextConfig(
        vocab_size=len(tokenizer),
        cross_attention_layers=[1],  # two self-attention layers around one cross-attention layer
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        **{**_TEXT, "num_hidden_layers": 3},
    )
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=ids[image_token])
    model = MllamaForConditionalGeneration(config)
    image_processor = MllamaImageProcessorPil(
        size={"height": TINY_IMAGE, "width": TINY_IMAGE}, max_image_tiles=2
    )
    processor = MllamaProcessor(image_processor, tokenizer, chat_template=chat_template(image_token))
    return model, processor


def _shape_weights(model, family: TinyFamily, losers: list[int]) -> None:
    """Peaked logits, only whole words can win, Mllama looks at the image."""
    import torch

    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(OUTPUT_SCALE)
        # A zero row scores 0 while the best of the ~120 word rows is well above 0.
        head[losers] = 0.0
        if family == "mllama":
            for layer in model.model.language_model.layers:
                if hasattr(layer, "cross_attn_attn_gate"):
                    # A fresh Mllama has zero gates: its captions ignore the image.
                    layer.cross_attn_attn_gate.fill_(GATE)
                    layer.cross_attn_mlp_gate.fill_(GATE)


CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"
CLIP_CONTEXT = 77  # CLIP's text context, as the real ones


def _clip_tokenizer():
    """A byte-level BPE tokenizer framing every text as CLIP's does (start ... end)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    tok.add_special_tokens([CLIP_START, CLIP_END])
    start, end = tok.token_to_id(CLIP_START), tok.token_to_id(CLIP_END)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_START} $A {CLIP_END}", special_tokens=[(CLIP_START, start), (CLIP_END, end)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=CLIP_START,
        eos_token=CLIP_END,
        pad_token=CLIP_END,  # as CLIP's: pooling takes the first end token
        model_max_length=CLIP_CONTEXT,
    )


def _clip():
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    tokenizer = _clip_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=CLIP_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled at the first end token (not the legacy 2)
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
        **_VISION,
    )
    vision = CLIPVisionConfig(image_size=TINY_IMAGE, patch_size=TINY_PATCH, projection_dim=32, **_VISION)
    model = CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE}, crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def make_tiny_model(family: TinyFamily = "llava", seed: int = 0):
    """A tiny random model of `family` and its processor, in memory (see build_tiny_model)."""
    import torch

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; one of {', '.join(TINY_FAMILIES)}")
    if family == "clip":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, processor = _clip()
        setattr(model.config, TINY_MARKER, True)
        return model.eval(), processor
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        tokenizer = train_tokenizer(IMAGE_TOKEN[family])
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special_tokens(IMAGE_TOKEN[family])}
        if family == "mllama":
            model, processor = _mllama(tokenizer, ids)
        else:
            model, processor = _llava(family, tokenizer, ids)
    # Only whole words with their leading space ("Ġdog") may win: captions read as words
    # (word counts mean something) and never hold control bytes or broken UTF-8.
    words = {"Ġ" + w.strip(".,") for w in _CORPUS.split()}
    losers = [i for t, i in tokenizer.get_vocab().items() if t not in words]
    _shape_weights(model, family, sorted(set(losers) | set(ids.values())))
    setattr(model.config, TINY_MARKER, True)  # an extra config key: survives save/load
    model.generation_config.eos_token_id = ids[EOS]
    model.generation_config.pad_token_id = ids[PAD]
    return model.eval(), processor


def build_tiny_model(out_dir: Path, family: TinyFamily = "llava", seed: int = 0) -> Path:
    """Build, save and return `out_dir`: a tiny random model of `family` with its processor.

    Reload it with `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained(out_dir)`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = make_tiny_model(family, seed)
    model.save_pretrained(out_dir)
    if family in ("llava", "llava-next"):
        _to_hub_layout(out_dir / "model.safetensors")
    processor.save_pretrained(out_dir)
    _write_note(out_dir, family, seed)  # last: its presence means the folder is complete
    return out_dir


def _to_hub_layout(weights: Path) -> None:
    """Rename the vision tower's keys to the layout hub LLaVA checkpoints have
    (`vision_tower.vision_model.*`): transformers 5.2x saves `vision_tower.embeddings.*`,
    which it reads either way, and vLLM rejects."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    prefix, hub_prefix = "vision_tower.", "vision_tower.vision_model."
    renamed = {
        hub_prefix + key.removeprefix(prefix)
        if key.startswith(prefix) and not key.startswith(hub_prefix)
        else key: value
        for key, value in tensors.items()
    }
    save_file(renamed, weights, metadata={"format": "pt"})


def _write_note(out_dir: Path, family: TinyFamily, seed: int) -> None:
    (out_dir / TINY_NOTE).write_text(
        f"# recap tiny model ({family}, seed {seed}, build {TINY_BUILD})\n\n"
        "Built in code by `workers.tiny_model.build_tiny_model`.\n"
        f"**Warning: {TINY_WARNING}.** Never publish them.\n"
    )


def _is_current_build(path: Path) -> bool:
    """A complete tiny model of this build (an older build is rebuilt in its place)."""
    note = Path(path) / TINY_NOTE
    return note.exists() and f"build {TINY_BUILD})" in note.read_text().splitlines()[0]


def ensure_tiny_model(cache_dir: Path, family: TinyFamily = "llava") -> Path:
    """`cache_dir/tiny-<family>`, built on first use; safe when several processes race.

    Built in a temporary sibling folder and renamed into place (atomic on one file
    system); a file lock keeps concurrent callers from building it twice, and a lost
    rename race is tolerated anyway (the winner's copy is identical: same seed). A folder
    of an older build (`TINY_BUILD` in its note) is rebuilt in place.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / f"tiny-{family}"
    if _is_current_build(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".tiny-{family}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_current_build(target):  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{family}-", dir=cache_dir))
        try:
            build_tiny_model(tmp, family=family)
            if target.exists():  # an older build, or a half-written leftover (no note)
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_current_build(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
