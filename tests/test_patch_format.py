"""The patch file: round trip, encodings, plain safetensors readability, exactness, compactness."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
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
from roselora_export.patch.io import encode_patch
from roselora_export.patch.model import Patch, sha256_tensor

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
    with safe_open(str(path), framework="numpy") as f:
        return json.loads(f.metadata()["tensors"])


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
        assert (got.base_sha256, got.patched_sha256, got.base_touched_sha256, got.patched_touched_sha256) == (
            tp.base_sha256, tp.patched_sha256, tp.base_touched_sha256, tp.patched_touched_sha256)
        assert got.shape == tp.shape and got.dtype == tp.dtype
    assert back.provenance["source"] == "unit"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_apply_then_revert_is_bit_exact(tmp_path, dtype):
    base, merged, rects = _rose_pair(dtype=dtype)
    tp = tensor_patch_from_pair("w", base, merged)
    tp.rectangles = rects
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


def test_file_reads_with_plain_safe_open(tmp_path):
    base, merged, _ = _rose_pair()
    save_patch(Patch(tensors={"w": tensor_patch_from_pair("w", base, merged)}), tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), framework="numpy") as f:
        meta = f.metadata()
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "roselora-patch" and meta["format_version"] == "1"
    assert meta["checksum"].startswith("sha256:")
    entry = json.loads(meta["tensors"])[0]
    assert entry["name"] == "w" and entry["shape"] == [256, 256] and entry["dtype"] == "F16"
    assert set(entry["sha256"]) == {"base", "patched", "base_touched", "patched_touched"}
    assert all(k.startswith("0.") for k in arrays)


def test_delta_csr_gives_patched_minus_base(tmp_path):
    base, merged, _ = _rose_pair(dtype=torch.bfloat16)
    patch = Patch(tensors={"w": tensor_patch_from_pair("w", base, merged)})
    csr = delta_csr(patch, "w", base)
    expected = (merged.double() - base.double()).numpy()
    assert csr.shape == (256, 256)
    assert np.array_equal(csr.toarray(), expected)
    assert csr.nnz == patch.tensors["w"].nnz


def test_roselora_patch_uses_rectangles_and_meets_the_size_goal_in_fp16(tmp_path):
    tensors = {}
    for i in range(4):
        base, merged, rects = _rose_pair(d_out=576, d_in=576, dtype=torch.float16, seed=i)
        tp = tensor_patch_from_pair(f"l{i}.q_proj.weight", base, merged)
        tp.rectangles = rects
        tensors[tp.name] = tp
    patch = Patch(tensors=tensors)
    path = save_patch(patch, tmp_path / "p.safetensors")
    assert {e["encoding"] for e in _entries(path)} == {"rect"}
    assert path.stat().st_size <= 1.25 * patch.total_nnz * 2


def test_roselora_patch_in_fp32_is_smaller_than_its_values(tmp_path):
    base, merged, rects = _rose_pair(d_out=576, d_in=576, dtype=torch.float32)
    tp = tensor_patch_from_pair("w", base, merged)
    tp.rectangles = rects
    path = save_patch(Patch(tensors={"w": tp}), tmp_path / "p.safetensors")
    assert path.stat().st_size <= 1.0 * tp.nnz * 4


def test_changes_outside_the_rectangles_fall_back_to_csr(tmp_path):
    base, merged, rects = _rose_pair()
    merged = merged.clone()
    merged[0, 0] += 1  # outside every rectangle (almost surely) -> rect cannot describe it
    tp = tensor_patch_from_pair("w", base, merged)
    tp.rectangles = [(r[r != 0], c) for r, c in rects]
    path = save_patch(Patch(tensors={"w": tp}), tmp_path / "p.safetensors")
    assert _entries(path)[0]["encoding"] == "csr"
    assert np.array_equal(load_patch(path).tensors["w"].flat_index, tp.flat_index)


def test_dense_change_is_stored_dense(tmp_path):
    base = torch.randn(64, 64)
    tp = tensor_patch_from_pair("w", base, base * 1.5)
    path = save_patch(Patch(tensors={"w": tp}), tmp_path / "p.safetensors")
    assert _entries(path)[0]["encoding"] == "dense"
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


def test_wide_rows_store_narrow_column_gaps_instead_of_columns(tmp_path):
    base = torch.zeros(2, 5000)
    target = base.clone()
    target[0, 10:250:3] = 1.0
    target[1, 100:300:7] = 1.0  # columns need 16 bits; gaps within each row fit in 8
    tp = tensor_patch_from_pair("w", base, target)
    _, arrays = encode_patch(Patch(tensors={"w": tp}))
    assert any(k.startswith("0.gap") for k in arrays) and not any(k.startswith("0.col") for k in arrays)
    back = load_patch(save_patch(Patch(tensors={"w": tp}), tmp_path / "p.safetensors"))
    assert np.array_equal(back.tensors["w"].flat_index, tp.flat_index)


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
    loaded = load_patch(path)
    name = "model.layers.7.self_attn.v_proj.weight"
    b = base[name].half()
    sub = Patch(tensors={name: loaded.tensors[name]})
    applied = apply_to_state_dict(sub, {name: b})[name]
    assert sha256_tensor(apply_to_state_dict(sub, {name: applied}, revert=True)[name]) == sha256_tensor(b)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_fast_pair_patch_equals_the_contract_function(dtype):
    from roselora_export.patch.build import pair_patch

    base, merged, _ = _rose_pair(dtype=dtype)
    base = base.clone()
    base[0, :3] = -0.0  # -0.0 + 0.0 = +0.0: a change outside the delta's support
    merged = (base.float() + (merged.float() - base.float()) * 1).to(dtype)
    a, b = pair_patch("w", base, merged), tensor_patch_from_pair("w", base, merged)
    assert np.array_equal(a.flat_index, b.flat_index) and np.array_equal(a.xor_bits, b.xor_bits)
    assert (a.base_sha256, a.patched_sha256, a.base_touched_sha256, a.patched_touched_sha256) == (
        b.base_sha256, b.patched_sha256, b.base_touched_sha256, b.patched_touched_sha256)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_deferred_whole_tensor_hashes_equal_the_contract_fingerprints(dtype):
    from roselora_export.patch.build import fill_sha256, pair_patch

    base, merged, _ = _rose_pair(dtype=dtype)
    later = []
    a = pair_patch("w", base, merged, deferred=later)
    assert a.base_sha256 == "" and len(later) == 1
    fill_sha256(*later[0])
    b = tensor_patch_from_pair("w", base, merged)
    assert (a.base_sha256, a.patched_sha256) == (b.base_sha256, b.patched_sha256)


def test_rectangle_candidates_from_a_mask_equal_the_sorted_union():
    from roselora_export.patch.io import rect_candidates

    g = np.random.default_rng(0)
    rects = [(g.choice(300, 40, replace=False), g.choice(200, 30, replace=False)) for _ in range(6)]
    rects.append((np.array([5, 5, 7]), np.array([0, 199])))  # repeats and edge columns
    fast, slow = rect_candidates(rects, 200, mask_ok=True), rect_candidates(rects, 200)
    assert fast.dtype == slow.dtype and np.array_equal(fast, slow)


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
    import roselora_export.patch as patch_api

    base, merged, _ = _rose_pair(dtype=torch.bfloat16)
    Patch(tensors={"w": tensor_patch_from_pair("w", base, merged)}).save(tmp_path / "p.safetensors")
    patch = Patch.load(tmp_path / "p.safetensors")
    applied = patch.apply_to({"w": base})
    assert torch.equal(applied["w"], merged)
    assert torch.equal(patch.revert_from(applied)["w"], base)
    assert callable(patch_api.apply_to_checkpoint) and callable(patch_api.merge_checkpoint)
