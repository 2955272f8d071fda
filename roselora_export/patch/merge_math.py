"""The merge arithmetic, in numpy only: one definition of the merged bits that every path shares.

    acc     = 0;  for k = 0, 1, ..., r - 1:  acc = fma(B[i, k], A[k, j], acc)   # fp32, one rounding each
    delta   = fp32(acc * fp32(scaling))
    merged  = to_dtype( fp32(base_in_dtype) + delta )                       # the add in fp32, as PEFT does

PEFT's merge with a BLAS that sums over k in order with fused multiply-adds, computed exactly, so the
bits are the same on every machine; conversions round to nearest-even as torch's. Why and how: docs/design.md
"The merge arithmetic". No torch here: a fresh `roselora-export merge` process merges without importing it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.dtypes import nonfinite
from ..errors import InputError
from .model import BITS_BY_NAME, TensorPatch, sha256_bits

LOST_WARNING = 0.5  # warn when more than this fraction of an edit's nonzeros change no stored value
SIGN_BIT = {"F32": 0x80000000, "F16": 0x8000, "BF16": 0x8000}  # -0.0


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


# ----------------------------------------------------------------------------- dtype conversions

def to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """The fp32 values of stored bit patterns (exact: fp16 and bf16 widen without rounding)."""
    if dtype == "F32":
        return bits.view(np.float32)
    if dtype == "F16":
        return bits.view(np.float16).astype(np.float32)
    import ml_dtypes  # here, not at the top: its import alone costs most of a second

    return bits.view(ml_dtypes.bfloat16).astype(np.float32)


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """The bit patterns of fp32 values rounded to `dtype` (nearest, ties to even), as torch's .to(dtype)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "F32":
        return values.view(np.uint32)
    with np.errstate(over="ignore", invalid="ignore"):  # beyond the range rounds to Inf, NaN stays NaN
        if dtype == "F16":
            return values.astype(np.float16).view(np.uint16)
        import ml_dtypes

        return values.astype(ml_dtypes.bfloat16).view(np.uint16)


