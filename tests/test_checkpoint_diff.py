"""diff: every differing element of two checkpoints, exactly; anything but same keys/shapes/dtypes refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from roselora_export.checkpoint import apply_to_checkpoint, diff_checkpoints, fingerprints, load_state_dict
from roselora_export.errors import InputError
from roselora_export.patch import load_patch


def _ckpt(path, tensors):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 8}))
    return path


@pytest.fixture
def pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g).half(),
            "c": torch.randn(16, 16, generator=g).bfloat16(), "ids": torch.arange(5)}
    target = {k: v.clone() for k, v in base.items()}
    target["a"][[1, 2, 50], [3, 60, 0]] += 0.1
    target["b"][:] = target["b"] * 2  # every element: stored dense
    return _ckpt(tmp_path / "base", base), _ckpt(tmp_path / "target", target)


def test_diff_then_apply_reproduces_the_target_and_revert_the_base(pair, tmp_path):
    base, target = pair
    diff_checkpoints(base, target, tmp_path / "d.safetensors")
    patch = load_patch(tmp_path / "d.safetensors")
    assert set(patch.tensors) == {"a", "b"} and patch.tensors["a"].nnz == 3
    apply_to_checkpoint(base, [patch], tmp_path / "applied")
    assert fingerprints(tmp_path / "applied") == fingerprints(target)
    apply_to_checkpoint(tmp_path / "applied", [patch], tmp_path / "reverted", revert=True)
    assert fingerprints(tmp_path / "reverted") == fingerprints(base)


def test_diff_stores_a_fully_changed_tensor_dense(pair, tmp_path):
    from roselora_export.patch.inspect import summarize

    base, target = pair
    diff_checkpoints(base, target, tmp_path / "d.safetensors")
    layout = {t["name"]: t["layout"] for t in summarize(tmp_path / "d.safetensors")["tensors"]}
    assert layout == {"a": "sparse", "b": "dense"}


def test_diff_of_identical_checkpoints_is_empty(pair, tmp_path):
    base, _ = pair
    assert diff_checkpoints(base, base, tmp_path / "d.safetensors").total_nnz == 0
    assert load_patch(tmp_path / "d.safetensors").tensors == {}


@pytest.mark.parametrize("change", ["missing", "shape", "dtype"])
def test_diff_of_mismatched_checkpoints_is_refused(pair, tmp_path, change):
    base, _ = pair
    sd = load_state_dict(base)
    if change == "missing":
        del sd["c"]
    elif change == "shape":
        sd["a"] = sd["a"][:, :32].contiguous()
    else:
        sd["a"] = sd["a"].half()
    other = _ckpt(tmp_path / "other", sd)
    with pytest.raises(InputError, match="only in|identical shapes and dtypes"):
        diff_checkpoints(base, other, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


def test_changed_integer_tensor_is_refused(pair, tmp_path):
    base, _ = pair
    sd = load_state_dict(base)
    sd["ids"] = sd["ids"] + 1
    with pytest.raises(InputError, match="ids"):
        diff_checkpoints(base, _ckpt(tmp_path / "other", sd), tmp_path / "d.safetensors")


def test_fp64_tensors_are_compared_bit_for_bit(tmp_path):
    # Equal NaNs are equal bits (no refusal); 0.0 and -0.0 are different bits (refused, as any other change).
    nan = torch.tensor([float("nan"), 1.0, 0.0], dtype=torch.float64)
    same = _ckpt(tmp_path / "a", {"w": nan}), _ckpt(tmp_path / "b", {"w": nan.clone()})
    assert diff_checkpoints(*same).total_nnz == 0
    signed = _ckpt(tmp_path / "c", {"w": torch.tensor([-0.0, 1.0, 0.0], dtype=torch.float64)})
    with pytest.raises(InputError, match="w: dtype F64 differs"):
        diff_checkpoints(same[0], signed)
