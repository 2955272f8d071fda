"""merge_math: the merge arithmetic without torch, checked against exact arithmetic and against torch."""
from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from roselora_export.patch import merge_math
from roselora_export.patch.merge_math import fma_chain, fma_step, from_float32, merge_bits, to_float32
from test_patch_fixtures import needs_mkl

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
INT_VIEW = {"F32": torch.int32, "F16": torch.int16, "BF16": torch.int16}


def _round_f32(x: Fraction) -> np.float32:
    """Correct rounding of an exact rational to fp32 (nearest, ties to even), for the reference."""
    lo = np.float32(float(x))  # fp64 rounding first, then walk to the right fp32 neighbour exactly
    while Fraction(float(lo)) > x:
        lo = np.nextafter(lo, np.float32(-np.inf))
    while Fraction(float(np.nextafter(lo, np.float32(np.inf)))) <= x:
        lo = np.nextafter(lo, np.float32(np.inf))
    hi = np.nextafter(lo, np.float32(np.inf))
    d_lo, d_hi = x - Fraction(float(lo)), Fraction(float(hi)) - x
    if d_lo < d_hi or (d_lo == d_hi and int(lo.view(np.uint32)) % 2 == 0):
        return lo
    return hi


def _exact_chain(u_row: np.ndarray, v_row: np.ndarray) -> np.float32:
    acc = np.float32(0.0)
    for x, y in zip(u_row, v_row):
        acc = _round_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(acc)))
    return acc


def test_fma_chain_equals_exact_fused_multiply_adds_on_random_factors():
    rng = np.random.default_rng(0)
    n, r = 400, 8
    scale = np.float32(2.0) ** rng.integers(-30, 30, size=(n, r)).astype(np.float32)
    u = (rng.standard_normal((n, r)) * scale).astype(np.float32)
    v = rng.standard_normal((n, r)).astype(np.float32)
    got = fma_chain(u, v)
    want = np.array([_exact_chain(u[i], v[i]) for i in range(n)], np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_fma_chain_rounds_a_sum_that_fp64_puts_exactly_on_an_fp32_tie_the_exact_way():
    # acc = 2^30 + 2^7 (odd last bit); the product 2^6 (1 - 2^-46) makes the exact sum just below the tie
    # 2^30 + 2^7 + 2^6. fp64 rounds the sum onto that tie, and ties-to-even would then go up to 2^30 + 2^8.
    u = np.array([[2.0 ** 30 + 2.0 ** 7, 2.0 ** 6 * (1 + 2.0 ** -23)]], np.float32)
    v = np.array([[1.0, 1 - 2.0 ** -23]], np.float32)
    naive = np.float32(np.float64(u[0, 0]) * v[0, 0] + np.float64(u[0, 1]) * v[0, 1])
    exact = _exact_chain(u[0], v[0])
    assert exact == np.float32(2.0 ** 30 + 2.0 ** 7) and naive != exact  # the case is the hard one
    assert fma_chain(u, v)[0] == exact


def test_fma_step_rounds_subnormal_sums_and_their_ties_exactly():
    # In the fp32-subnormal range ties are odd multiples of 2^-150. Here fp64 puts the sum one ulp from
    # such a tie (reproduction from review: acc 0x00400001 * 2^-149, u = 721 * 2^-90, v = 14892397 * 2^-91).
    cases = []
    for m in (0x400001, 0x400002, 0x7FFFFF, 0x5A5A5B):
        for sign in (1, -1):
            for other in (1, -1):
                cases.append((sign * m * 2.0 ** -149, other * sign * 721 * 2.0 ** -90, 14892397 * 2.0 ** -91))
    rng = np.random.default_rng(3)
    for _ in range(500):  # random sums in the subnormal range whose fp64 addition is inexact
        cases.append((int(rng.integers(-2 ** 23, 2 ** 23)) * 2.0 ** -149,
                      int(rng.integers(2 ** 23, 2 ** 24)) * 2.0 ** -int(rng.integers(80, 100)),
                      int(rng.integers(-2 ** 24, 2 ** 24)) * 2.0 ** -int(rng.integers(60, 80))))
    acc, u, v = (np.array(c, np.float32) for c in zip(*cases))
    want = np.array([_round_f32(Fraction(float(a)) + Fraction(float(x)) * Fraction(float(y))) for a, x, y in cases],
                    np.float32)
    assert np.array_equal(fma_step(acc, u, v).view(np.uint32), want.view(np.uint32))


def test_fma_step_rounds_past_the_largest_float_to_inf_without_warnings():
    big = np.float32(np.finfo(np.float32).max)
    with np.errstate(all="raise"):
        got = fma_step(np.array([big], np.float32), np.array([big], np.float32), np.array([2.0], np.float32))
    assert np.isposinf(got[0])


@needs_mkl
def test_fma_chain_equals_torch_matmul_here():
    # What makes the merge equal PEFT's on this machine: MKL's sgemm accumulates k in order with FMA.
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(300, 16, generator=g), torch.randn(16, 200, generator=g)
    want = (b @ a).numpy()
    i, j = np.meshgrid(np.arange(300), np.arange(200), indexing="ij")
    got = fma_chain(b.numpy()[i.ravel()], a.numpy().T[j.ravel()]).reshape(300, 200)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_rounding_to_half_precision_matches_torch_for_every_upper_half_and_the_tricky_lower_ones(dtype):
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1000, 0x2000, 0x0FFF, 0x1001], np.uint32)
    bits = (hi[:, None] | lows[None, :]).ravel()
    values = bits.view(np.float32)
    want = torch.from_numpy(values.copy()).to(TORCH[dtype]).view(torch.int16).numpy().view(np.uint16)
    got = from_float32(values, dtype)
    finite = np.isfinite(values)
    assert np.array_equal(got[finite], want[finite])
    assert np.all(np.isnan(to_float32(got[~finite & np.isnan(values)], dtype)))
    assert np.array_equal(to_float32(got, dtype)[finite], torch.from_numpy(want.view(np.int16).copy())
                          .view(TORCH[dtype]).float().numpy()[finite])


