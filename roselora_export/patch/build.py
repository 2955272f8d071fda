"""Build a Patch: from two state dicts (a diff), or from an adapter merged into a base in a stored dtype.

The torch face of patch.merge_math (the one merge definition) and model.diff_bits (the one diff); the
patch is relative to the base in the stored dtype.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import InputError
from .adapter import AdapterEdit, read_adapter, resolve_keys
from .fingerprint import config_fingerprint
from .merge_math import Survival, SurvivalReport, merge_bits
from .model import BITS_DTYPE, DTYPE_NAMES, Patch, TensorPatch, check_same_keys, diff_bits, fill_sha256, tensor_bits
from .provenance import adapter_provenance, now_iso


def merge_tensor(name: str, base: torch.Tensor, edit: AdapterEdit, dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, TensorPatch | None, Survival]:
    """Merge one edit into one base tensor in the stored dtype; the merged tensor, its patch and survival."""
    dtype = dtype or base.dtype
    if dtype not in BITS_DTYPE or not base.is_floating_point():
        raise InputError(f"{name}: dtype {base.dtype} cannot be edited (fp32, fp16, bf16 only)")
    if base.dtype not in BITS_DTYPE:  # e.g. fp64: the patch is relative to the base in the stored dtype
        base = base.to(dtype)
    m = merge_bits(name, tensor_bits(base.detach().cpu()), DTYPE_NAMES[base.dtype], tuple(base.shape), edit,
                   DTYPE_NAMES[dtype])
    if m.patch is None and dtype == base.dtype:
        merged = base.detach().clone()  # m.bits is the base's own memory then
    else:
        merged = torch.from_numpy(m.bits.view(m.bits.dtype.str.replace("u", "i"))).view(dtype).reshape(base.shape)
    if m.patch is not None:
        fill_sha256(m.patch, m.base_bits, m.bits)
    return merged, m.patch, m.survival


def build_patch_from_adapter(adapter_dir: str | Path, base: Mapping[str, torch.Tensor], *,
                             dtype: torch.dtype | None = None, provenance: dict | None = None,
                             base_config: dict | None = None, base_name: str = "",
                             tied: dict[str, str] | None = None, report: SurvivalReport | None = None) -> Patch:
    """The patch that merging `adapter_dir` (PEFT LoRA or ft-l) into `base` (a state dict, in its stored dtypes
    or `dtype`) makes. `base_config` (config.json) is fingerprinted so `apply` can refuse other bases;
    `report` receives the edit-survival figures; `tied` maps an adapter key onto a tied weight's stored key."""
    adapter = read_adapter(adapter_dir)
    edits = resolve_keys(adapter.edits, base.keys(), tied=tied)
    prov = adapter_provenance(adapter, base_name, config_fingerprint(base_config) if base_config else None, dtype)
    prov.update(provenance or {})
    patch = Patch(provenance=prov)
    for name in [k for k in base.keys() if k in edits]:
        _, tp, surv = merge_tensor(name, base[name], edits[name], dtype)
        if report is not None:
            report.tensors.append(surv)
        if tp is not None:
            patch.tensors[name] = tp
    return patch


def build_patch_from_state_dicts(base: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                                 provenance: dict | None = None) -> Patch:
    """A patch of every element that differs between two state dicts with the same keys, shapes and dtypes."""
    check_same_keys(base, target, "base", "target")
    patch = Patch(provenance={"kind": "diff", "created": now_iso(), "tool": "roselora-export", **(provenance or {})})
    for name in base:
        tp = diff_tensor(name, base[name], target[name])
        if tp is not None:
            patch.tensors[name] = tp
    return patch


def diff_tensor(name: str, base: torch.Tensor, target: torch.Tensor) -> TensorPatch | None:
    """model.diff_bits of two tensors (InputError unless they have the same shape and dtype)."""
    if tuple(base.shape) != tuple(target.shape) or base.dtype != target.dtype:
        raise InputError(f"{name}: base is {tuple(base.shape)} {base.dtype}, target is {tuple(target.shape)} "
                         f"{target.dtype}; diff needs identical shapes and dtypes")
    return diff_bits(name, tuple(base.shape), DTYPE_NAMES.get(base.dtype, str(base.dtype)), _stored(base), _stored(target))


def _stored(t: torch.Tensor):
    """A CPU tensor's stored elements as numpy: the bit patterns of fp32/fp16/bf16, raw bytes otherwise."""
    t = t.detach().cpu().contiguous()
    return tensor_bits(t) if t.dtype in BITS_DTYPE else t.reshape(-1).view(torch.uint8).numpy()
