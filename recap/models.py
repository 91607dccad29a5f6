"""Model names: the tiny test-model aliases and the slug that names a model's queue.

Pure Python and shared by every layer: the producer derives job names from the slug,
the queue contract names queues with it, and workers build the tiny models it lists.
"""

from __future__ import annotations

import re
from typing import Literal

TinyFamily = Literal["llava", "llava-next", "mllama"]

# `--model tiny` and friends: a tiny random-weight model built into the cache on first use.
TINY_MODELS: dict[str, TinyFamily] = {
    "tiny": "llava",
    "tiny-llava": "llava",
    "tiny-llava-next": "llava-next",
    "tiny-mllama": "mllama",
}
TINY_FAMILIES: tuple[TinyFamily, ...] = ("llava", "llava-next", "mllama")
TINY_WARNING = "the tiny model's captions are meaningless (random weights): it is for tests and smoke runs"


def tiny_family(model: str) -> TinyFamily | None:
    """The tiny model family a model name means, or None (see TINY_MODELS)."""
    return TINY_MODELS.get(model)


def model_slug(model: str) -> str:
    """A queue- and name-safe form of a model id: `xtuner/llava-llama-3-8b` → `xtuner--llava-llama-3-8b`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.replace("/", "--")).strip("-")
    return slug[-120:] or "model"
