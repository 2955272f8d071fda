"""`merge --check`: everything merge would check, computed in memory, and nothing written.

Each changed tensor is merged in memory, one at a time, and refused as merge would refuse it; the base's
ledger and the destinations are checked. No file is created, no lock taken. (The CLI checks an --onnx
artifact against the patch this returns: checkpoint code does not import onnx.)
"""
from __future__ import annotations

import os
from pathlib import Path

from ..core.atomic import check_disjoint, check_empty_out
from ..core.dtypes import PATCHABLE
from ..errors import InputError
from .merge import _converts, default_patch_path, out_dtype
from .model_dir import open_model_dir


def check_merge(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                dtype=None, patch_path: str | os.PathLike | None = None):
    """Validate a merge without writing anything; returns (what it would produce: tensors, nnz, survival;
    the patch it would write)."""
    from ..patch.adapter import read_adapter, resolve_keys
    from ..patch.ledger import check_weights, read_ledger
    from ..patch.merge_math import SurvivalReport, merge_bits
    from ..patch.model import Patch, fill_sha256

    out = out_dtype(dtype)
    out_dir = Path(out_dir)
    patch_path = Path(patch_path) if patch_path else default_patch_path(out_dir)
    check_disjoint({"--out": out_dir, "--patch": patch_path}, {"--base": base_dir, "--adapter": adapter_dir})
    check_empty_out(out_dir)
    if patch_path.is_dir():
        raise InputError(f"--patch {patch_path}: is a directory")
    if not Path(adapter_dir).is_dir():
        raise InputError(f"--adapter {adapter_dir}: not a directory")
    model = open_model_dir(base_dir)
    converts = _converts(model, out)
    ledger = read_ledger(model.path)  # a damaged ledger is refused here as merge would refuse it
    edits = resolve_keys(read_adapter(adapter_dir).edits, model.keys(), tied=model.tied_aliases())
    patch, survival = Patch(), SurvivalReport()
    for name in [n for n in model.keys() if n in edits]:
        info = model.locations[name][1]
        if info.dtype not in PATCHABLE:
            raise InputError(f"{name}: stored as {info.dtype}; only fp32/fp16/bf16 tensors can be edited")
        m = merge_bits(name, model.read_array(name), info.dtype, info.shape, edits[name], out)
        survival.tensors.append(m.survival)
        if m.patch is not None:
            patch.tensors[name] = fill_sha256(m.patch, m.base_bits, m.bits)
            if not converts:
                check_weights(ledger, model.path, name, patch.tensors[name].base_sha256)
    report = {"check": True, "out": str(out_dir), "patch": str(patch_path), "tensors": len(patch.tensors),
              "total_nnz": patch.total_nnz, "edit_survival": survival.to_dict(), "onnx": None,
              "ledger_patches": len(ledger.entries)}
    return report, patch
