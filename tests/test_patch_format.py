"""The patch file: round trip, encodings, plain safetensors readability, exactness, compactness."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from roselora_export.patch import (
    apply_to_state_dict,
    build_patch_from_state_dicts,
    config_fingerprint,
    delta_csr,
    load_patch,
    save_patch,
    tensor_patch_from_pair,
)
from roselora_export.patch.model import Patch, TensorPatch, sha256_tensor
from test_patch_fixtures import needs_mkl

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rose_pair(d_out=256, d_in=256, r=8, tau=0.05, dtype=torch.float16, seed=0, clamp=3e-3, scaling=4.0):
    """A base weight and its RoseLoRA-merged value (row/column-sparse A, B at the clamp), plus the rectangles."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(d_out, d_in, generator=g) * 0.05).to(dtype)
    a, b = torch.zeros(r, d_in), torch.zeros(d_out, r)
    rects = []
    for i in range(r):
        ca = torch.randperm(d_in, generator=g)[: math.ceil(tau * d_in)]
        rb = torch.randperm(d_out, generator=g)[: math.ceil(tau * d_out)]
        a[i, ca] = (torch.randint(0, 2, (ca.numel(),), generator=g) * 2 - 1).float() * clamp
        b[rb, i] = (torch.randint(0, 2, (rb.numel(),), generator=g) * 2 - 1).float() * clamp
        rects.append((np.sort(rb.numpy()), np.sort(ca.numpy())))
    merged = (base.float() + scaling * (b @ a)).to(dtype)
    return base, merged, rects


def _entries(path):
    """The metadata's per-tensor columns, as one dict per tensor."""
    with safe_open(str(path), framework="numpy") as f:
        columns = json.loads(f.metadata()["tensors"])
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_round_trip_preserves_indices_bits_fingerprints_and_provenance(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(40, 70, generator=g).to(dtype), "b": torch.randn(9, generator=g).to(dtype)}
    target = {"w": base["w"].clone(), "b": base["b"] * 2}
    target["w"][3, [1, 5, 69]] += 1
    target["w"][17] -= 0.5
    patch = build_patch_from_state_dicts(base, target, provenance={"source": "unit"})
    save_patch(patch, tmp_path / "p.safetensors")
    back = load_patch(tmp_path / "p.safetensors")
    assert list(back.tensors) == list(patch.tensors)
    for name, tp in patch.tensors.items():
        got = back.tensors[name]
        assert np.array_equal(got.flat_index, tp.flat_index)
        assert np.array_equal(got.xor_bits, tp.xor_bits) and got.xor_bits.dtype == tp.xor_bits.dtype
        assert (got.base_sha256, got.patched_sha256, got.base_touched_sha256) == (
            tp.base_sha256, tp.patched_sha256, tp.base_touched_sha256)
        assert got.shape == tp.shape and got.dtype == tp.dtype
    assert back.provenance["source"] == "unit"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_apply_then_revert_is_bit_exact(tmp_path, dtype):
    base, merged, _ = _rose_pair(dtype=dtype)
    tp = tensor_patch_from_pair("w", base, merged)
    save_patch(Patch(tensors={"w": tp}), tmp_path / "p.safetensors")
    patch = load_patch(tmp_path / "p.safetensors")
    applied = apply_to_state_dict(patch, {"w": base})["w"]
    assert sha256_tensor(applied) == sha256_tensor(merged)
    reverted = apply_to_state_dict(patch, {"w": applied}, revert=True)["w"]
    assert sha256_tensor(reverted) == sha256_tensor(base)


def test_apply_does_not_modify_the_input_state_dict():
    base, merged, _ = _rose_pair()
    keep = base.clone()
    patch = Patch(tensors={"w": tensor_patch_from_pair("w", base, merged)})
    apply_to_state_dict(patch, {"w": base})
    assert torch.equal(base, keep)


