"""The in-memory patch: what every other part (checkpoint, onnx, runtime) works with.

A patch holds, for each touched tensor, the flat (row-major) indices of the elements it
changes and, at those indices, base_bits XOR patched_bits in the tensor's stored dtype.
XOR is its own inverse, so apply (bits ^= x) and revert (bits ^= x) are exact in any dtype,
where float add-then-subtract would drift. The file encoding lives in `patch.io`; this module
knows nothing of files.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..core import dtypes
from ..errors import InputError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2

# The dtypes a patch can carry (safetensors names) -> the unsigned type of their bits; from core.dtypes, torch-free.
BITS_BY_NAME: dict[str, np.dtype] = dict(dtypes.BITS)
TORCH_NAMES = {k: dtypes.TORCH_NAMES[k] for k in dtypes.PATCHABLE}  # what torch and config.json call them


def _torch_tables() -> dict:
    import torch

    by_name = {k: dtypes.torch_dtype(k) for k in TORCH_NAMES}
    return {
        "DTYPE_NAMES": {v: k for k, v in by_name.items()},  # torch dtype -> safetensors name
        "DTYPES_BY_NAME": by_name,
        "BITS_DTYPE": {v: BITS_BY_NAME[k] for k, v in by_name.items()},
        # torch integer views of the same width, for device-side XOR (torch has no uint32 xor on all builds).
        "TORCH_BITS_DTYPE": {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16},
    }


_TORCH_TABLES = ("DTYPE_NAMES", "DTYPES_BY_NAME", "BITS_DTYPE", "TORCH_BITS_DTYPE")


def _table(name: str) -> dict:
    if name not in globals():
        globals().update(_torch_tables())
    return globals()[name]


def __getattr__(name: str):
    # The torch-keyed tables are built on first use, so that importing this module does not import torch.
    if name in _TORCH_TABLES:
        return _table(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_dtype_name(dtype) -> str:
    """The safetensors name ("F32", "F16", "BF16") of a torch dtype or of any name core.dtypes knows; InputError otherwise."""
    return dtypes.patchable_name(dtype)


def tensor_bits(t: torch.Tensor) -> np.ndarray:
    """The raw bit patterns of a CPU tensor, flattened, as an unsigned numpy array (a view when possible)."""
    TORCH_BITS_DTYPE, BITS_DTYPE = _table("TORCH_BITS_DTYPE"), _table("BITS_DTYPE")
    t = t.detach().contiguous()
    return t.view(TORCH_BITS_DTYPE[t.dtype]).numpy().reshape(-1).view(BITS_DTYPE[t.dtype])


def sha256_tensor(t: torch.Tensor) -> str:
    """Fingerprint of a whole tensor: sha256 of its little-endian bytes in row-major order."""
    return sha256_bits(tensor_bits(t.cpu()))


def sha256_bits(bits: np.ndarray) -> str:
    """sha256 of an array's bytes in row-major order (gathered bits, or a whole tensor's); no copy when contiguous."""
    return hashlib.sha256(np.ascontiguousarray(bits)).hexdigest()


@dataclass
class TensorPatch:
    """The change to one tensor.

    flat_index: int64, strictly increasing, each < numel. xor_bits: BITS_BY_NAME[dtype_name], same
    length, base ^ patched there. The sha256 fingerprints check the base whole (checkpoint files) or at
    the touched elements only (a live model). The dtype may be given as a torch dtype or a safetensors
    name, as `dtype_name` or `dtype`; it is kept as the name (`dtype` imports torch on first use)."""

    name: str
    shape: tuple[int, ...]
    dtype_name: str
    flat_index: np.ndarray
    xor_bits: np.ndarray
    base_sha256: str
    patched_sha256: str
    base_touched_sha256: str

    def __init__(self, name: str, shape: tuple[int, ...], dtype_name=None, flat_index: np.ndarray | None = None,
                 xor_bits: np.ndarray | None = None, base_sha256: str = "", patched_sha256: str = "",
                 base_touched_sha256: str = "", *, dtype=None):
        # Written out (the dataclass keeps its fields, repr and eq) to accept `dtype` as well: a
        # dataclasses.replace(tp, dtype=...) passes both, and then `dtype` is the new one.
        if dtype is None and dtype_name is None:
            raise TypeError("TensorPatch needs a dtype")
        self.name, self.shape = name, tuple(shape)
        self.dtype_name = to_dtype_name(dtype if dtype is not None else dtype_name)
        self.flat_index = flat_index if flat_index is not None else np.zeros(0, np.int64)
        self.xor_bits = xor_bits if xor_bits is not None else np.zeros(0, BITS_BY_NAME[self.dtype_name])
        self.base_sha256, self.patched_sha256, self.base_touched_sha256 = base_sha256, patched_sha256, base_touched_sha256

    @property
    def dtype(self) -> torch.dtype:
        return _table("DTYPES_BY_NAME")[self.dtype_name]

    @dtype.setter
    def dtype(self, value) -> None:
        self.dtype_name = to_dtype_name(value)

    @property
    def bits_dtype(self) -> np.dtype:
        return BITS_BY_NAME[self.dtype_name]

    @property
    def nnz(self) -> int:
        return int(self.flat_index.size)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def apply_bits(self, bits: np.ndarray) -> None:
        """XOR this patch into a flat bit array in place (apply and revert are the same operation)."""
        bits[self.flat_index] ^= self.xor_bits


@dataclass
class Patch:
    """An ordered set of TensorPatch, plus provenance (where it came from, for which base)."""

    tensors: dict[str, TensorPatch] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def total_nnz(self) -> int:
        return sum(t.nnz for t in self.tensors.values())


def tensor_patch_from_pair(name: str, base: torch.Tensor, patched: torch.Tensor) -> TensorPatch | None:
    """The patch that turns `base` into `patched` (same shape and dtype), or None if they are bit-identical."""
    if base.shape != patched.shape or base.dtype != patched.dtype:
        raise ValueError(f"{name}: base {tuple(base.shape)} {base.dtype} vs target {tuple(patched.shape)} {patched.dtype}")
    if base.dtype not in _table("BITS_DTYPE"):
        raise ValueError(f"{name}: dtype {base.dtype} is not supported (fp32, fp16, bf16)")
    return tensor_patch_from_bits(name, tuple(base.shape), to_dtype_name(base.dtype), tensor_bits(base.cpu()),
                                  tensor_bits(patched.cpu()))


def tensor_patch_from_bits(name: str, shape: tuple[int, ...], dtype: str, base_bits: np.ndarray,
                           new_bits: np.ndarray) -> TensorPatch | None:
    """The patch that turns flat bits `base_bits` into `new_bits` (dtype: "F32", "F16", "BF16"), or None if equal.
    The one pair-to-patch builder: one comparison pass, XOR only at the changed elements."""
    flat = np.flatnonzero(base_bits != new_bits).astype(np.int64)
    if flat.size == 0:
        return None
    old = base_bits[flat]
    tp = TensorPatch(name=name, shape=tuple(shape), dtype_name=dtype, flat_index=flat, xor_bits=old ^ new_bits[flat],
                     base_touched_sha256=sha256_bits(old))
    return fill_sha256(tp, base_bits, new_bits)


def fill_sha256(tp: TensorPatch, base_bits: np.ndarray, new_bits: np.ndarray) -> TensorPatch:
    """Set tp's whole-tensor sha256 of base and patched bits, hashing their common prefix (before the first
    changed element) once. hashlib releases the GIL, so this can run in a thread beside other work."""
    cut = int(tp.flat_index[0]) * base_bits.itemsize if tp.nnz else 0
    b, n = memoryview(base_bits.view(np.uint8)), memoryview(new_bits.view(np.uint8))
    h = hashlib.sha256(b[:cut])
    hn = h.copy()
    h.update(b[cut:])
    hn.update(n[cut:])
    tp.base_sha256, tp.patched_sha256 = h.hexdigest(), hn.hexdigest()
    return tp


def check_same_keys(base: Iterable[str], target: Iterable[str], base_label: str, target_label: str) -> None:
    """InputError unless a diff's two sides hold the same tensor names."""
    base, target = set(base), set(target)
    missing, extra = base - target, target - base
    if missing or extra:
        which = sorted(missing)[0] if missing else sorted(extra)[0]
        raise InputError(f"base and target have different tensors (first: {which} is only in "
                         f"{base_label if missing else target_label}); diff needs the same keys")


def diff_bits(name: str, shape: tuple[int, ...], dtype: str, base: np.ndarray, target: np.ndarray) -> TensorPatch | None:
    """The one diff of one tensor: its patch (None if unchanged), from stored arrays of safetensors dtype `dtype`.
    Other dtypes must be byte-identical; a target holding NaN or Inf where it differs is an InputError."""
    if dtype not in BITS_BY_NAME:
        if base.tobytes() != target.tobytes():
            raise InputError(f"{name}: dtype {dtype} differs between base and target; only fp32/fp16/bf16 can "
                             "be patched")
        return None
    tp = tensor_patch_from_bits(name, shape, dtype, base, target)
    if tp is not None and bool(dtypes.nonfinite(target[tp.flat_index], dtype).any()):
        raise InputError(f"{name}: the target contains NaN or Inf; refusing to write it")
    return tp
