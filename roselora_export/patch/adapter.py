"""Read an adapter directory into dense deltas, in the layout of the base weights.

Three layouts (docs/adapters.md): a PEFT LoRA adapter (RoseLoRA-sparse or dense; adapter_config.json
+ adapter_model.safetensors, optional roselora.json), and the ft-l baseline (ft_l.safetensors with
the new value of each modified weight under its base key, plus roselora.json). Safetensors and JSON
only; nothing is unpickled. Read with numpy, not torch (see merge_math).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.safetensors import read_array, read_header
from ..errors import InputError
from .merge_math import float_values

PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterEdit:
    """The edit to one base tensor: a LoRA delta (kept as its factors, so reading costs the adapter's size;
    merge_math.lora_delta computes it) or a replacement value (ft-l, modules_to_save)."""

    key: str  # the module path as the adapter names it, plus ".weight"/".bias"
    a: np.ndarray | None = None  # fp32 (r, in) lora_A
    b: np.ndarray | None = None  # fp32 (out, r) lora_B
    scaling: float = 1.0
    transposed: bool = False  # the weight is stored (in, out): Embedding, or GPT-2 Conv1D (fan_in_fan_out)
    replacement: np.ndarray | None = None  # fp32 (fp64 when stored so) new values

    @property
    def is_delta(self) -> bool:
        return self.a is not None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.replacement is not None:
            return tuple(self.replacement.shape)
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transposed else (out, inp)


@dataclass
class Adapter:
    method: str  # "roselora", "lora" or "ft-l"
    path: Path
    settings: dict = field(default_factory=dict)  # roselora.json (or {} for a plain PEFT adapter)
    peft_config: dict = field(default_factory=dict)
    edits: dict[str, AdapterEdit] = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


class _SafetensorsFile:
    """A safetensors file's header, and its tensors read on request as float values (fp32; fp64 kept): frozen
    copies PEFT saves beside the LoRA factors are never converted."""

    def __init__(self, path: Path):
        self.path, self.header = path, read_header(path)

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.header.tensors[name]
        try:
            return float_values(read_array(info, path=self.path), info.dtype).reshape(info.shape)
        except InputError as err:
            raise InputError(f"{self.path}: tensor {name}: {err}") from None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module name that ends with it (regex allowed)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _is_trained_full_weight(key: str, cfg: dict) -> bool:
    """A non-LoRA tensor in an adapter file is part of the edit when it is a module to save or a trained bias."""
    module = key.rsplit(".", 1)[0]
    if key.endswith(".bias") and cfg.get("bias", "none") != "none":
        return True
    return ".modules_to_save." in key or any(re.match(rf"(.*\.)?({m})$", re.sub(r"\.modules_to_save\.[^.]+", "", module))
                                             for m in (cfg.get("modules_to_save") or []))


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Parse an adapter directory; raises InputError for anything it cannot merge exactly."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise InputError(f"--adapter {path}: not a directory")
    settings = _read_json(path / "roselora.json") if (path / "roselora.json").is_file() else {}
    if (path / "ft_l.safetensors").is_file():
        tensors = _SafetensorsFile(path / "ft_l.safetensors")
        edits = {k: AdapterEdit(key=k, replacement=tensors[k]) for k in tensors.keys()}
        return Adapter(method="ft-l", path=path, settings=settings, edits=edits)
    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise InputError(f"--adapter {path}: neither a PEFT adapter (adapter_config.json + adapter_model.safetensors) "
                         "nor an ft-l directory (ft_l.safetensors)")
    cfg = _read_json(path / "adapter_config.json")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise InputError(f"--adapter {path}: peft_type {cfg.get('peft_type')} is not LoRA")
    if cfg.get("use_dora"):
        raise InputError(f"--adapter {path}: DoRA adapters are not supported (only plain LoRA / RoseLoRA)")
    tensors = _SafetensorsFile(path / "adapter_model.safetensors")
    method = str(settings.get("method", "roselora" if settings else "lora"))
    edits: dict[str, AdapterEdit] = {}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key in tensors.keys():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = re.match(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$", k)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensors[key]
        elif "lora_magnitude_vector" in k:
            raise InputError(f"--adapter {path}: DoRA magnitude vectors are not supported")
        elif ".base_layer." in k or not _is_trained_full_weight(k, cfg):
            continue  # frozen copies PEFT saves for convenience (e.g. embedding layers): not part of the edit
        else:
            # modules_to_save / trained biases: full replacement values under the base key.
            k = re.sub(r"\.modules_to_save\.[^.]+", "", k)
            edits[k] = AdapterEdit(key=k, replacement=tensors[key])
    alpha_default = cfg.get("lora_alpha", 8)
    for module, ab in pairs.items():
        embedding = "lora_embedding_A" in ab or "lora_embedding_B" in ab
        a = ab.get("lora_embedding_A" if embedding else "lora_A")
        b = ab.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"--adapter {path}: {module} lacks a matching lora_A/lora_B pair")
        rank = a.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha_default)
        scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        a32, b32 = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
        if not (np.isfinite(a32).all() and np.isfinite(b32).all()):
            raise InputError(f"--adapter {path}: {module} has NaN or Inf in its LoRA factors")
        # Embedding weights are (num_embeddings, dim) and GPT-2 Conv1D weights are (in, out): transposed.
        transposed = bool(embedding or cfg.get("fan_in_fan_out"))
        edits[module + ".weight"] = AdapterEdit(key=module + ".weight", a=a32, b=b32, scaling=scaling,
                                                transposed=transposed)
    return Adapter(method=method, path=path, settings=settings, peft_config=cfg, edits=edits)


def resolve_keys(edits: dict[str, AdapterEdit], base_keys, *, tied: dict[str, str] | None = None) -> dict[str, AdapterEdit]:
    """Map adapter keys onto the base's state-dict keys: exact, then a unique suffix match, then tied aliases."""
    base_keys = list(base_keys)
    keyset = set(base_keys)
    out: dict[str, AdapterEdit] = {}
    for k, edit in edits.items():
        name = k
        if name not in keyset and tied and name in tied:
            name = tied[name]
        if name not in keyset:
            hits = [b for b in base_keys if b.endswith("." + k) or k.endswith("." + b)]
            if len(hits) != 1:
                raise InputError(f"the adapter changes {k} but the base has {'no' if not hits else 'several'} matching "
                                 "tensor; is this adapter for this base model?")
            name = hits[0]
        if name in out:
            raise InputError(f"the adapter changes {name} twice (tied weights?)")
        out[name] = edit
    return out