def test_file_reads_with_plain_safe_open_zlib_lzma_and_numpy(tmp_path):
    """The decoding recipe of docs/format.md, written with nothing but the standard library and numpy."""
    import base64
    import hashlib
    import lzma
    import zlib

    base, merged, _ = _rose_pair()
    tp = tensor_patch_from_pair("w", base, merged)
    save_patch(Patch(tensors={"w": tp}), tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), framework="numpy") as f:
        meta = f.metadata()
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "roselora-patch" and meta["format_version"] == "2"
    assert meta["checksum"].startswith("sha256:") and set(arrays) == {"positions", "values"}
    columns, streams = json.loads(meta["tensors"]), json.loads(meta["streams"])
    assert columns["name"] == ["w"] and columns["shape"] == [[256, 256]] and columns["dtype"] == ["F16"]
    assert base64.b64decode(columns["sha256_base"][0]).hex() == hashlib.sha256(base.numpy().tobytes()).hexdigest()
    unpack = {"none": bytes, "zlib": zlib.decompress, "xz": lzma.decompress}
    raw = {k: np.frombuffer(unpack[streams[k]["codec"]](arrays[k].tobytes()), np.uint8) for k in arrays}
    numbers, value, shift = [], 0, 0
    for byte in raw["positions"].tolist():  # LEB128 varints
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            numbers.append(value)
            value, shift = 0, 0
    n_rows = columns["rows"][0]
    row_gaps, counts, col_gaps = numbers[:n_rows], numbers[n_rows:2 * n_rows], numbers[2 * n_rows:]
    indptr = np.concatenate([[0], np.cumsum(np.array(counts) + 1)])  # CSR row pointers of the touched rows
    rows = np.cumsum(np.array(row_gaps) + 1) - 1
    cols = np.concatenate([np.cumsum(np.array(col_gaps[a:b]) + 1) - 1 for a, b in zip(indptr[:-1], indptr[1:])])
    flat = np.repeat(rows, np.diff(indptr)) * 256 + cols
    nnz = columns["nnz"][0]
    xor = raw["values"][:nnz].astype(np.uint16) | (raw["values"][nnz:2 * nnz].astype(np.uint16) << 8)  # byte planes
    assert np.array_equal(flat, tp.flat_index) and np.array_equal(xor, tp.xor_bits)


def test_delta_csr_gives_patched_minus_base(tmp_path):
    base, merged, _ = _rose_pair(dtype=torch.bfloat16)
    patch = Patch(tensors={"w": tensor_patch_from_pair("w", base, merged)})
    csr = delta_csr(patch, "w", base)
    expected = (merged.double() - base.double()).numpy()
    assert csr.shape == (256, 256)
    assert np.array_equal(csr.toarray(), expected)
    assert csr.nnz == patch.tensors["w"].nnz


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_roselora_patch_meets_the_size_goal_in_half_precision(tmp_path, dtype):
    tensors = {}
    for i in range(8):
        base, merged, _ = _rose_pair(d_out=576, d_in=576, dtype=dtype, seed=i)
        tp = tensor_patch_from_pair(f"model.layers.{i}.self_attn.q_proj.weight", base, merged)
        tensors[tp.name] = tp
    patch = Patch(tensors=tensors)
    path = save_patch(patch, tmp_path / "p.safetensors")
    assert {e["layout"] for e in _entries(path)} == {"sparse"}
    assert path.stat().st_size <= 1.25 * patch.total_nnz * 2


def test_roselora_patch_in_fp32_is_smaller_than_its_values(tmp_path):
    base, merged, _ = _rose_pair(d_out=576, d_in=576, dtype=torch.float32)
    tp = tensor_patch_from_pair("w", base, merged)
    path = save_patch(Patch(tensors={"w": tp}), tmp_path / "p.safetensors")
    assert path.stat().st_size <= 1.0 * tp.nnz * 4


