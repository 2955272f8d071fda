"""Patching ONNX artifacts: only touched bytes rewritten, bit-exact apply and revert, bad input refused untouched."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from roselora_export.errors import InputError
from roselora_export.onnx.export import export_onnx
from roselora_export.onnx.patching import apply_to_onnx_dir
from roselora_export.patch.model import Patch, tensor_patch_from_pair
from test_onnx_support import (
    MAX_LOGIT_DIFF, PATCH_KEYS, TASKS, base_state, dir_fingerprint, example_inputs, make_patch, masked_max_diff, reference_logits, run,
)



@pytest.fixture(scope="module")
def base_onnx(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-patching")
    for arch in TASKS:
        export_onnx(tiny_model_dirs[arch], root / arch, check_runtime=False)
    return root


@pytest.fixture
def work_copy(base_onnx, tmp_path):
    """A private copy of an exported artifact, for tests that patch in place."""
    def copy(arch: str):
        shutil.copytree(base_onnx / arch, tmp_path / arch)
        return tmp_path / arch
    return copy


def patch_for(tiny_model_dirs, arch, seed=0):
    return make_patch(base_state(tiny_model_dirs[arch]), PATCH_KEYS[arch], seed=seed)


@pytest.mark.parametrize("arch", list(TASKS))
def test_patched_copy_matches_the_pytorch_merged_model(base_onnx, tiny_model_dirs, tmp_path, arch):
    patch, patched = patch_for(tiny_model_dirs, arch)
    apply_to_onnx_dir(base_onnx / arch, [patch], tmp_path / "out")
    inputs = example_inputs(128)
    got = run(ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"]), inputs)
    want = reference_logits(tiny_model_dirs[arch], patched, inputs, TASKS[arch])
    base = reference_logits(tiny_model_dirs[arch], {}, inputs, TASKS[arch])
    diff = masked_max_diff(got, want, inputs["attention_mask"])
    assert diff <= MAX_LOGIT_DIFF
    assert masked_max_diff(want, base, inputs["attention_mask"]) > 100 * diff  # the patch shows, and matches


@pytest.mark.parametrize("arch", list(TASKS))
def test_in_place_apply_then_revert_restores_every_file_bit_for_bit(work_copy, tiny_model_dirs, arch):
    art = work_copy(arch)
    before = dir_fingerprint(art)
    patch, _ = patch_for(tiny_model_dirs, arch)
    apply_to_onnx_dir(art, [patch], None, in_place=True)
    assert dir_fingerprint(art)["model.onnx.data"] != before["model.onnx.data"]
    apply_to_onnx_dir(art, [patch], None, in_place=True, revert=True)
    assert dir_fingerprint(art) == before


def test_patched_artifact_passes_the_onnx_checker(work_copy, tiny_model_dirs):
    art = work_copy("llama")
    apply_to_onnx_dir(art, [patch_for(tiny_model_dirs, "llama")[0]], None, in_place=True)
    onnx.checker.check_model(str(art / "model.onnx"))


def test_only_the_touched_elements_change(base_onnx, tiny_model_dirs, tmp_path):
    patch, _ = patch_for(tiny_model_dirs, "llama")
    report = apply_to_onnx_dir(base_onnx / "llama", [patch], tmp_path / "out")
    old = np.frombuffer((base_onnx / "llama" / "model.onnx.data").read_bytes(), np.uint8)
    new = np.frombuffer((tmp_path / "out" / "model.onnx.data").read_bytes(), np.uint8)
    assert old.size == new.size
    changed = int((old != new).sum())
    assert 0 < changed <= report["bytes_written"] == 4 * report["elements"] == 4 * patch.total_nnz
    assert (base_onnx / "llama" / "model.onnx").read_bytes() == (tmp_path / "out" / "model.onnx").read_bytes()


def test_stacked_patches_apply_in_order_and_revert_in_reverse(work_copy, tiny_model_dirs):
    art = work_copy("llama")
    before = dir_fingerprint(art)
    state = base_state(tiny_model_dirs["llama"])
    first, patched = make_patch(state, PATCH_KEYS["llama"][:1], seed=1)
    second, _ = make_patch({**state, **patched}, PATCH_KEYS["llama"][:1], seed=2)
    apply_to_onnx_dir(art, [first, second], None, in_place=True)
    apply_to_onnx_dir(art, [first, second], None, in_place=True, revert=True)
    assert dir_fingerprint(art) == before


def test_patch_naming_the_tied_lm_head_patches_the_shared_initializer(base_onnx, tiny_model_dirs, tmp_path):
    state = base_state(tiny_model_dirs["llama"])
    patch, patched = make_patch({"lm_head.weight": state["model.embed_tokens.weight"]}, ["lm_head.weight"])
    apply_to_onnx_dir(base_onnx / "llama", [patch], tmp_path / "out")
    inputs = example_inputs(128)
    got = run(ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"]), inputs)
    want = reference_logits(tiny_model_dirs["llama"], {"model.embed_tokens.weight": patched["lm_head.weight"]}, inputs)
    assert masked_max_diff(got, want, inputs["attention_mask"]) <= MAX_LOGIT_DIFF


def test_applying_twice_is_refused_as_already_patched(work_copy, tiny_model_dirs):
    art = work_copy("gpt2")
    patch, _ = patch_for(tiny_model_dirs, "gpt2")
    apply_to_onnx_dir(art, [patch], None, in_place=True)
    after = dir_fingerprint(art)
    with pytest.raises(InputError, match="already applied"):
        apply_to_onnx_dir(art, [patch], None, in_place=True)
    assert dir_fingerprint(art) == after


def test_reverting_an_unpatched_artifact_is_refused(work_copy, tiny_model_dirs):
    art = work_copy("gpt2")
    with pytest.raises(InputError, match="not applied here"):
        apply_to_onnx_dir(art, [patch_for(tiny_model_dirs, "gpt2")[0]], None, in_place=True, revert=True)


def test_transposed_storage_is_patched_in_state_dict_order(tmp_path):
    # A hand-made artifact storing state-dict key "w" (3x4) as initializer "wt" = w.T (4x3).
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt")])
    art = tmp_path / "art"
    art.mkdir()
    onnx.save_model(helper.make_model(graph), str(art / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    (art / "names.json").write_text(json.dumps({"format": 1, "tensors": {
        "w": {"initializer": "wt", "transposed": True, "shape": [3, 4], "dtype": "F32"}}}))
    import torch
    new = w.copy()
    new[0, 3], new[2, 1] = 100.0, -7.0
    patch = Patch({"w": tensor_patch_from_pair("w", torch.from_numpy(w), torch.from_numpy(new))})
    apply_to_onnx_dir(art, [patch], tmp_path / "out")
    got = numpy_helper.to_array(onnx.load(str(tmp_path / "out" / "model.onnx")).graph.initializer[0])
    assert np.array_equal(got, new.T)


# Bad input: InputError (exit 2 in the CLI), nothing modified.

def _bad_input(art, patch, match):
    before = dir_fingerprint(art)
    with pytest.raises(InputError, match=match):
        apply_to_onnx_dir(art, [patch], None, in_place=True)
    assert dir_fingerprint(art) == before
    assert sorted(p.name for p in art.iterdir()) == sorted(before)


def test_directory_without_names_json_is_refused(work_copy, tiny_model_dirs):
    art = work_copy("llama")
    (art / "names.json").unlink()
    _bad_input(art, patch_for(tiny_model_dirs, "llama")[0], "no names.json")


def test_patch_naming_a_tensor_the_model_lacks_is_refused(work_copy, tiny_model_dirs):
    art = work_copy("llama")
    patch, _ = patch_for(tiny_model_dirs, "llama")
    tp = next(iter(patch.tensors.values()))
    tp.name = "model.layers.9.self_attn.q_proj.weight"
    patch.tensors = {tp.name: tp}
    _bad_input(art, patch, "lacks")


def test_missing_external_data_is_refused(work_copy, tiny_model_dirs):
    art = work_copy("llama")
    (art / "model.onnx.data").unlink()
    _bad_input(art, patch_for(tiny_model_dirs, "llama")[0], "external data file missing")


def test_truncated_external_data_is_refused(work_copy, tiny_model_dirs):
    art = work_copy("llama")
    with open(art / "model.onnx.data", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    _bad_input(art, patch_for(tiny_model_dirs, "llama")[0], "truncated")


def test_model_file_that_is_not_onnx_is_refused(work_copy, tiny_model_dirs):
    art = work_copy("llama")
    (art / "model.onnx").write_bytes(b"\x00\xffthis is not a protobuf" * 10)
    _bad_input(art, patch_for(tiny_model_dirs, "llama")[0], "not an ONNX model")


def test_patch_for_another_base_is_refused(work_copy, tiny_model_dirs):
    art = work_copy("llama")
    state = base_state(tiny_model_dirs["llama"])
    other = {k: v + 1.0 for k, v in state.items()}
    _bad_input(art, make_patch(other, PATCH_KEYS["llama"][:1])[0], "fingerprint mismatch")


def test_out_dir_that_is_not_empty_is_refused(base_onnx, tiny_model_dirs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(InputError, match="not an empty directory"):
        apply_to_onnx_dir(base_onnx / "llama", [patch_for(tiny_model_dirs, "llama")[0]], tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x"]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_checkpoint_exports_in_its_dtype_and_patches_bit_exact(tmp_path, dtype):
    import torch
    from tiny_models import save_model_dir, tiny_llama

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model_dir = save_model_dir(tiny_llama(seed=5).to(torch_dtype), tmp_path / "model")
    report = export_onnx(model_dir, tmp_path / "onnx")
    assert report["dtype"] == {"fp16": "F16", "bf16": "BF16"}[dtype]
    state = base_state(model_dir)
    patch, patched = make_patch(state, PATCH_KEYS["llama"][:2], scale=0.05)
    apply_to_onnx_dir(tmp_path / "onnx", [patch], None, in_place=True)
    from roselora_export.onnx.names import open_artifact
    from roselora_export.patch.model import tensor_bits

    art = open_artifact(tmp_path / "onnx")
    data = (tmp_path / "onnx" / "model.onnx.data").read_bytes()
    for key, value in patched.items():
        loc = art.target(key).location
        assert data[loc.offset: loc.offset + loc.length] == tensor_bits(value).tobytes()
    apply_to_onnx_dir(tmp_path / "onnx", [patch], None, in_place=True, revert=True)
    for key in patched:
        loc = art.target(key).location
        data = (tmp_path / "onnx" / "model.onnx.data").read_bytes()
        assert data[loc.offset: loc.offset + loc.length] == tensor_bits(state[key]).tobytes()


def test_concurrent_in_place_applies_both_land(work_copy, tiny_model_dirs):
    import threading

    art = work_copy("llama")
    state = base_state(tiny_model_dirs["llama"])
    patches = [make_patch(state, [key], seed=i)[0] for i, key in enumerate(PATCH_KEYS["llama"])]
    errors = []

    def worker(p):
        try:
            apply_to_onnx_dir(art, [p], None, in_place=True)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(p,)) for p in patches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for p in patches:  # every patch is in: reverting each one succeeds only if it was applied
        apply_to_onnx_dir(art, [p], None, in_place=True, revert=True)
