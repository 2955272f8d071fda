"""A Hugging Face safetensors checkpoint directory: its shards, index, config and tied weights.

Opening one imports neither torch nor the patch package (only reading a tensor does), so that
`merge` can start copying shards while torch is still being imported.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from .safetensors_stream import Header, TensorInfo, read_array, read_header, read_tensor

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


@dataclass
class ModelDir:
    path: Path
    config: dict
    shards: list[Header]  # in index order
    index: dict | None = None  # the parsed index json, when sharded
    locations: dict[str, tuple[Header, TensorInfo]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def fingerprint(self) -> str:
        from ..patch.fingerprint import config_fingerprint

        return config_fingerprint(self.config)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for h in self.shards for t in h.tensors.values())

    @property
    def numel(self) -> int:
        return sum(int(math.prod(t.shape)) for h in self.shards for t in h.tensors.values())

    def keys(self) -> list[str]:
        return list(self.locations)

    def read(self, name: str) -> torch.Tensor:
        header, info = self.locations[name]
        return read_tensor(info, path=header.path)

    def read_array(self, name: str):
        """The tensor as a flat numpy array (float tensors as their bit patterns), without torch."""
        header, info = self.locations[name]
        return read_array(info, path=header.path)

    def tied_aliases(self) -> dict[str, str]:
        """Adapter key -> stored key for tied weights the checkpoint keeps once (lm_head -> input embedding)."""
        if not self.config.get("tie_word_embeddings", False):
            return {}
        emb = [k for k in self.locations if k.endswith(EMBEDDING_SUFFIXES)]
        if len(emb) != 1:
            return {}
        return {k: emb[0] for k in ("lm_head.weight",) if k not in self.locations}


class LazyStateDict(Mapping):
    """A read-only mapping that reads each tensor from disk on access (nothing kept in memory)."""

    def __init__(self, model: ModelDir):
        self.model = model

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.model.locations:
            raise KeyError(key)
        return self.model.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.model.locations)

    def __len__(self) -> int:
        return len(self.model.locations)


def _shard_path(root: Path, name, index_path: Path) -> Path:
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise InputError(f"{index_path}: shard name {name!r} is not a plain file name inside the model directory")
    p = root / name
    if root.resolve() not in p.resolve().parents:
        raise InputError(f"{index_path}: shard {name!r} points outside the model directory; refusing to read it")
    if not p.is_file():
        raise InputError(f"{root}: missing shard {name} (listed in {INDEX_NAME}); the checkpoint is incomplete")
    return p


def open_model_dir(path: str | os.PathLike, what: str = "--base") -> ModelDir:
    """Open a checkpoint directory: validate config, index and shard headers (no tensor data is read)."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{what} {root}: not a directory")
    cfg_path = root / "config.json"
    config: dict = {}
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError, OSError) as err:
            raise InputError(f"{what} {cfg_path}: not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise InputError(f"{what} {cfg_path}: not a JSON object")
    index_path = root / INDEX_NAME
    index = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not isinstance(index.get("metadata", {}), dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
            raise InputError(f"{what} {index_path}: not a valid shard index (needs a weight_map object, and "
                             "metadata, if any, an object)") from None
        names = list(dict.fromkeys(weight_map.values()))
        shard_paths = [_shard_path(root, n, index_path) for n in names]
    elif (root / SINGLE_NAME).is_file():
        shard_paths = [root / SINGLE_NAME]
    else:
        raise InputError(f"{what} {root}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are read)")
    model = ModelDir(path=root, config=config, shards=[read_header(p) for p in shard_paths], index=index)
    for h in model.shards:
        for name, info in h.tensors.items():
            if name in model.locations:
                raise InputError(f"{what} {root}: tensor {name} is stored in two shards")
            model.locations[name] = (h, info)
    if index is not None:
        for name, shard in index["weight_map"].items():
            if name not in model.locations or model.locations[name][0].path.name != Path(shard).name:
                raise InputError(f"{what} {index_path}: {name} is not in shard {shard} as the index says")
    return model