def test_dense_change_is_stored_dense(tmp_path):
    base = torch.randn(64, 64)
    tp = tensor_patch_from_pair("w", base, base * 1.5)
    path = save_patch(Patch(tensors={"w": tp}), tmp_path / "p.safetensors")
    assert _entries(path)[0]["layout"] == "dense"
    assert np.array_equal(load_patch(path).tensors["w"].xor_bits, tp.xor_bits)


def test_one_d_and_scalar_tensors_count_as_one_row(tmp_path):
    base = {"v": torch.randn(300), "s": torch.tensor(1.0)}
    target = {"v": base["v"].clone(), "s": torch.tensor(2.0)}
    target["v"][[0, 299]] = 7.0
    patch = build_patch_from_state_dicts(base, target)
    path = save_patch(patch, tmp_path / "p.safetensors")
    back = load_patch(path)
    assert delta_csr(back, "v", base["v"]).shape == (1, 300)
    out = apply_to_state_dict(back, base)
    assert torch.equal(out["v"], target["v"]) and torch.equal(out["s"], target["s"])


@given(st.lists(st.integers(0, (1 << 42) - 1), max_size=200))
def test_varints_round_trip_any_index_gap(values):
    from roselora_export.patch.io import varint_decode, varint_encode

    stream = varint_encode(np.array(values, dtype=np.uint64))
    assert stream.size == sum(max(1, -(-v.bit_length() // 7)) for v in values)
    assert varint_decode(stream, len(values)).tolist() == values


def test_positions_are_csr_of_the_touched_rows_in_delta_varints():
    from roselora_export.patch.io import encode_tensor

    base = torch.zeros(300, 5000)
    target = base.clone()
    target[0, 10:250] = 1.0  # a run: column gaps of 0, one byte each
    target[299, 100:300:7] = 1.0
    enc = encode_tensor(tensor_patch_from_pair("w", base, target))
    row_gaps, counts, col_gaps = enc.positions
    assert enc.entry["rows"] == 2
    assert row_gaps.tolist() == [0, 0xAA, 0x02]  # rows 0 and 299: gaps 0 and 298 (two bytes)
    assert counts.tolist() == [0xEF, 0x01, 28]  # 240 and 29 changes, minus one
    assert col_gaps.size == (1 + 239) + (1 + 28)  # each row's first column counts from 0: 10 and 100, one byte each


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    base, merged, _ = _rose_pair()
    save_patch(Patch(tensors={"w": tensor_patch_from_pair("w", base, merged)}), tmp_path / "p.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_config_fingerprint_is_the_same_on_disk_and_on_the_loaded_model(tmp_path, arch):
    from tiny_models import BUILDERS

    model = BUILDERS[arch]()
    model.save_pretrained(str(tmp_path))
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert config_fingerprint(on_disk) == config_fingerprint(model.config.to_dict())
    other = BUILDERS[arch](**({"hidden_size": 48} if arch == "llama" else {"n_embd": 48}))
    assert config_fingerprint(other.config.to_dict()) != config_fingerprint(on_disk)


def test_config_fingerprint_ignores_dtype():
    cfg = {"model_type": "llama", "hidden_size": 8, "dtype": "float32"}
    assert config_fingerprint(cfg) == config_fingerprint({**cfg, "dtype": "bfloat16"})


@pytest.mark.smollm
def test_smollm2_roselora_patch_is_compact_and_exact_in_fp16(smollm_dir, tmp_path):
    """A RoseLoRA-shaped edit of all 30 layers' q/v (synthetic until trained): size goal and bit-exact revert."""
    from bench.synthetic_adapter import write_synthetic_adapter
    from roselora_export.checkpoint import LazyStateDict, open_model_dir
    from roselora_export.patch import build_patch_from_adapter

    adapter = write_synthetic_adapter(smollm_dir, tmp_path / "adapter")
    base = LazyStateDict(open_model_dir(smollm_dir))
    patch = build_patch_from_adapter(adapter, base, dtype=torch.float16)
    path = save_patch(patch, tmp_path / "p.safetensors")
    assert len(patch.tensors) == 60
    assert path.stat().st_size <= 1.25 * patch.total_nnz * 2
    bf16 = build_patch_from_adapter(adapter, base, dtype=torch.bfloat16)  # most of the edit rounds away here
    assert save_patch(bf16, tmp_path / "b.safetensors").stat().st_size <= 1.25 * bf16.total_nnz * 2
    loaded = load_patch(path)
    name = "model.layers.7.self_attn.v_proj.weight"
    b = base[name].half()
    sub = Patch(tensors={name: loaded.tensors[name]})
    applied = apply_to_state_dict(sub, {name: b})[name]
    assert sha256_tensor(apply_to_state_dict(sub, {name: applied}, revert=True)[name]) == sha256_tensor(b)


def _contract_pair(base: torch.Tensor, merged: torch.Tensor) -> tuple:
    """The pair-to-patch contract written out plainly: XOR of the whole tensors, its nonzeros, whole sha256."""
    from roselora_export.patch.model import tensor_bits

    a, b = tensor_bits(base), tensor_bits(merged)
    xor = a ^ b
    flat = np.flatnonzero(xor)
    return (flat, xor[flat], hashlib.sha256(a.tobytes()).hexdigest(), hashlib.sha256(b.tobytes()).hexdigest(),
            hashlib.sha256(a[flat].tobytes()).hexdigest())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_fast_pair_patch_equals_the_contract_function(dtype):
    base, merged, _ = _rose_pair(dtype=dtype)
    base = base.clone()
    base[0, :3] = -0.0  # -0.0 + 0.0 = +0.0: a change outside the delta's support
    merged = (base.float() + (merged.float() - base.float()) * 1).to(dtype)
    a, (flat, xor, base_sha, patched_sha, touched_sha) = tensor_patch_from_pair("w", base, merged), _contract_pair(base, merged)
    assert np.array_equal(a.flat_index, flat) and np.array_equal(a.xor_bits, xor)
    assert (a.base_sha256, a.patched_sha256, a.base_touched_sha256) == (base_sha, patched_sha, touched_sha)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_deferred_whole_tensor_hashes_equal_the_contract_fingerprints(dtype):
    import dataclasses

    from roselora_export.patch.model import fill_sha256, tensor_bits

    base, merged, _ = _rose_pair(dtype=dtype)
    b = tensor_patch_from_pair("w", base, merged)
    a = dataclasses.replace(b, base_sha256="", patched_sha256="")
    fill_sha256(a, tensor_bits(base), tensor_bits(merged))
    _, _, base_sha, patched_sha, _ = _contract_pair(base, merged)
    assert (a.base_sha256, a.patched_sha256) == (base_sha, patched_sha) == (b.base_sha256, b.patched_sha256)


@needs_mkl
def test_patch_built_from_an_adapter_records_the_base_config_fingerprint(tmp_path):
    from roselora_export.checkpoint import load_state_dict
    from roselora_export.patch import build_patch_from_adapter
    from test_patch_fixtures import make_adapter, reference_merge, tiny_llama_dir

    base = tiny_llama_dir(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "ad")
    sd = load_state_dict(base)
    config = json.loads((base / "config.json").read_text())
    patch = build_patch_from_adapter(adapter, sd, base_config=config, base_name="base")
    assert patch.provenance["base_config_sha256"] == config_fingerprint(config)
    out = apply_to_state_dict(patch, sd)
    want = reference_merge(sd, adapter)
    assert all(torch.equal(out[k], want[k]) for k in sd)


def test_patch_verbs_round_trip_a_state_dict(tmp_path):
    import roselora_export.checkpoint as checkpoint_api

    base, merged, _ = _rose_pair(dtype=torch.bfloat16)
    save_patch(Patch(tensors={"w": tensor_patch_from_pair("w", base, merged)}), tmp_path / "p.safetensors")
    patch = load_patch(tmp_path / "p.safetensors")
    applied = apply_to_state_dict(patch, {"w": base})
    assert torch.equal(applied["w"], merged)
    assert torch.equal(apply_to_state_dict(patch, applied, revert=True)["w"], base)
    assert callable(checkpoint_api.apply_to_checkpoint) and callable(checkpoint_api.merge_checkpoint)


def test_large_patch_stream_is_one_zlib_stream_from_pieces_deflated_ahead(tmp_path):
    """Over 1 MiB a stream is zlib, joined from per-tensor pieces (large tensors deflate theirs when encoded)."""
    import zlib

    from roselora_export.patch.io import XZ_MAX_RAW, encode_tensor

    g = np.random.default_rng(0)
    tensors = {}
    for name, n in (("big", 400_000), ("small", 300), ("big2", 200_000)):
        flat = np.sort(g.choice(1_000_000, n, replace=False)).astype(np.int64)
        xor = g.integers(1, 1 << 10, n).astype(np.uint32)
        tensors[name] = TensorPatch(name, (1000, 1000), torch.float32, flat, xor, "0" * 64, "1" * 64, "2" * 64)
    patch = Patch(tensors=tensors)
    encoded = {name: encode_tensor(tp) for name, tp in tensors.items()}
    assert encoded["big"].deflated and not encoded["small"].deflated
    path = save_patch(patch, tmp_path / "p.safetensors", encoded)
    with safe_open(str(path), framework="numpy") as f:
        streams = json.loads(f.metadata()["streams"])
        values = zlib.decompress(f.get_tensor("values").tobytes())
    assert streams["values"]["codec"] == "zlib" and streams["values"]["raw_bytes"] > XZ_MAX_RAW
    assert len(values) == 4 * 600_300
    back = load_patch(path)
    for name, tp in tensors.items():
        assert np.array_equal(back.tensors[name].flat_index, tp.flat_index)
        assert np.array_equal(back.tensors[name].xor_bits, tp.xor_bits)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_patch_round_trips_exactly(data):
    """Random shapes (0-D to 3-D), dtypes, densities (sparse and dense layouts) and XOR values."""
    import tempfile
    from pathlib import Path

    g = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    tensors = {}
    for i in range(data.draw(st.integers(1, 4))):
        shape = tuple(data.draw(st.lists(st.integers(1, 40), max_size=3)))
        numel = int(np.prod(shape, dtype=np.int64))
        dtype = data.draw(st.sampled_from(DTYPES))
        nnz = data.draw(st.integers(1, numel))
        flat = np.sort(g.choice(numel, nnz, replace=False)).astype(np.int64)
        bits = np.dtype("<u4") if dtype == torch.float32 else np.dtype("<u2")
        xor = g.integers(1, np.iinfo(bits).max, nnz, endpoint=True).astype(bits)
        tensors[f"t{i}"] = TensorPatch(f"t{i}", shape, dtype, flat, xor, *(hashlib.sha256(bytes([i, k])).hexdigest()
                                                                         for k in range(3)))
    patch = Patch(tensors=tensors, provenance={"kind": "test"})
    with tempfile.TemporaryDirectory() as tmp:
        back = load_patch(save_patch(patch, Path(tmp) / "p.safetensors"))
    assert list(back.tensors) == list(tensors)
    for name, tp in tensors.items():
        got = back.tensors[name]
        assert got.shape == tp.shape and got.dtype == tp.dtype
        assert np.array_equal(got.flat_index, tp.flat_index) and np.array_equal(got.xor_bits, tp.xor_bits)
        assert (got.base_sha256, got.patched_sha256, got.base_touched_sha256) == (
            tp.base_sha256, tp.patched_sha256, tp.base_touched_sha256)
