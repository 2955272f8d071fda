"""onnxruntime sessions with patches as initializer overrides: base files untouched, overrides verified."""
from __future__ import annotations

import pytest

from roselora_export.errors import InputError
from roselora_export.onnx.export import export_onnx
from roselora_export.onnx.session import OverrideIgnoredError, check_overrides_take_effect, create_session
from test_onnx_support import (
    MAX_LOGIT_DIFF, PATCH_KEYS, TASKS, base_state, dir_fingerprint, example_inputs, make_patch, masked_max_diff, reference_logits, run,
)


@pytest.fixture(scope="module")
def base_onnx(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-session")
    for arch in TASKS:
        export_onnx(tiny_model_dirs[arch], root / arch, check_runtime=False)
    return root


@pytest.mark.parametrize("arch", list(TASKS))
def test_session_with_patch_matches_the_pytorch_merged_model(base_onnx, tiny_model_dirs, arch):
    patch, patched = make_patch(base_state(tiny_model_dirs[arch]), PATCH_KEYS[arch])
    inputs = example_inputs(128)
    got = run(create_session(base_onnx / arch, [patch]), inputs)
    want = reference_logits(tiny_model_dirs[arch], patched, inputs, TASKS[arch])
    base = reference_logits(tiny_model_dirs[arch], {}, inputs, TASKS[arch])
    diff = masked_max_diff(got, want, inputs["attention_mask"])
    assert diff <= MAX_LOGIT_DIFF
    assert masked_max_diff(want, base, inputs["attention_mask"]) > 100 * diff


def test_session_without_patches_matches_the_base_model(base_onnx, tiny_model_dirs):
    inputs = example_inputs(128)
    got = run(create_session(base_onnx / "gpt2"), inputs)
    want = reference_logits(tiny_model_dirs["gpt2"], {}, inputs)
    assert masked_max_diff(got, want, inputs["attention_mask"]) <= MAX_LOGIT_DIFF


def test_session_leaves_the_base_files_untouched(base_onnx, tiny_model_dirs):
    before = dir_fingerprint(base_onnx / "llama")
    session = create_session(base_onnx / "llama", [make_patch(base_state(tiny_model_dirs["llama"]), PATCH_KEYS["llama"])[0]])
    run(session, example_inputs(128))
    assert dir_fingerprint(base_onnx / "llama") == before


def test_session_holds_overrides_only_for_touched_initializers(base_onnx, tiny_model_dirs):
    patch, _ = make_patch(base_state(tiny_model_dirs["llama"]), PATCH_KEYS["llama"])
    session = create_session(base_onnx / "llama", [patch])
    assert set(session.roselora_overrides) == set(PATCH_KEYS["llama"])


def test_override_that_onnxruntime_would_ignore_is_caught(base_onnx, tiny_model_dirs):
    # add_initializer is applied after constant folding: under the default level the Transpose of
    # every Linear weight is folded from the base value and the override never shows.
    patch, _ = make_patch(base_state(tiny_model_dirs["llama"]), PATCH_KEYS["llama"])
    with pytest.raises(OverrideIgnoredError, match="ignored initializer overrides feeding linear"):
        create_session(base_onnx / "llama", [patch], override_api="initializer")


def test_canary_passes_for_overrides_applied_before_optimization():
    import onnxruntime as ort

    check_overrides_take_effect(["CPUExecutionProvider"], ort.GraphOptimizationLevel.ORT_ENABLE_ALL, (), "external")


def test_add_initializer_works_once_constant_folding_is_off(base_onnx, tiny_model_dirs):
    import onnxruntime as ort

    patch, patched = make_patch(base_state(tiny_model_dirs["llama"]), PATCH_KEYS["llama"])
    inputs = example_inputs(128)
    session = create_session(base_onnx / "llama", [patch], override_api="initializer",
                             optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    want = reference_logits(tiny_model_dirs["llama"], patched, inputs)
    assert masked_max_diff(run(session, inputs), want, inputs["attention_mask"]) <= MAX_LOGIT_DIFF


def test_unknown_tensor_name_is_rejected(base_onnx, tiny_model_dirs):
    patch, _ = make_patch(base_state(tiny_model_dirs["llama"]), PATCH_KEYS["llama"][:1])
    tp = patch.tensors.pop(PATCH_KEYS["llama"][0])
    tp.name = "model.layers.7.self_attn.q_proj.weight"
    patch.tensors[tp.name] = tp
    with pytest.raises(InputError, match="lacks"):
        create_session(base_onnx / "llama", [patch])


def test_patch_for_another_base_is_rejected(base_onnx, tiny_model_dirs):
    other = {k: v * 2 for k, v in base_state(tiny_model_dirs["bert"]).items()}
    with pytest.raises(InputError, match="fingerprint mismatch"):
        create_session(base_onnx / "bert", [make_patch(other, PATCH_KEYS["bert"])[0]])


def test_fp16_session_overrides_equal_the_patched_file(tiny_model_dirs, tmp_path):
    import torch
    from tiny_models import save_model_dir, tiny_llama

    from roselora_export.onnx.patching import apply_to_onnx_dir

    model_dir = save_model_dir(tiny_llama(seed=6).to(torch.float16), tmp_path / "model")
    export_onnx(model_dir, tmp_path / "onnx", check_runtime=False)
    patch, _ = make_patch(base_state(model_dir), PATCH_KEYS["llama"][:2], scale=0.05)
    apply_to_onnx_dir(tmp_path / "onnx", [patch], tmp_path / "patched")
    inputs = example_inputs(128)
    by_session = run(create_session(tmp_path / "onnx", [patch]), inputs)
    by_file = run(create_session(tmp_path / "patched"), inputs)
    assert by_session.dtype == by_file.dtype and (by_session == by_file).all()


def test_kv_cache_session_with_patch_matches_the_pytorch_merged_model(tiny_model_dirs, tmp_path):
    import json

    import numpy as np

    export_onnx(tiny_model_dirs["llama"], tmp_path / "kv", kv_cache=True, check_runtime=False)
    names = json.loads((tmp_path / "kv" / "names.json").read_text())
    geo = names["kv_cache"]
    patch, patched = make_patch(base_state(tiny_model_dirs["llama"]), PATCH_KEYS["llama"])
    inputs = example_inputs(128)
    empty = np.zeros((inputs["input_ids"].shape[0], geo["kv_heads"], 0, geo["head_dim"]), np.float32)
    session = create_session(tmp_path / "kv", [patch])
    got = session.run(["logits"], {**inputs, **{n: empty for n in names["inputs"][2:]}})[0]
    want = reference_logits(tiny_model_dirs["llama"], patched, inputs)
    assert masked_max_diff(got, want, inputs["attention_mask"]) <= MAX_LOGIT_DIFF


def test_greedy_generation_with_and_without_kv_cache_matches_pytorch(base_onnx, tiny_model_dirs, tmp_path):
    import torch

    from roselora_export.models import load_model
    from roselora_export.onnx.session import generate_greedy

    export_onnx(tiny_model_dirs["llama"], tmp_path / "kv", kv_cache=True, check_runtime=False)
    prompt = [5, 17, 99, 3, 42]
    model = load_model(tiny_model_dirs["llama"])
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    assert generate_greedy(create_session(base_onnx / "llama"), prompt, 6) == want
    assert generate_greedy(create_session(tmp_path / "kv"), prompt, 6) == want
