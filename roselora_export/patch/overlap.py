"""The touched-element rule: when a patch may be applied or reverted on a tensor that other patches changed.

One rule for checkpoints, ONNX artifacts and live models (runtime.live): a patch applies when the
elements it touches hold its base bits (sha256 of the gathered bits equals `base_touched_sha256`),
and reverts when they hold its patched bits (base ^ xor_bits). Patches on disjoint elements of one
tensor therefore stack and revert in any order; a patch that overlaps another applies only on top of
it and reverts only before it (LIFO among overlapping patches). Whole-tensor fingerprints remain the
stronger check of a fresh base; this rule is what holds once other patches changed the same tensor.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .model import Patch, TensorPatch, sha256_bits

APPLIES, DONE, CONFLICT = "applies", "done", "conflict"


def holds_base(tp: TensorPatch, gathered: np.ndarray) -> bool:
    """Whether `gathered` (the bits at tp.flat_index, in index order) are the patch's base bits."""
    return sha256_bits(gathered) == tp.base_touched_sha256


def holds_patched(tp: TensorPatch, gathered: np.ndarray) -> bool:
    """Whether `gathered` are the bits the patch writes (base ^ xor_bits)."""
    return sha256_bits(np.asarray(gathered) ^ tp.xor_bits) == tp.base_touched_sha256


def touched_state(tp: TensorPatch, gathered: np.ndarray, *, revert: bool = False) -> str:
    """APPLIES when the patch can be applied (revert: reverted) on these bits, DONE when that already
    happened (the bits are its result, or its base for a revert), CONFLICT when they are neither."""
    ready, done = (holds_patched, holds_base) if revert else (holds_base, holds_patched)
    if ready(tp, gathered):
        return APPLIES
    return DONE if done(tp, gathered) else CONFLICT


def intersects(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two sorted index arrays share an element (binary search of the smaller in the larger)."""
    if a.size > b.size:
        a, b = b, a
    if a.size == 0 or a[-1] < b[0] or b[-1] < a[0]:
        return False
    pos = np.searchsorted(b, a)
    pos[pos == b.size] = b.size - 1
    return bool(np.any(b[pos] == a))


def content_sha256(patch: Patch) -> str:
    """sha256 of what a patch changes (names, shapes, dtypes, indices, XOR bits), independent of its file
    encoding: identifies one patch whether it was loaded from a file or built in memory."""
    h = hashlib.sha256()
    for name in sorted(patch.tensors):
        tp = patch.tensors[name]
        h.update(f"{name}\0{list(tp.shape)}\0{tp.dtype_name}\0{tp.nnz}\0".encode())
        h.update(np.ascontiguousarray(tp.flat_index, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(tp.xor_bits).tobytes())
    return h.hexdigest()
