"""Apply and revert a patch on tensors: the same XOR, guarded by fingerprints, bit-exact in every dtype."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ..core.dtypes import check_finite
from ..errors import InputError
from .merge_math import to_float32
from .model import Patch, TensorPatch, sha256_bits, tensor_bits

if TYPE_CHECKING:
    import torch


def check_stored(tp: TensorPatch, shape: tuple[int, ...], dtype: str) -> None:
    """Shape and dtype (a safetensors name) must match the patch exactly."""
    if tuple(shape) != tuple(tp.shape) or dtype != tp.dtype_name:
        raise InputError(f"{tp.name}: the patch is for {list(tp.shape)} {tp.dtype_name}, the model has "
                         f"{list(shape)} {dtype}; wrong base model or --dtype?")


def check_compatible(tp: TensorPatch, t: torch.Tensor) -> None:
    """Shape and dtype of a torch tensor must match the patch exactly."""
    from .model import DTYPE_NAMES

    check_stored(tp, tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype)))


def expected_state(tp: TensorPatch, bits: np.ndarray, *, revert: bool) -> None:
    """Check a whole tensor's fingerprint: it must be the patch's base (apply) or its result (revert)."""
    sha = sha256_bits(bits)
    want, other = (tp.patched_sha256, tp.base_sha256) if revert else (tp.base_sha256, tp.patched_sha256)
    if sha == want:
        return
    if sha == other:
        raise InputError(f"{tp.name}: the patch is {'not applied' if revert else 'already applied'} here; "
                         f"refusing to {'revert' if revert else 'apply'} it {'' if revert else 'twice'}".rstrip())
    raise InputError(f"{tp.name}: fingerprint mismatch: this tensor is not the one the patch was "
                     f"{'made to produce' if revert else 'made for'} (wrong base model, or other patches applied "
                     "in a different order)")


def check_result(tp: TensorPatch, before_sha: str, after_sha: str, *, revert: bool) -> None:
    """A tensor that held the patch's whole base (apply) or result (revert) must hold the other one after the
    XOR; otherwise the patch is corrupt or forged (could be neither reverted nor applied again): refused."""
    want, other = (tp.patched_sha256, tp.base_sha256) if revert else (tp.base_sha256, tp.patched_sha256)
    if before_sha == want and after_sha != other:
        raise InputError(f"{tp.name}: the XOR does not give the patch's {'base' if revert else 'patched'} fingerprint; "
                         "the patch is corrupt or forged; refusing it (nothing was written)")


def xor_bits(tp: TensorPatch, bits: np.ndarray, *, revert: bool = False, check: bool = True) -> np.ndarray:
    """New flat bits: `bits` (not modified) with the patch applied (or reverted); fingerprint and finiteness checked."""
    if check:
        expected_state(tp, bits, revert=revert)
    out = bits.copy()
    tp.apply_bits(out)
    check_finite(tp.name, out[tp.flat_index], tp.dtype_name)
    if check:
        check_result(tp, sha256_bits(bits), sha256_bits(out), revert=revert)
    return out


def xor_tensor(tp: TensorPatch, t: torch.Tensor, *, revert: bool = False, check: bool = True) -> torch.Tensor:
    """A new tensor: `t` with the patch applied (or reverted). Checks shape, dtype, fingerprint, finiteness."""
    import torch

    check_compatible(tp, t)
    bits = xor_bits(tp, tensor_bits(t.detach().cpu()), revert=revert, check=check)
    return torch.from_numpy(bits.view(np.dtype(f"<i{bits.dtype.itemsize}"))).view(t.dtype).reshape(t.shape)


def apply_to_state_dict(patch: Patch, sd: Mapping[str, torch.Tensor], *, revert: bool = False,
                        check: bool = True) -> dict[str, torch.Tensor]:
    """A new state dict with `patch` applied (or reverted); untouched tensors are shared, `sd` is not modified.
    Every touched tensor is checked (shape, dtype, whole-tensor fingerprint) before any is changed."""
    missing = [n for n in patch.tensors if n not in sd]
    if missing:
        raise InputError(f"the patch changes {missing[0]}, which this model does not have; wrong base model?")
    if check:
        for name, tp in patch.tensors.items():
            check_compatible(tp, sd[name])
            expected_state(tp, tensor_bits(sd[name].detach().cpu()), revert=revert)
    out = dict(sd)
    for name, tp in patch.tensors.items():
        out[name] = xor_tensor(tp, sd[name], revert=revert, check=False)
    return out


def delta_csr(patch: Patch, name: str, base_tensor: torch.Tensor) -> scipy.sparse.csr_array:  # noqa: F821
    """The arithmetic delta (patched - base, float64) of one tensor as a CSR matrix in its 2-D view (1-D: one
    row). The file stores XOR bit patterns, so the numeric delta needs the base values."""
    from .io import matrix_shape

    if name not in patch.tensors:
        raise InputError(f"the patch does not touch {name}")
    tp = patch.tensors[name]
    check_compatible(tp, base_tensor)
    bits = tensor_bits(base_tensor.detach().cpu())
    old = bits[tp.flat_index]
    old_v, new_v = (to_float32(b, tp.dtype_name).astype(np.float64) for b in (old, old ^ tp.xor_bits))
    nrows, ncols = matrix_shape(tp.shape)
    rows, cols = np.divmod(tp.flat_index, max(ncols, 1))
    import scipy.sparse  # here, not at module level: it costs ~0.2 s of start-up that merge/apply never use

    return scipy.sparse.csr_array((new_v - old_v, (rows, cols)), shape=(nrows, ncols))
