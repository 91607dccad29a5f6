"""Checkpoint folders: where one is (a local folder, or a hub snapshot pinned to one commit),
its tensors read one at a time (safetensors, else `pytorch_model*.bin` read with
`weights_only`; sharded or not), and tensors written as safetensors in the hub's file
layout (one file, or shards with an index).

torch is imported only where tensors are read or written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recap.errors import RecapError, describe
from workers.engine.loading import local_revision

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a conversion reads besides the weights: configs, tokenizer, image processor.
METADATA_FILES = ["*.json", "*.jinja", "tokenizer.model"]
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SHARD_BYTES = 5 * 2**30  # transformers' default shard size
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2}


@dataclass(frozen=True, slots=True)
class Located:
    """A checkpoint folder on this machine and where it came from."""

    name: str  # as the user or the config gave it: a folder or a hub id
    path: Path  # the folder (for a hub id: its snapshot in the hub cache)
    revision: str  # the hub commit, or a content hash of the local folder
    is_local: bool


def locate(name: str, role: str, revision: str | None = None) -> Located:
    """`name` as a local folder, else as a hub id whose configs are fetched (not its
    weights: `fetch_weights`). RecapError, one line, where it is neither."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return Located(name, folder.resolve(), local_revision(folder), True)
    if folder.exists() or not HUB_ID.fullmatch(name):
        raise RecapError(f"{role} {name} is not a folder")
    path = _download(name, role, revision, METADATA_FILES)
    return Located(name, path, path.name, False)


def fetch_weights(located: Located, role: str) -> None:
    """Download a hub checkpoint's weights into its snapshot (safetensors where it has
    them, else its .bin files), at the commit its configs came from."""
    if located.is_local:
        return
    if (located.path / SAFETENSORS_INDEX).is_file() or not (located.path / BIN_INDEX).is_file():
        _download(located.name, role, located.revision, ["*.safetensors"])
    if not list(located.path.glob("*.safetensors")):
        _download(located.name, role, located.revision, ["pytorch_model*.bin"])


def _download(repo: str, role: str, revision: str | None, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as error:  # offline, unknown repo, gated, network: all one line
        raise RecapError(
            f"{role} {repo} is not a folder here, and the Hugging Face Hub did not give it: "
            f"{describe(error, 300)}"
        ) from None


# -- reading ------------------------------------------------------------------------------


def weight_files(folder: Path, label: str) -> list[Path]:
    """The files holding a checkpoint's tensors, the shards an index names first."""
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        if (folder / index).is_file():
            weight_map = _read_json(folder / index, label).get("weight_map") or {}
            files = [folder / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise RecapError(f"{label}: {index} names shards that are not there: {', '.join(missing)}")
            return files
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise RecapError(f"{label} has no weights (no *.safetensors or pytorch_model*.bin files)")
    return files


def _read_json(path: Path, label: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RecapError(f"{label}: cannot read {path.name}: {describe(error, 200)}") from None


class TensorReader:
    """The tensors of one checkpoint folder by name, each read when it is asked for."""

    def __init__(self, folder: Path, label: str) -> None:
        self.label = label
        self._where: dict[str, Any] = {}  # name -> an open safetensors file, or a loaded .bin dict
        for file in weight_files(folder, label):
            opened = self._open(file)
            names = opened.keys()  # a safetensors file is no mapping: keys() is all it has
            for key in names:
                if key in self._where:
                    raise RecapError(f"{label}: tensor {key} is in two files")
                self._where[key] = opened
        self._check_index(folder)

    def _open(self, file: Path):
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                return safe_open(str(file), framework="pt")
            import torch

            try:  # mmap: an 8B shard is not read into memory at once
                return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (pre-zip) format cannot be mapped
                return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise RecapError(f"{self.label}: cannot read {file.name}: {describe(error, 300)}") from None

    def _check_index(self, folder: Path) -> None:
        for index in (SAFETENSORS_INDEX, BIN_INDEX):
            if (folder / index).is_file():
                listed = set(_read_json(folder / index, self.label).get("weight_map") or {})
                if listed != set(self._where):
                    odd = sorted(listed ^ set(self._where))
                    raise RecapError(
                        f"{self.label}: {index} and its shards disagree on {len(odd)} tensors "
                        f"(e.g. {odd[0]}): an incomplete download?"
                    )
                return

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        held = self._where[key]
        if isinstance(held, dict):
            return tuple(held[key].shape)
        return tuple(held.get_slice(key).get_shape())

    def nbytes(self, key: str) -> int:
        held = self._where[key]
        if isinstance(held, dict):
            return held[key].numel() * held[key].element_size()
        dtype = held.get_slice(key).get_dtype()
        return math.prod(self.shape(key)) * _DTYPE_BYTES.get(dtype, 1)

    def get(self, key: str):
        """The tensor as stored (values, shape and dtype), contiguous and owning its memory."""
        held = self._where[key]
        if isinstance(held, dict):
            # A .bin tensor may be a view sharing storage with others: safetensors refuses those.
            return held[key].clone(memory_format=_contiguous())
        return held.get_tensor(key)


def _contiguous():
    import torch

    return torch.contiguous_format


# -- writing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Copy:
    """One tensor of the new checkpoint: its name there, and where it is read from."""

    name: str
    reader: TensorReader
    key: str

    @property
    def nbytes(self) -> int:
        return self.reader.nbytes(self.key)


def write_checkpoint(folder: Path, copies: list[Copy], shard_bytes: int = SHARD_BYTES) -> None:
    """Write `copies` as `model.safetensors`, or as numbered shards of at most about
    `shard_bytes` with `model.safetensors.index.json`; one shard in memory at a time."""
    from safetensors.torch import save_file

    shards = list(_shards(copies, shard_bytes))
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        tensors = {copy.name: copy.reader.get(copy.key) for copy in shard}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(c.nbytes for c in copies)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _shards(copies: list[Copy], shard_bytes: int) -> Iterator[list[Copy]]:
    shard: list[Copy] = []
    size = 0
    for copy in copies:
        if shard and size + copy.nbytes > shard_bytes:
            yield shard
            shard, size = [], 0
        shard.append(copy)
        size += copy.nbytes
    if shard:
        yield shard