def _edit(b, a, scaling, transposed=False):
    return SimpleNamespace(a=a, b=b, scaling=scaling, transposed=transposed, is_delta=True, replacement=None,
                           shape=(a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1]))


def _torch_merge(base: torch.Tensor, b, a, scaling, dtype, transposed=False) -> torch.Tensor:
    delta = (torch.from_numpy(b) @ torch.from_numpy(a)) * scaling
    if transposed:
        delta = delta.T
    return (base.to(dtype).float() + delta).to(dtype)


def _sparse_factors(rng, out, inp, r, keep):
    a = np.zeros((r, inp), np.float32)
    b = np.zeros((out, r), np.float32)
    for k in range(r):
        a[k, rng.choice(inp, keep, replace=False)] = rng.standard_normal(keep)
        b[rng.choice(out, keep, replace=False), k] = rng.standard_normal(keep)
    return b, a


@needs_mkl
@pytest.mark.parametrize("base_dtype,out_dtype", [("F32", "F32"), ("F16", "F16"), ("BF16", "BF16"), ("F32", "BF16"),
                                                  ("BF16", "F32")])
@pytest.mark.parametrize("transposed", [False, True])
def test_merge_bits_equals_the_torch_merge_in_every_dtype_and_layout(base_dtype, out_dtype, transposed):
    rng = np.random.default_rng(2)
    b, a = _sparse_factors(rng, 96, 80, 8, 9)
    shape = (80, 96) if transposed else (96, 80)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(TORCH[base_dtype])
    base_bits = base.view(INT_VIEW[base_dtype]).numpy().reshape(-1).view(f"<u{base.element_size()}")
    m = merge_bits("w", base_bits, base_dtype, shape, _edit(b, a, 2.0, transposed), out_dtype)
    want = _torch_merge(base, b, a, 2.0, TORCH[out_dtype], transposed)
    want_bits = want.view(INT_VIEW[out_dtype]).numpy().reshape(-1).view(m.bits.dtype)
    assert np.array_equal(m.bits, want_bits)
    assert m.patch is not None and m.patch.nnz == int((m.bits != m.base_bits).sum()) > 0


@pytest.mark.parametrize("transposed", [False, True])
def test_the_delta_is_computed_exactly_on_the_union_of_the_rank_rectangles(monkeypatch, transposed):
    rng = np.random.default_rng(8)
    b, a = _sparse_factors(rng, 300, 200, 6, 35)
    b[5, :] = 1.0  # a row in every rectangle, and a column of A in none
    a[:, 7] = 0.0
    shape = (200, 300) if transposed else (300, 200)
    monkeypatch.setattr(merge_math, "CHUNK_ELEMENTS", 1000)  # several row blocks
    parts = list(merge_math.lora_delta(_edit(b, a, 1.0, transposed), shape))
    flat, delta = np.concatenate([f for f, _ in parts]), np.concatenate([d for _, d in parts])
    want = set()
    for k in range(6):
        for i in np.flatnonzero(b[:, k]):
            for j in np.flatnonzero(a[k]):
                want.add(j * 300 + i if transposed else i * 200 + j)
    assert np.array_equal(flat, np.array(sorted(want)))
    # The values: each rank only on its own rectangle gives what the chain over every rank gives.
    i, j = np.divmod(flat, shape[1])
    brow, acol = (j, i) if transposed else (i, j)
    assert np.array_equal(delta.view(np.uint32), fma_chain(b[brow], a.T[acol]).view(np.uint32))


