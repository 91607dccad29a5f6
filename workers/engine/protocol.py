"""The engine contract: what the pipeline asks of a caption engine, whichever runs the model.

Every engine keeps it the same way (docs/ARCHITECTURE.md, "The walk of one item"):
- `caption` returns exactly one `Caption` per image, in order, with the number of new
  tokens and the finish reason ("stop" at an end token, "length" at max_new_tokens), so the
  quality flags (`truncated` and the rest) read every engine's captions alike;
- the job's recorded generation settings decide (greedy by default, max new tokens,
  sampling, repetition penalty), whatever the worker's own settings say;
- the images are the ones the prepare stage made (`image_spec_for`: pad or crop);
- a bad item fails alone: its Caption has finish_reason "error" and an `inference_error`
  Failure, and its neighbours are captioned ("Error classes");
- a broken device raises `EngineFatalError` and blames no item: the worker stops.

An engine that schedules sequences continuously (vLLM) also declares `StreamingEngine`:
the pipeline then submits batches without waiting for the earlier ones, so the engine's
queue never drains between batches or chunks while images are ready.

Pure Python: naming the protocol imports neither torch nor any engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

from recap.errors import ErrorClass, Failure
from recap.generation import GenerationSettings
from recap.records import Caption, ImageSpec

if TYPE_CHECKING:
    from PIL.Image import Image

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
        self, images: list[Image], prompts: list[str], generation: GenerationSettings | None = None
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


class StreamingEngine(ABC):
    """The optional capability of an engine that takes new batches while earlier ones run.

    Declared by inheriting it (the pipeline checks `isinstance`, never an attribute): the
    engine owns its device from one thread of its own, so `submit` may be called from any
    thread, and the captions of a batch join the sequences already running.
    """

    @abstractmethod
    def submit(
        self, images: list[Image], prompts: list[str], generation: GenerationSettings | None = None
    ) -> Future[list[Caption]]:
        """Queue a batch; its future gives what `caption` returns for it (one Caption per
        image, in order, a bad item failed alone), or raises EngineFatalError when the
        device broke meanwhile (every batch in flight then fails so)."""
        ...


def failed_caption(message: str) -> Caption:
    """The caption of an item the engine could not caption: blames that item alone."""
    failure = Failure.of(ErrorClass.INFERENCE_ERROR, message)
    return Caption(text="", n_tokens=0, finish_reason="error", failure=failure)


def tidy(text: str) -> str:
    # PostgreSQL text cannot hold NUL; models (and tiny ones) can emit it.
    return text.replace("\x00", "").strip()
