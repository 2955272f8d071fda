"""One table of the dtypes a checkpoint may store, under one vocabulary: the safetensors names.

"F32", "F16", "BF16", ... are the names everywhere in the package; `dtype_name` turns the other
spellings (torch dtypes, "float32", "fp32", "bf16") into them, `torch_dtype` goes the other way.
Floats are handled as their bit patterns (`BITS`: unsigned integers of the same width), so that
no numpy float rounding or NaN canonicalisation can touch them. Importing this imports neither
torch nor numpy (NUMPY and BITS, numpy dtypes, are built on first use).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    import numpy as np

# name: (torch / config.json name, bytes per element, numpy dtype of the stored values or their bits)
_TABLE = {
    "F64": ("float64", 8, "<f8"), "F32": ("float32", 4, "<u4"), "F16": ("float16", 2, "<u2"),
    "BF16": ("bfloat16", 2, "<u2"), "I64": ("int64", 8, "<i8"), "I32": ("int32", 4, "<i4"),
    "I16": ("int16", 2, "<i2"), "I8": ("int8", 1, "i1"), "U8": ("uint8", 1, "u1"), "BOOL": ("bool", 1, "?"),
}
ITEMSIZE: dict[str, int] = {k: v[1] for k, v in _TABLE.items()}
TORCH_NAMES: dict[str, str] = {k: v[0] for k, v in _TABLE.items()}  # what torch and config.json call them
PATCHABLE = ("F32", "F16", "BF16")  # the dtypes a patch can carry, merge can edit and --dtype converts
EXPONENT_MASK: dict[str, int] = {"F32": 0x7F800000, "F16": 0x7C00, "BF16": 0x7F80}  # all ones: Inf or NaN


def __getattr__(name: str):
    # NUMPY: name -> numpy dtype of the stored values (F32/F16/BF16 as their bits); BITS: the same, patchable only.
    if name in ("NUMPY", "BITS"):
        import numpy as np

        table = {k: np.dtype(v[2]) for k, v in _TABLE.items()}
        globals().update(NUMPY=table, BITS={k: table[k] for k in PATCHABLE})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SHORT_NAMES: dict[str, str] = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}  # what --dtype options say
_ALIASES = {**{v: k for k, v in TORCH_NAMES.items()}, **{v: k for k, v in SHORT_NAMES.items()},
            "half": "F16", "float": "F32"}


def dtype_name(dtype: object) -> str | None:
    """The safetensors name of a torch dtype, a safetensors name, a torch name or fp32/fp16/bf16; None if unknown."""
    if isinstance(dtype, str):
        if dtype in _TABLE:
            return dtype
        return _ALIASES.get(dtype.lower().removeprefix("torch."))
    text = str(dtype)  # a torch.dtype prints as "torch.float32"; no torch import needed to read it
    return _ALIASES.get(text.removeprefix("torch.")) if text.startswith("torch.") else None


def patchable_name(dtype: object) -> str:
    """dtype_name, limited to the patchable dtypes; InputError otherwise."""
    name = dtype_name(dtype)
    if name not in PATCHABLE:
        raise InputError(f"dtype {dtype} is not supported (fp32, fp16, bf16)")
    return name


def torch_dtype(name: str):
    """The torch dtype of a safetensors name, or of fp32/fp16/bf16 (imports torch)."""
    import torch

    return getattr(torch, TORCH_NAMES[dtype_name(name) or name])


def nonfinite(bits: np.ndarray, name: str) -> np.ndarray:
    """Where stored bit patterns of dtype `name` are NaN or Inf (exponent all ones)."""
    exp = bits.dtype.type(EXPONENT_MASK[name])
    return (bits & exp) == exp


def nonfinite_message(tensor: str) -> str:
    """The one refusal every target (checkpoint, ONNX, live model) gives for a patch that writes NaN or Inf."""
    return f"{tensor}: the patch would write NaN or Inf; refusing (the patch is corrupt or for another base)"


def check_finite(tensor: str, bits: np.ndarray, name: str) -> None:
    """InputError (nonfinite_message) if any of `bits`, values of dtype `name` about to be written, is NaN or Inf."""
    if bits.size and bool(nonfinite(bits, name).any()):
        raise InputError(nonfinite_message(tensor))