def convert_bits(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Stored bits of one dtype as another (through fp32, as torch converts fp16 <-> bf16)."""
    return bits if src == dst else from_float32(to_float32(bits, src), dst)


def float_values(array: np.ndarray, dtype: str) -> np.ndarray:
    """An adapter tensor read from safetensors as float values: fp32, or fp64 when stored so (bf16 as its bits)."""
    if dtype == "F64":
        return array.astype(np.float64, copy=False)
    if dtype in BITS_BY_NAME:
        return to_float32(array.view(BITS_BY_NAME[dtype]), dtype)
    raise InputError(f"dtype {dtype} is not a float type")


# ----------------------------------------------------------------------------- the delta

CHUNK_ELEMENTS = 1 << 18  # candidate elements computed at once: bounds the temporaries of a dense LoRA


def fma_step(acc: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """fp32 fma(u, v, acc), elementwise, correctly rounded (u, v, acc: fp32 arrays of one shape).

    The fp64 product of two fp32 numbers is exact, and fp64 rounding of the sum cannot cross an fp32
    tie (ties are fp64 numbers), only land on one. So the fp32 rounding of the fp64 sum is the fused
    result except where that sum is exactly a tie; there the exact error of the fp64 sum (TwoSum)
    says which way to round. A tie has its 29 bits below fp32 precision equal to 1000...0, or, in the
    fp32-subnormal range (spacing 2^-149), is an odd multiple of 2^-150.
    """
    p = u.astype(np.float64) * v
    total = p + acc
    with np.errstate(over="ignore"):  # beyond fp32's range rounds to Inf, as the fused operation does
        rounded = total.astype(np.float32)
    tie = (total.view(np.uint64) & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)
    sub = np.abs(total) < 2.0 ** -126
    if sub.any():
        j = np.nonzero(sub)
        tie[j] = np.fmod(np.abs(total[j]) * 2.0 ** 150, 2.0) == 1.0  # exact: a power-of-two scaling
    if tie.any():
        i = np.nonzero(tie)
        t, a, b = total[i], p[i], acc[i].astype(np.float64)
        bv = t - a
        err = (a - (t - bv)) + (b - bv)  # exact: a + b = t + err
        off = err != 0
        t[off] = np.nextafter(t[off], np.copysign(np.inf, err[off]))  # off the tie, towards the exact sum
        with np.errstate(over="ignore"):
            rounded[i] = t.astype(np.float32)
    return rounded


def fma_chain(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row-wise sum_k u[:, k] * v[:, k] in fp32, in k order, each step a correctly rounded fused multiply-add."""
    acc = np.zeros(u.shape[0], np.float32)
    for k in range(u.shape[1]):
        acc = fma_step(acc, u[:, k], v[:, k])
    return acc


def lora_delta(edit, shape: tuple[int, ...]):
    """The delta of a LoRA edit where B @ A has a term, in chunks: yields (flat indices, fp32 delta) in order.

    Element (i, j) has a term for rank k when B[i, k] and A[k, j] are both nonzero: it lies in the
    rectangle rows_k x cols_k. RoseLoRA keeps few nonzeros per row of A and column of B, so these
    rectangles cover a small part of the weight. A rank whose term is zero at an element leaves its
    fused sum unchanged (fma(0, x, acc) = acc), so each rank updates only its own rectangle.
    Everywhere else the delta is zero_delta(scaling).
    """
    # u[i] and v[j]: the factors that meet at stored element (i, j), whichever way the weight is stored.
    a, b = np.asarray(edit.a, np.float32), np.asarray(edit.b, np.float32)
    u, v = (a.T, b) if edit.transposed else (b, a.T)
    ncols = shape[1]
    scaling = np.float32(edit.scaling)  # as torch multiplies an fp32 tensor by a Python float
    ranks = [(np.flatnonzero(u[:, k]), np.flatnonzero(v[:, k])) for k in range(u.shape[1])]
    ranks = [(k, rk, ck) for k, (rk, ck) in enumerate(ranks) if rk.size and ck.size]
    if not ranks:
        return
    rows = np.unique(np.concatenate([rk for _, rk, _ in ranks]))
    cols = np.unique(np.concatenate([ck for _, _, ck in ranks]))
    local_cols = [np.searchsorted(cols, ck) for _, _, ck in ranks]
    step = max(1, CHUNK_ELEMENTS // cols.size)
    for lo in range(0, rows.size, step):
        block = rows[lo:lo + step]
        acc = np.zeros((block.size, cols.size), np.float32)  # the block's rows x every column any rank touches
        mask = np.zeros(acc.shape, bool)
        for (k, rk, ck), lc in zip(ranks, local_cols):
            rk = rk[(rk >= block[0]) & (rk <= block[-1])]
            if rk.size == 0:
                continue
            lr = np.searchsorted(block, rk)
            if lr.size == block.size and lc.size == cols.size:  # the whole block (a dense LoRA)
                acc = fma_step(acc, u[block, k][:, None], v[cols, k][None, :])
                mask[:] = True
                continue
            grid = np.ix_(lr, lc)
            acc[grid] = fma_step(acc[grid], u[rk, k][:, None], v[ck, k][None, :])
            mask[grid] = True
        r, c = np.nonzero(mask)
        vals = acc[r, c]
        # A sum that ends at -0.0 (a negative term that underflowed) would be turned into +0.0 by any later
        # rank's zero term (-0 + +0 = +0), which the rectangles skipped: those few run every rank.
        z = np.flatnonzero((vals == 0) & np.signbit(vals))
        if z.size:
            vals[z] = fma_chain(u[block[r[z]]], v[cols[c[z]]])
        with np.errstate(over="ignore"):
            yield block[r].astype(np.int64) * ncols + cols[c], vals * scaling


def zero_delta(scaling: float) -> np.float32:
    """The delta where B @ A has no term: +0.0 times scaling (its sign decides what base + delta makes of -0.0)."""
    return np.float32(0.0) * np.float32(scaling)


# ----------------------------------------------------------------------------- one tensor

@dataclass
class Merged:
    """One merged tensor: its bits (flat, in the stored dtype), the base's in that dtype, patch and survival.
    When nothing changed, `bits` and `base_bits` may be the caller's own (possibly read-only) array."""

    bits: np.ndarray
    base_bits: np.ndarray
    patch: TensorPatch | None
    survival: Survival


def merge_bits(name: str, base_bits: np.ndarray, base_dtype: str, shape: tuple[int, ...], edit,
               out_dtype: str | None = None) -> Merged:
    """Merge one adapter edit (patch.adapter.AdapterEdit) into one tensor's stored bits.

    base_bits: the flat bit patterns in `base_dtype` ("F32", "F16", "BF16"); out_dtype: the dtype to
    store the merge in (None keeps the base's). The patch is relative to the base in out_dtype; its
    whole-tensor sha256 are left empty for the caller (fill_sha256), which may hash elsewhere.
    """
    out_dtype = out_dtype or base_dtype
    if base_dtype not in BITS_BY_NAME or out_dtype not in BITS_BY_NAME:
        raise InputError(f"{name}: dtype {base_dtype} cannot be edited (fp32, fp16, bf16 only)")
    shape = tuple(shape)
    if tuple(edit.shape) != shape:
        raise InputError(f"{name}: the adapter's {'delta' if edit.is_delta else 'new value'} has shape "
                         f"{tuple(edit.shape)}, the base {shape}; is this adapter for this base model?")
    source = base_bits.reshape(-1)
    base = convert_bits(source, base_dtype, out_dtype)
    if edit.is_delta:
        if len(shape) != 2:
            raise InputError(f"{name}: a LoRA delta needs a 2-D weight, the base has shape {shape}")
        parts = list(lora_delta(edit, shape))
        flat = np.concatenate([f for f, _ in parts]) if parts else np.zeros(0, np.int64)
        delta = np.concatenate([d for _, d in parts]) if parts else np.zeros(0, np.float32)
        want = delta.astype(np.float64)
        old = base[flat]
        with np.errstate(over="ignore"):  # an overflow is refused below, as NaN or Inf
            new = from_float32(to_float32(old, out_dtype) + delta, out_dtype)
        extra = _negative_zeros(base, out_dtype, zero_delta(edit.scaling), flat)
        if extra is not None:
            flat, old, new, want = _with_extra(flat, old, new, want, extra, base)
    else:
        flat, old = np.arange(base.size, dtype=np.int64), base
        replacement = np.asarray(edit.replacement).reshape(-1)
        with np.errstate(over="ignore"):
            new = from_float32(replacement, out_dtype)
        want = replacement.astype(np.float64) - to_float32(source, base_dtype)
    changed = old != new
    if bool(nonfinite(new[changed | (want != 0)], out_dtype).any()):
        raise InputError(f"{name}: the merged tensor contains NaN or Inf; refusing to write it")
    survival = _survival(name, want, to_float32(new, out_dtype).astype(np.float64) - to_float32(old, out_dtype))
    if not changed.any():
        return Merged(base, base, None, survival)
    index, old, new = flat[changed], old[changed], new[changed]
    bits = base.copy()  # base stays: its sha256 is the patch's base fingerprint
    bits[index] = new
    tp = TensorPatch(name=name, shape=shape, dtype_name=out_dtype, flat_index=index, xor_bits=old ^ new,
                     base_sha256="", patched_sha256="", base_touched_sha256=sha256_bits(old))
    survival.realised_nnz = tp.nnz
    return Merged(bits, base, tp, survival)


def _negative_zeros(base: np.ndarray, dtype: str, zero: np.float32, covered: np.ndarray) -> np.ndarray | None:
    """Flat indices outside `covered` where base + a zero delta changes the bits: -0.0 + +0.0 is +0.0."""
    if np.signbit(zero):
        return None  # -0.0 + -0.0 stays -0.0, and x + -0.0 is x for every other x
    neg = np.flatnonzero(base == base.dtype.type(SIGN_BIT[dtype]))
    if neg.size == 0:
        return None
    neg = neg[~np.isin(neg, covered)]
    return neg if neg.size else None


def _with_extra(flat, old, new, want, extra, base):
    """Add the elements `extra` (outside the delta's block, where the delta is zero) to the merge's lists."""
    plus_zero = np.zeros(extra.size, base.dtype)
    flat = np.concatenate([flat, extra])
    order = np.argsort(flat, kind="stable")
    return (flat[order], np.concatenate([old, base[extra]])[order], np.concatenate([new, plus_zero])[order],
            np.concatenate([want, np.zeros(extra.size)])[order])


def _survival(name: str, want: np.ndarray, got: np.ndarray) -> Survival:
    intended = want != 0
    want, got = want[intended], got[intended]
    norm2 = float((want ** 2).sum())
    err = float(((got - want) ** 2).sum())
    return Survival(name=name, intended_nnz=int(intended.sum()), lost_nnz=int((got == 0).sum()), realised_nnz=0,
                    rel_l2_error=float(np.sqrt(err / norm2)) if norm2 > 0 else 0.0, norm2=norm2)
