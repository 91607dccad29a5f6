"""Model names: the tiny test-model aliases and the slug that names a model's queue.

Pure Python and shared by every layer: the producer derives job names from the slug,
the queue contract names queues with it, and workers build the tiny models it lists.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

TinyFamily = Literal["llava", "llava-next", "mllama", "clip"]

# `--model tiny` and friends: a tiny random-weight model built into the cache on first use.
TINY_MODELS: dict[str, TinyFamily] = {
    "tiny": "llava",
    "tiny-llava": "llava",
    "tiny-llava-next": "llava-next",
    "tiny-mllama": "mllama",
}
# `RECAP_SCORE_MODEL=tiny-clip`: a tiny random CLIP scorer, built the same way. Not a captioner.
TINY_SCORERS: dict[str, TinyFamily] = {"tiny-clip": "clip"}
TINY_FAMILIES: tuple[TinyFamily, ...] = get_args(TinyFamily)  # what can be built
TINY_WARNING = "the tiny model's captions are meaningless (random weights): it is for tests and smoke runs"


def tiny_family(model: str) -> TinyFamily | None:
    """The tiny model family a model name means, or None (see TINY_MODELS)."""
    return TINY_MODELS.get(model)


def tiny_scorer_family(model: str) -> TinyFamily | None:
    """The tiny scorer family a score model name means, or None (see TINY_SCORERS)."""
    return TINY_SCORERS.get(model)


def not_a_captioner(model: str) -> str | None:
    """Why `model` cannot caption (a scorer alias given as the captioner), or None."""
    if model in TINY_SCORERS:
        return f"model {model!r} is a CLIP scorer, not a captioner: use it as RECAP_SCORE_MODEL"
    return None


def model_slug(model: str) -> str:
    """A queue- and name-safe form of a model id: `xtuner/llava-llama-3-8b` → `xtuner--llava-llama-3-8b`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.replace("/", "--")).strip("-")
    return slug[-120:] or "model"
