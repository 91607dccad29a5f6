"""CLIP scores of captions (RECAP_SCORE_MODEL): how well the new caption and the original
alt text each match the image, as DataComp scores alt text.

A score is the cosine similarity of CLIP's image embedding and its text embedding
(`CLIPModel.get_image_features` / `get_text_features`, both normalised). CLIP sees the
image through its own processor (its resize and centre crop), from the thumbnail the prepare
stage keeps for it (`ImageSpec.clip_side`), never the captioner's padded square. A text
longer than the text encoder's context (77 tokens for CLIP) is scored on its truncated form
and the item is flagged `score_truncated`. The scorer runs after captioning, a batch at a
time, on the captioner's device; its model and revision enter the captions' provenance.

torch and transformers are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from recap.models import tiny_scorer_family
from recap.settings import Settings
from workers.engine.loading import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """One item to score: CLIP's thumbnail of its image, and its two captions."""

    image: object  # PIL.Image.Image (RGB), at most the scorer's input side on its shorter side
    caption: str | None  # the new caption
    org_caption: str | None  # the original alt text, where the input had one


@dataclass(frozen=True, slots=True)
class ItemScores:
    re_clip_score: float | None
    org_clip_score: float | None
    truncated: bool  # a caption was cut to the text encoder's context before scoring


class ClipScorer:
    """A CLIP model and its processor on one device; `score` is safe from several threads
    (a chunk and its finishers share one scorer)."""

    def __init__(self, model, image_processor, tokenizer, provenance: dict):
        """A loaded `CLIPModel` (on its device), CLIP's image processor and its tokenizer."""
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context = int(model.config.text_config.max_position_embeddings)
        self.side = input_side(image_processor)
        self.provenance = provenance
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, source: str | Path, model_id: str, device: str = "cpu", revision: str | None = None
    ) -> ClipScorer:
        """A CLIP model from a folder or the hub, in float32 on `device`."""
        import torch
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        where = ModelSource.of(source, revision)
        at = {"revision": where.load_revision}
        # The Pillow back end: the same resize as the prepare stage's thumbnail (and as
        # DataComp's PIL transforms), on any host, whether or not torchvision is installed.
        image_processor = CLIPImageProcessorPil.from_pretrained(where.location, **at)
        tokenizer = AutoTokenizer.from_pretrained(where.location, **at)
        model = CLIPModel.from_pretrained(where.location, dtype=torch.float32, **at).to(torch.device(device))
        provenance = {"score_model": model_id, "score_revision": where.recorded_revision()}
        return cls(model, image_processor, tokenizer, provenance)

    def score(self, requests: list[ScoreRequest]) -> list[ItemScores]:
        """Scores of each request's captions (None where it has no such caption)."""
        if not requests:
            return []
        texts, owners = _texts(requests)
        with self._lock:
            images = self._image_embeddings([r.image for r in requests])
            embedded, cut = self._text_embeddings(texts)
        found: dict[tuple[int, str], float] = {}
        truncated = [False] * len(requests)
        for row, (index, which) in enumerate(owners):
            found[index, which] = float((images[index] * embedded[row]).sum())
            truncated[index] |= cut[row]
        return [
            ItemScores(found.get((i, "re")), found.get((i, "org")), truncated[i])
            for i in range(len(requests))
        ]

    def _image_embeddings(self, images: list):
        import torch

        pixels = self.image_processor(images, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            return _unit(self.model.get_image_features(pixel_values=pixels))

    def _text_embeddings(self, texts: list[str]):
        """Normalised text embeddings, and which texts were longer than the context."""
        import torch

        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.context, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            features = self.model.get_text_features(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
        return _unit(features), [n > self.context for n in lengths]


def _texts(requests: list[ScoreRequest]) -> tuple[list[str], list[tuple[int, str]]]:
    """Every caption to embed, in one list, with the request and caption each belongs to."""
    texts: list[str] = []
    owners: list[tuple[int, str]] = []
    for index, request in enumerate(requests):
        if request.caption is not None:
            texts.append(request.caption)
            owners.append((index, "re"))
        if request.org_caption:  # an empty alt text is no caption to score
            texts.append(request.org_caption)
            owners.append((index, "org"))
    return texts, owners


def _unit(features):
    """Embeddings scaled to length 1 (transformers 5 returns pooled outputs, older a tensor)."""
    tensor = getattr(features, "pooler_output", features)
    return (tensor / tensor.norm(dim=-1, keepdim=True)).float().cpu()


def input_side(image_processor) -> int:
    """The shorter side CLIP's processor resizes an image to before its centre crop."""
    size = image_processor.size
    side = size.get("shortest_edge") or min(size.get("height", 0), size.get("width", 0))
    return int(side or image_processor.crop_size["height"])


def load_scorer(settings: Settings, device: object = "cpu") -> ClipScorer | None:
    """RECAP_SCORE_MODEL on the captioner's `device`, or None when scoring is off.

    "tiny-clip" is a tiny random CLIP built into `settings.cache_dir` on first use; a folder
    is loaded as it is; anything else is a hub id.
    """
    name = settings.score_model
    if not name:
        return None
    family = tiny_scorer_family(name)
    if family is not None:
        from workers.tiny_model import ensure_tiny_model  # torch and transformers: only here

        source: str | Path = ensure_tiny_model(settings.cache_dir, family)
    else:
        local = Path(name).expanduser()
        source = local if local.is_dir() else name
    scorer = ClipScorer.load(source, name, device=_device_name(device))
    log.info("CLIP scores with %s on %s", name, scorer.device)
    return scorer


def _device_name(device: object) -> str:
    """The captioner's device as torch names it (vLLM's engine gives "cuda" or "cpu")."""
    text = str(device)
    return text if text not in ("auto", "") else "cpu"
