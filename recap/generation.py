"""How a job's captions are generated. A job owns these settings: they are stored with it
(as JSON), exported with every row, part of the name `recap run` derives, and every worker
captions the job with them whatever its own RECAP_* say (docs/ARCHITECTURE.md, "Contracts")."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

ImageMode = Literal["pad", "crop"]


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float | None = None  # None when greedy
    top_p: float | None = None  # None when greedy
    repetition_penalty: float = 1.0
    image_mode: ImageMode | None = "pad"  # None: a job from before image modes (the worker's)
    # Keys added later enter a job's JSON (and so its identity) only when set: jobs made
    # before them keep their names and resume.
    top_k: int | None = None
    # The JSON a stored job was read from, given back as it was (an older or newer recap may
    # have written other keys): what is stored and exported never changes under a job.
    stored: dict[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The stored and exported form (the same keys and values as before this class)."""
        if self.stored is not None:
            return dict(self.stored)
        data: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.image_mode is not None:
            data["image_mode"] = self.image_mode
        if self.top_k is not None:
            data["top_k"] = self.top_k
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> GenerationSettings:
        """A stored job's settings; keys it lacks take the value that meant the same then."""
        data = data or {}
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values.setdefault("image_mode", None)
        return cls(**values, stored=dict(data))
