"""Fuse patches that change disjoint elements into one patch; overlapping ones are refused.

Applying the fused patch equals applying its parts in any order (XOR commutes on disjoint elements),
and reverting it takes them all out. Where two parts change one tensor, its fingerprints need the base's
bits, so a base checkpoint must be given (each part is checked against it by the touched-element rule).
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .model import Patch, TensorPatch, tensor_patch_from_bits
from .overlap import holds_base, intersects
from .provenance import now_iso


def combine_patches(patches: list[Patch], labels: list[str], *, base=None, parts: list[dict] | None = None) -> Patch:
    """One patch with every change of `patches` (disjoint; same base model). labels name them in errors.

    base: a checkpoint.ModelDir, needed when two patches change the same tensor. parts: what provenance
    records of each part (default: its provenance's kind and source).
    """
    if len(patches) < 2:
        raise InputError("combine needs at least two patches")
    configs = {p.provenance.get("base_config_sha256") for p in patches} - {None, ""}
    if len(configs) > 1:
        raise InputError(f"the patches were made for different base models ({', '.join(sorted(c[:12] for c in configs))})"
                         "; combine fuses patches of one base")
    by_name: dict[str, list[tuple[int, TensorPatch]]] = {}
    for k, p in enumerate(patches):
        for name, tp in p.tensors.items():
            by_name.setdefault(name, []).append((k, tp))
    for name, owners in by_name.items():
        for i, (a, ta) in enumerate(owners):
            for b, tb in owners[i + 1:]:
                if ta.shape != tb.shape or ta.dtype_name != tb.dtype_name:
                    raise InputError(f"{name}: {labels[a]} has {list(ta.shape)} {ta.dtype_name}, {labels[b]} "
                                     f"{list(tb.shape)} {tb.dtype_name}; they are not for one model")
                if intersects(ta.flat_index, tb.flat_index):
                    raise InputError(f"{labels[a]} and {labels[b]} both change elements of {name}; overlapping "
                                     "patches cannot be combined (apply them in order instead)")
    shared = [n for n, owners in by_name.items() if len(owners) > 1]
    if shared and base is None:
        raise InputError(f"{len(shared)} tensors (first: {shared[0]}) are changed by more than one patch; give "
                         "--base DIR (the model they were made for) to compute the combined fingerprints")
    tensors: dict[str, TensorPatch] = {}
    for name, owners in by_name.items():
        tensors[name] = owners[0][1] if len(owners) == 1 else _fuse(name, owners, labels, base)
    first = patches[0].provenance
    prov = {"kind": "combine", "source": " + ".join(labels), "base_model": first.get("base_model"),
            "base_config_sha256": next(iter(configs), None), "base_numel": first.get("base_numel"),
            "parts": parts or [{"kind": p.provenance.get("kind"), "source": p.provenance.get("source")} for p in patches],
            "created": now_iso(), "tool": "roselora-export"}
    out = Patch(tensors={}, provenance={k: v for k, v in prov.items() if v is not None})
    order = list(base.keys()) if base is not None else []
    out.tensors = {n: tensors[n] for n in order if n in tensors} | {n: t for n, t in tensors.items() if n not in order}
    return out


def _fuse(name: str, owners: list[tuple[int, TensorPatch]], labels: list[str], base) -> TensorPatch:
    """One tensor patch from disjoint parts, fingerprinted against the base's bits."""
    if name not in base.locations:
        raise InputError(f"{name}: not in --base {base.path}; wrong base model?")
    info = base.locations[name][1]
    ref = owners[0][1]
    if tuple(info.shape) != tuple(ref.shape) or info.dtype != ref.dtype_name:
        raise InputError(f"{name}: the patches are for {list(ref.shape)} {ref.dtype_name}, --base has "
                         f"{list(info.shape)} {info.dtype}; wrong base model?")
    bits = np.asarray(base.read_array(name)).reshape(-1)
    for k, tp in owners:
        if not holds_base(tp, bits[tp.flat_index]):
            raise InputError(f"{labels[k]}: {name}: fingerprint mismatch: --base does not hold the bits this patch "
                             "was made for; give the model the patches were made for")
    patched = bits.copy()
    for _, tp in owners:
        tp.apply_bits(patched)
    return tensor_patch_from_bits(name, tuple(ref.shape), ref.dtype_name, bits, patched)
