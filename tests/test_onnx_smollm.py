"""ONNX on the real SmolLM2-135M: exported once per session (about 12 s idle), patched by file and by session."""
from __future__ import annotations

import shutil

import onnx
import pytest

from roselora_export.onnx.export import export_onnx
from roselora_export.onnx.patching import apply_to_onnx_dir
from roselora_export.onnx.session import create_session
from test_onnx_support import (
    MAX_LOGIT_DIFF, base_state, example_inputs, make_patch, masked_max_diff, reference_logits, run, sha256_file,
)

pytestmark = pytest.mark.smollm
KEYS = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 15, 29) for p in ("q", "v")]


@pytest.fixture(scope="module")
def smol_onnx(smollm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol-onnx") / "onnx"
    return export_onnx(smollm_dir, out), out


@pytest.fixture(scope="module")
def smol_patch(smollm_dir):
    return make_patch(base_state(smollm_dir), KEYS, scale=1e-2)


def test_export_maps_every_key_and_ties_lm_head_to_embeddings(smol_onnx):
    report, out = smol_onnx
    assert report["verified_by_value"] == report["state_dict_keys"] == 273
    assert report["tied"] == ["lm_head.weight"] and report["unmapped"] == []
    assert report["max_abs_logit_diff"] <= MAX_LOGIT_DIFF
    onnx.checker.check_model(str(out / "model.onnx"))


def test_patched_file_and_session_both_match_the_pytorch_merged_model(smol_onnx, smol_patch, smollm_dir, tmp_path):
    _, base = smol_onnx
    patch, patched = smol_patch
    inputs = example_inputs(49152, batch=2, seq=10)
    want = reference_logits(smollm_dir, patched, inputs)
    apply_to_onnx_dir(base, [patch], tmp_path / "patched")
    by_file = run(create_session(tmp_path / "patched"), inputs)
    by_session = run(create_session(base, [patch]), inputs)
    mask = inputs["attention_mask"]
    assert masked_max_diff(by_file, want, mask) <= MAX_LOGIT_DIFF
    assert masked_max_diff(by_session, want, mask) <= MAX_LOGIT_DIFF


def test_in_place_apply_and_revert_restore_the_data_file_sha256(smol_onnx, smol_patch, tmp_path):
    _, base = smol_onnx
    work = tmp_path / "work"
    shutil.copytree(base, work)
    before = sha256_file(work / "model.onnx.data")
    report = apply_to_onnx_dir(work, [smol_patch[0]], None, in_place=True)
    assert report["bytes_written"] < report["data_bytes"] / 100
    assert sha256_file(work / "model.onnx.data") != before
    apply_to_onnx_dir(work, [smol_patch[0]], None, in_place=True, revert=True)
    assert sha256_file(work / "model.onnx.data") == before
