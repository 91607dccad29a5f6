"""Which engine a worker runs, and building it: `load_engine`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from recap.models import tiny_family

if TYPE_CHECKING:
    from recap.settings import Settings
    from workers.engine.protocol import CaptionEngine


def load_engine(settings: Settings, model: str | None = None) -> CaptionEngine:
    """The engine for `model` (default `settings.model`).

    "tiny" (or "tiny-llava", "tiny-llava-next", "tiny-mllama") is a tiny random model built
    into `settings.cache_dir` on first use; a local directory is loaded as it is; anything
    else is a hub id loaded at `settings.model_revision`. A tiny model says so in its
    config (`recap_tiny`), wherever it is loaded from.
    """
    # transformers: only once an engine is wanted (light commands never get here)
    from transformers.utils import logging as hf_logging

    from workers.engine.transformers_engine import TransformersEngine
    from workers.tiny_model import ensure_tiny_model

    hf_logging.disable_progress_bar()  # recap draws its own; tqdm bars garble worker logs
    name = model or settings.model
    family = tiny_family(name)
    if family is not None:
        path = ensure_tiny_model(settings.cache_dir, family)
        return TransformersEngine(path, settings, model_id=name)
    local = Path(name).expanduser()
    if local.is_dir():
        return TransformersEngine(local, settings, model_id=name)
    return TransformersEngine(name, settings, model_id=name, revision=settings.model_revision)
