"""Small typed records that pass between stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from recap.errors import Failure
from recap.states import ItemStatus


@dataclass(frozen=True, slots=True)
class InputItem:
    """One image to caption, as read from the inputs.

    `url` is an http(s) URL, or for already-downloaded images a local reference:
    `file:///abs/path.jpg` or `tar://member.jpg::/abs/shard.tar` (fsspec's chained form).
    """

    key: str
    url: str
    org_caption: str | None = None
    expected_sha256: str | None = None
    # Set only by the shard and image-folder readers: a URL list can never make a worker
    # read a local file or an fsspec target (its `file://`/`tar://` URLs are `bad_scheme`).
    local: bool = False


ImageMode = Literal["pad", "crop"]


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """What the loaded model's processor wants: prepare images once, on the CPU, to this."""

    size: int | None  # square side in pixels; None keeps the image as decoded (bounded)
    mode: ImageMode = "pad"
    # CLIP scoring on (RECAP_SCORE_MODEL): also keep a thumbnail whose shorter side is at most
    # this (the scorer's input side), for CLIP's own processor; None: no thumbnail.
    clip_side: int | None = None


@dataclass(slots=True)
class Prepared:
    """A fetched and decoded image ready for the engine."""

    item: InputItem
    image: object  # PIL.Image.Image (RGB); typed loosely so this module imports no Pillow
    sha256: str
    width: int  # of the original image
    height: int
    fetch_ms: float = 0.0
    clip_image: object | None = None  # the CLIP scorer's thumbnail (ImageSpec.clip_side), or None


@dataclass(slots=True)
class Rejected:
    """An item that failed before the engine, with its classified failure."""

    item: InputItem
    failure: Failure
    fetch_ms: float = 0.0
    sha256: str | None = None


@dataclass(slots=True)
class Caption:
    """What the engine says for one image."""

    text: str
    n_tokens: int
    finish_reason: Literal["stop", "length", "error"]
    infer_ms: float = 0.0
    failure: Failure | None = None


@dataclass(slots=True)
class ItemResult:
    """The final word on one item, as the store writes it."""

    key: str
    status: ItemStatus  # done or failed (its stored word is accepted too)
    caption: str | None = None
    flags: list[str] = field(default_factory=list)
    error_class: str | None = None
    error: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    fetch_ms: float | None = None
    infer_ms: float | None = None
    worker: str | None = None
    # CLIP scores of the new caption and of the original one (None: not scored).
    re_clip_score: float | None = None
    org_clip_score: float | None = None

    def __post_init__(self) -> None:
        self.status = ItemStatus(self.status)