def test_a_sum_that_ends_at_negative_zero_meets_the_later_ranks_zero_terms():
    # Rank 0 underflows to -0.0 at (0, 0); rank 1 adds +0 there (+0 * 1), which makes it +0.0, so a base
    # -0.0 at (0, 0) becomes +0.0, as in torch. Skipping rank 1 outside its rectangle must not change that.
    b = np.array([[-2.0 ** -76, 0.0], [0.0, 1.0]], np.float32)
    a = np.array([[2.0 ** -76, 0.0], [1.0, 0.0]], np.float32)
    base = np.array([-0.0, 1.0, 2.0, 3.0], np.float32).view(np.uint32)
    m = merge_bits("w", base, "F32", (2, 2), _edit(b, a, 1.0))
    assert m.bits[0] == 0 and m.patch is not None and m.patch.flat_index.tolist()[0] == 0
    want = fma_chain(np.array([[-2.0 ** -76, 0.0]], np.float32), np.array([[2.0 ** -76, 1.0]], np.float32))
    assert want[0] == 0 and not np.signbit(want[0])


def test_a_dense_lora_merged_in_many_chunks_equals_one_chunk_and_the_chain_over_every_element(monkeypatch):
    rng = np.random.default_rng(4)
    b, a = rng.standard_normal((64, 4)).astype(np.float32), rng.standard_normal((4, 48)).astype(np.float32)
    base = rng.standard_normal(64 * 48).astype(np.float32)
    one = merge_bits("w", base.view(np.uint32), "F32", (64, 48), _edit(b, a, 0.5))
    monkeypatch.setattr(merge_math, "CHUNK_ELEMENTS", 100)  # two rows at a time
    many = merge_bits("w", base.view(np.uint32), "F32", (64, 48), _edit(b, a, 0.5))
    assert np.array_equal(one.bits, many.bits) and np.array_equal(one.patch.flat_index, many.patch.flat_index)
    i, j = np.divmod(np.arange(64 * 48), 48)
    want = base + fma_chain(b[i], a.T[j]) * np.float32(0.5)
    assert np.array_equal(one.bits, want.view(np.uint32))


@pytest.mark.parametrize("scaling", [2.0, -2.0])
def test_negative_zeros_outside_the_delta_become_what_torch_makes_of_them(scaling):
    rng = np.random.default_rng(5)
    b, a = _sparse_factors(rng, 32, 32, 2, 3)
    base = torch.randn(32, 32, generator=torch.Generator().manual_seed(6))
    base[0, :] = -0.0  # most of these are outside the delta's support
    base_bits = base.view(torch.int32).numpy().reshape(-1).view(np.uint32)
    m = merge_bits("w", base_bits, "F32", (32, 32), _edit(b, a, scaling))
    want = _torch_merge(base, b, a, scaling, torch.float32)
    assert np.array_equal(m.bits, want.view(torch.int32).numpy().reshape(-1).view(np.uint32))
    plus_zeros = int((m.bits[:32] == 0).sum())  # row 0 was all -0.0
    assert plus_zeros > 20 if scaling > 0 else plus_zeros == 0


def test_merge_bits_never_writes_into_the_base_array():
    rng = np.random.default_rng(7)
    b, a = _sparse_factors(rng, 16, 16, 2, 4)
    base = rng.standard_normal(256).astype(np.float32).view(np.uint32)
    before = base.copy()
    m = merge_bits("w", base, "F32", (16, 16), _edit(b, a, 1.0))
    assert m.patch is not None and np.array_equal(base, before) and not np.array_equal(m.bits, before)


@pytest.mark.parametrize("dtype", [None, "bf16"], ids=["stored dtype", "converting to bf16"])
def test_merging_a_checkpoint_in_a_fresh_process_never_imports_torch(tmp_path, dtype):
    from test_patch_fixtures import make_adapter, tiny_llama_dir

    base = tiny_llama_dir(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    code = (f"import sys; from roselora_export.checkpoint import merge_checkpoint; "
            f"r = merge_checkpoint({str(base)!r}, {str(adapter)!r}, {str(tmp_path / 'out')!r}, dtype={dtype!r}); "
            f"assert r.patch.total_nnz > 0; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
