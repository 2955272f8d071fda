"""SmolLM2 through onnxruntime-genai: builder artifact, map-onnx, an edit patched in place, answers as torch's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from roselora_export.onnx.mapping import map_onnx, write_names
from roselora_export.onnx.patching import apply_to_onnx_dir
from test_onnx_support import MAX_LOGIT_DIFF, base_state, dir_fingerprint, make_patch

og = pytest.importorskip("onnxruntime_genai")
from roselora_export.onnx.genai import build_genai, genai_generate, genai_logits  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
# RoseLoRA's default targets (q/v: slices of the fused qkv_proj) and the tied embedding (lm_head's MatMul, transposed).
KEYS = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (3, 11, 20) for p in ("q", "v")] + [
    "model.layers.7.mlp.down_proj.weight", "model.embed_tokens.weight"]


@pytest.mark.smollm
@pytest.mark.slow
def test_smollm_genai_artifact_patched_in_place_answers_as_the_merged_torch_model(smollm_dir, tmp_path):
    from roselora_export.models import load_model

    art = tmp_path / "genai"
    build_genai(smollm_dir, art, "fp32", cache_dir=tmp_path / "cache", log=tmp_path / "build.log")
    before = dir_fingerprint(art)
    names, report = map_onnx(smollm_dir, art)
    assert report["unmapped"] == [] and report["places"]["slice"] == 90  # q, k, v of 30 layers
    write_names(art, names)
    state = base_state(smollm_dir)
    patch, patched = make_patch({k: state[k] for k in KEYS}, KEYS, scale=0.05)
    apply_to_onnx_dir(art, [patch], None, in_place=True)

    model = load_model(smollm_dir)
    with torch.no_grad():
        sd = model.state_dict()
        for key, value in patched.items():
            sd[key].copy_(value)
        ids = list(og.Tokenizer(og.Model(str(art))).encode(PROMPT))
        want = model(torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=2)[0, len(ids):]
    assert np.abs(genai_logits(art, ids) - want).max() < MAX_LOGIT_DIFF
    new, _ = genai_generate(art, PROMPT, 8)
    eos = 2  # onnxruntime-genai stops at EOS without returning it; transformers returns it
    want_ids = greedy.tolist()
    assert new == (want_ids[: want_ids.index(eos)] if eos in want_ids else want_ids) and new
    apply_to_onnx_dir(art, [patch], None, in_place=True, revert=True)
    assert {k: v for k, v in dir_fingerprint(art).items() if k != "names.json"} == before
