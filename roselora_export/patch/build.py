"""Build a Patch: from two state dicts (a diff), or from an adapter merged into a base in a stored dtype.

Merge semantics (the one definition the whole tool uses): in the stored dtype,
    merged = (base.to(dtype).float() + delta).to(dtype)
and the patch is relative to base.to(dtype). Edit survival measures what of the intended delta
remains after that rounding.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .adapter import AdapterEdit, read_adapter, resolve_keys
from .fingerprint import config_fingerprint
from .model import BITS_DTYPE, DTYPE_NAMES, Patch, TensorPatch, sha256_bits, tensor_bits

LOST_WARNING = 0.5  # warn when more than this fraction of an edit's nonzeros change no stored value


@dataclass
class Survival:
    """How much of the intended delta survives rounding into the stored dtype, for one tensor."""

    name: str
    intended_nnz: int  # nonzeros of the intended delta (BA, or new - base)
    lost_nnz: int  # of those, how many changed no stored value
    realised_nnz: int  # stored values that changed
    rel_l2_error: float  # ||realised - intended|| / ||intended||
    norm2: float = 0.0  # ||intended||^2, the weight of this tensor in the total error

    @property
    def lost_fraction(self) -> float:
        return self.lost_nnz / self.intended_nnz if self.intended_nnz else 0.0


@dataclass
class SurvivalReport:
    tensors: list[Survival] = field(default_factory=list)

    @property
    def intended_nnz(self) -> int:
        return sum(s.intended_nnz for s in self.tensors)

    @property
    def lost_nnz(self) -> int:
        return sum(s.lost_nnz for s in self.tensors)

    @property
    def lost_fraction(self) -> float:
        return self.lost_nnz / self.intended_nnz if self.intended_nnz else 0.0

    @property
    def rel_l2_error(self) -> float:
        return float(np.sqrt(sum(s.rel_l2_error ** 2 * s.norm2 for s in self.tensors)
                             / max(sum(s.norm2 for s in self.tensors), 1e-300)))

    @property
    def mostly_lost(self) -> bool:
        return self.lost_fraction > LOST_WARNING

    def to_dict(self) -> dict:
        return {
            "intended_nnz": self.intended_nnz,
            "lost_nnz": self.lost_nnz,
            "lost_fraction": self.lost_fraction,
            "rel_l2_error": self.rel_l2_error,
            "tensors": [
                {"name": s.name, "intended_nnz": s.intended_nnz, "lost_nnz": s.lost_nnz,
                 "realised_nnz": s.realised_nnz, "rel_l2_error": s.rel_l2_error}
                for s in self.tensors
            ],
        }


def rect_candidates(rects: list[tuple[np.ndarray, np.ndarray]], ncols: int, *, mask_ok: bool = False) -> np.ndarray:
    """Sorted flat indices of the union of row-set x column-set rectangles.

    mask_ok: the caller holds the whole tensor anyway (merge, encode), so a boolean mask over the rows
    spanned (at most 64 bytes per candidate) may be used instead of sorting; the reader leaves it off
    so that its allocations stay within what it charged per candidate.
    """
    rects = [(r, c) for r, c in rects if r.size and c.size]
    if not rects:
        return np.zeros(0, np.int64)
    total = sum(r.size * c.size for r, c in rects)
    span = (max(int(r.max()) for r, _ in rects) + 1) * ncols
    if (mask_ok and span <= 64 * total and all(int(c.max()) < ncols for _, c in rects)
            and all(int(r.min()) >= 0 and int(c.min()) >= 0 for r, c in rects)):
        # Dense enough: mark a boolean mask and read it back (sorted, no repeats), faster than sorting.
        mask = np.zeros(span, bool)
        grid = mask.reshape(-1, ncols)
        for r, c in rects:
            grid[np.ix_(r, c)] = True
        return np.flatnonzero(mask)
    parts = [np.add.outer(r.astype(np.int64) * ncols, c.astype(np.int64)).ravel() for r, c in rects]
    flat = np.sort(np.concatenate(parts))  # sort + drop repeats: faster than np.unique's hashing here
    return flat[np.concatenate(([True], flat[1:] != flat[:-1]))]


def pair_patch(name: str, base: torch.Tensor, patched: torch.Tensor, *, deferred: list | None = None
               ) -> TensorPatch | None:
    """Same result as model.tensor_patch_from_pair (tested equal), with fewer full-tensor passes and copies.

    The merge hot path: one comparison pass, XOR only at the changed elements, and hashing the bit
    arrays in place instead of through bytes copies. With `deferred` (a list), the two whole-tensor
    sha256 are left empty and `(tp, base_bits, new_bits)` is appended instead: the caller computes
    them later with `fill_sha256`, e.g. in a worker thread while it goes on with the next tensor.
    """
    base_bits, new_bits = tensor_bits(base.cpu()), tensor_bits(patched.cpu())
    flat = np.flatnonzero(base_bits != new_bits).astype(np.int64)
    if flat.size == 0:
        return None
    old, new = base_bits[flat], new_bits[flat]
    tp = TensorPatch(
        name=name, shape=tuple(base.shape), dtype=base.dtype, flat_index=flat, xor_bits=old ^ new,
        base_sha256="", patched_sha256="",
        base_touched_sha256=sha256_bits(old),
    )
    if deferred is not None:
        deferred.append((tp, base_bits, new_bits))
    else:
        fill_sha256(tp, base_bits, new_bits)
    return tp


def fill_sha256(tp: TensorPatch, base_bits: np.ndarray, new_bits: np.ndarray) -> TensorPatch:
    """Set tp's whole-tensor sha256 of base and patched bits, hashing their common prefix once.

    Both arrays are equal before the first changed element, so that prefix is hashed once and the
    hash state copied. hashlib releases the GIL, so this can run in a thread beside other work.
    """
    cut = int(tp.flat_index[0]) * base_bits.itemsize if tp.nnz else 0
    b, n = memoryview(base_bits.view(np.uint8)), memoryview(new_bits.view(np.uint8))
    h = hashlib.sha256(b[:cut])
    hn = h.copy()
    h.update(b[cut:])
    hn.update(n[cut:])
    tp.base_sha256, tp.patched_sha256 = h.hexdigest(), hn.hexdigest()
    return tp


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def check_finite(name: str, t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise InputError(f"{name}: {what} contains NaN or Inf; refusing to write it")


def merge_tensor(name: str, base: torch.Tensor, edit: AdapterEdit, dtype: torch.dtype | None = None, *,
                 deferred: list | None = None) -> tuple[torch.Tensor, TensorPatch | None, Survival]:
    """Merge one edit into one base tensor in the stored dtype; the merged tensor, its patch and survival.

    `deferred`: as in pair_patch (the whole-tensor sha256 are left to the caller's `fill_sha256`).
    """
    dtype = dtype or base.dtype
    if dtype not in BITS_DTYPE or not base.is_floating_point():
        raise InputError(f"{name}: dtype {base.dtype} cannot be edited (fp32, fp16, bf16 only)")
    if edit.shape != tuple(base.shape):
        raise InputError(f"{name}: the adapter's {'delta' if edit.is_delta else 'new value'} has shape {edit.shape}, "
                         f"the base {tuple(base.shape)}; is this adapter for this base model?")
    base_d = base.to(dtype)
    intended = edit.delta if edit.is_delta else (edit.replacement.double() - base.double()).float()
    # Survival is measured on the intended support only (the delta is sparse; this keeps merge fast).
    # A LoRA delta is zero outside its rectangles (B[i,k] A[k,j] != 0 puts (i,j) in rectangle k).
    flat_intended = intended.reshape(-1).numpy()
    if edit.rectangles is not None and tuple(base.shape) == tuple(intended.shape) and intended.ndim == 2:
        cand = rect_candidates(edit.rectangles, intended.shape[1], mask_ok=True)
        idx = torch.from_numpy(cand[flat_intended[cand] != 0])
    else:
        idx = torch.from_numpy(np.flatnonzero(flat_intended != 0))
    want = intended.reshape(-1)[idx].double()
    if edit.is_delta:
        # (base.float() + delta) computed into the fresh delta tensor (same IEEE sums, one 4-byte-per-element
        # buffer fewer to allocate and fault in); `want` was gathered above.
        merged = intended.add_(base_d).to(dtype)
        del intended
    else:
        merged = edit.replacement.to(dtype)
    got = merged.reshape(-1)[idx].double() - base_d.reshape(-1)[idx].double()
    check_finite(name, merged.reshape(-1)[idx], "the merged tensor")
    norm2 = float((want ** 2).sum())
    err = float(((got - want) ** 2).sum())
    surv = Survival(name=name, intended_nnz=int(idx.numel()), lost_nnz=int((got == 0).sum()), realised_nnz=0,
                    rel_l2_error=float(np.sqrt(err / norm2)) if norm2 > 0 else 0.0, norm2=norm2)
    tp = pair_patch(name, base_d, merged, deferred=deferred)
    if tp is not None:
        check_finite(name, merged.reshape(-1)[torch.from_numpy(tp.flat_index)], "the merged tensor")
        surv.realised_nnz = tp.nnz
    return merged, tp, surv


def adapter_provenance(adapter, base_name: str, base_config_fp: str | None, dtype: torch.dtype | None) -> dict:
    return {
        "kind": "adapter",
        "source": str(Path(adapter.path).name),
        "method": adapter.method,
        "base_model": base_name,
        "base_config_sha256": base_config_fp,
        "dtype": DTYPE_NAMES.get(dtype) if dtype else None,
        # The settings and totals, not roselora.json's per-module statistics: those are the adapter's
        # (each module's nnz is in the patch anyway), and on a small edit they were a quarter of the file.
        "roselora": {k: v for k, v in adapter.settings.items() if k != "modules"} if adapter.settings else adapter.settings,
        "lora": {k: adapter.peft_config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules", "fan_in_fan_out")
                 if k in adapter.peft_config},
        "created": now_iso(),
        "tool": "roselora-export",
    }


def build_patch_from_adapter(adapter_dir: str | Path, base: Mapping[str, torch.Tensor], *,
                             dtype: torch.dtype | None = None, provenance: dict | None = None,
                             base_config: dict | None = None, base_name: str = "",
                             tied: dict[str, str] | None = None, report: SurvivalReport | None = None) -> Patch:
    """The patch that merging `adapter_dir` into `base` (a state dict, in its stored dtypes or `dtype`) makes.

    Accepts a PEFT LoRA adapter (RoseLoRA or dense) or an ft-l directory. `base_config` (config.json,
    or `model.config.to_dict()`) records the base's config fingerprint so `apply` can refuse other
    bases. Pass a SurvivalReport to receive the edit-survival figures. `tied` maps an adapter key
    onto the stored key of a tied weight.
    """
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
    missing, extra = set(base) - set(target), set(target) - set(base)
    if missing or extra:
        which = sorted(missing)[0] if missing else sorted(extra)[0]
        raise InputError(f"base and target have different tensors (first: {which} is only in "
                         f"{'base' if missing else 'target'}); diff needs the same keys")
    patch = Patch(provenance={"kind": "diff", "created": now_iso(), "tool": "roselora-export", **(provenance or {})})
    for name in base:
        tp = diff_tensor(name, base[name], target[name])
        if tp is not None:
            patch.tensors[name] = tp
    return patch


def diff_tensor(name: str, base: torch.Tensor, target: torch.Tensor) -> TensorPatch | None:
    if tuple(base.shape) != tuple(target.shape) or base.dtype != target.dtype:
        raise InputError(f"{name}: base is {tuple(base.shape)} {base.dtype}, target is {tuple(target.shape)} "
                         f"{target.dtype}; diff needs identical shapes and dtypes")
    if base.dtype not in BITS_DTYPE:
        if not torch.equal(base, target):
            raise InputError(f"{name}: dtype {base.dtype} differs between base and target; only fp32/fp16/bf16 can be patched")
        return None
    tp = pair_patch(name, base, target)
    if tp is not None:
        check_finite(name, target.reshape(-1)[torch.from_numpy(tp.flat_index)], "the target")
    return tp
