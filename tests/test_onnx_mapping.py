"""map-onnx on artifacts of other exporters (onnxruntime-genai builder, constant-folded torch.onnx), patched in place."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from roselora_export.errors import InputError
from roselora_export.onnx.mapping import apply_mapped, map_onnx, write_names
from roselora_export.onnx.names import NAMES_FILE, open_artifact
from roselora_export.onnx.patching import apply_to_onnx_dir
from test_onnx_support import MAX_LOGIT_DIFF, base_state, dir_fingerprint, make_patch, reference_logits
from tiny_models import save_model_dir, tiny_llama

og = pytest.importorskip("onnxruntime_genai")
from roselora_export.onnx.genai import build_genai, genai_generate, genai_logits  # noqa: E402

# Every kind of place in a genai artifact: q/k/v are slices of the fused qkv_proj (transposed), the tied
# embedding is lm_head's MatMul weight transposed, MLP weights transposed, the final norm as is.
GENAI_KEYS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]
IDS = np.array([[504, 3575, 282, 4649, 314, 7, 91, 2210]], dtype=np.int64)


def _fp(root, skip=()):
    return {k: v for k, v in dir_fingerprint(root).items() if k not in skip}


@pytest.fixture(scope="module")
def genai_dirs(tmp_path_factory, smollm_dir):
    """A tiny Llama (head size 16, as GroupQueryAttention needs) and its genai builds: fp32, fp16, int4."""
    root = tmp_path_factory.mktemp("genai")
    hf = save_model_dir(tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=128), root / "hf",
                        tokenizer_from=smollm_dir)
    dirs = {"hf": hf}
    for precision in ("fp32", "fp16", "int4"):
        build_genai(hf, root / precision, precision, cache_dir=root / "cache", log=root / f"{precision}.log")
        dirs[precision] = root / precision
    return dirs


@pytest.fixture
def copy_of(genai_dirs, tmp_path):
    def copy(which: str):
        shutil.copytree(genai_dirs[which], tmp_path / which)
        return tmp_path / which
    return copy


def test_genai_fp32_every_weight_is_found_with_its_layout(genai_dirs):
    names, report = map_onnx(genai_dirs["hf"], genai_dirs["fp32"])
    t = names["tensors"]
    assert report["unmapped"] == [] and report["tied"] == ["lm_head.weight"]
    assert t["model.layers.0.self_attn.q_proj.weight"]["at"] == [
        {"initializer": "model.layers.0.attn.qkv_proj.MatMul.weight", "transposed": True, "slice": [1, 0, 64]}]
    assert t["model.layers.0.self_attn.v_proj.weight"]["at"][0]["slice"] == [1, 96, 128]
    assert t["model.embed_tokens.weight"]["at"] == [{"initializer": "lm_head.MatMul.weight", "transposed": True}]
    assert t["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"
    # equal-valued norm weights (all ones in a fresh model) are told apart by name
    assert t["model.norm.weight"]["at"][0]["initializer"] == "model.layers.2.final_norm_layernorm.weight"


def test_patched_genai_artifact_matches_the_merged_torch_model(genai_dirs, copy_of):
    art = copy_of("fp32")
    before = dir_fingerprint(art)
    patch, patched = make_patch(base_state(genai_dirs["hf"]), GENAI_KEYS, scale=0.5)
    write_names(art, map_onnx(genai_dirs["hf"], art)[0])
    report = apply_to_onnx_dir(art, [patch], None, in_place=True)
    assert report["elements"] > 0
    got = genai_logits(art, IDS[0])
    want = reference_logits(genai_dirs["hf"], patched, {"input_ids": IDS, "attention_mask": np.ones_like(IDS)})[0]
    base = reference_logits(genai_dirs["hf"], {}, {"input_ids": IDS, "attention_mask": np.ones_like(IDS)})[0]
    assert np.abs(got - want).max() < MAX_LOGIT_DIFF
    assert np.abs(base - want).max() > 100 * MAX_LOGIT_DIFF  # the edit shows in the logits
    new, _ = genai_generate(art, "The capital of France is", 6)
    model_ids = og.Tokenizer(og.Model(str(art))).encode("The capital of France is")
    assert new == _torch_greedy(genai_dirs["hf"], patched, list(model_ids), 6)
    apply_to_onnx_dir(art, [patch], None, in_place=True, revert=True)
    assert _fp(art, skip={NAMES_FILE}) == before


def _torch_greedy(model_dir, patched, ids, n):
    from roselora_export.models import load_model

    model = load_model(model_dir, task="causal-lm")
    with torch.no_grad():
        sd = model.state_dict()
        for key, value in patched.items():
            sd[key].copy_(value)
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_apply_with_base_model_maps_on_demand_in_place_and_into_a_copy(genai_dirs, copy_of, tmp_path):
    art = copy_of("fp32")
    patch, _ = make_patch(base_state(genai_dirs["hf"]), GENAI_KEYS[:3])
    apply_mapped(art, [patch], tmp_path / "out", base_model=genai_dirs["hf"])
    assert not (art / NAMES_FILE).exists()  # --out leaves the input untouched
    assert json.loads((tmp_path / "out" / NAMES_FILE).read_text())["format"] == 2
    apply_mapped(tmp_path / "out", [patch], None, base_model=None, in_place=True, revert=True)
    assert _fp(tmp_path / "out", skip={NAMES_FILE}) == dir_fingerprint(art)
    apply_mapped(art, [patch], None, base_model=genai_dirs["hf"], in_place=True)
    assert (art / NAMES_FILE).is_file()


def test_fp16_artifact_of_an_fp32_checkpoint_takes_an_fp16_patch_and_refuses_an_fp32_one(genai_dirs, copy_of):
    art = copy_of("fp16")
    before = dir_fingerprint(art)
    names, report = map_onnx(genai_dirs["hf"], art)
    assert report["places"]["cast"] == report["mapped"] - 1  # every weight, cast (the tied alias aside)
    write_names(art, names)
    fp32_patch, _ = make_patch(base_state(genai_dirs["hf"]), GENAI_KEYS[:2])
    with pytest.raises(InputError, match=r"stores it as F16, cast from the checkpoint's F32.*fp32 patch|F32 patch"):
        apply_to_onnx_dir(art, [fp32_patch], None, in_place=True)
    state16 = {k: v.to(torch.float16) for k, v in base_state(genai_dirs["hf"]).items()}
    patch16, _ = make_patch(state16, GENAI_KEYS, scale=0.25)
    apply_to_onnx_dir(art, [patch16], None, in_place=True)
    assert _fp(art, skip={NAMES_FILE}) != before
    apply_to_onnx_dir(art, [patch16], None, in_place=True, revert=True)
    assert _fp(art, skip={NAMES_FILE}) == before


def test_fp16_artifact_takes_the_patch_of_merge_dtype_fp16_and_refuses_the_fp32_one_by_name(genai_dirs, copy_of,
                                                                                            tmp_path):
    # As a user does it: an edit's adapter merged twice (fp32, and --dtype fp16), applied through the CLI.
    from click.testing import CliRunner

    from roselora_export.cli import main
    from test_patch_fixtures import make_adapter

    art = copy_of("fp16")
    before = dir_fingerprint(art)
    adapter = make_adapter(genai_dirs["hf"], tmp_path / "adapter")
    runner = CliRunner()
    for dtype in ("fp32", "fp16"):
        r = runner.invoke(main, ["merge", "--base", str(genai_dirs["hf"]), "--adapter", str(adapter), "--out",
                                 str(tmp_path / f"m{dtype}"), "--dtype", dtype])
        assert r.exit_code == 0, r.output
    apply = ["apply", "--base", str(art), "--base-model", str(genai_dirs["hf"]), "--in-place", "--patch"]
    r = runner.invoke(main, apply + [str(tmp_path / "mfp32.patch.safetensors")])
    assert r.exit_code == 2
    assert "q_proj.weight: the artifact stores it as F16, cast from the checkpoint's F32" in r.output
    assert "merge --dtype fp16" in r.output
    assert _fp(art, skip={NAMES_FILE}) == before  # refused whole: nothing written (but the mapping)
    r = runner.invoke(main, apply + [str(tmp_path / "mfp16.patch.safetensors")])
    assert r.exit_code == 0, r.output
    assert _fp(art, skip={NAMES_FILE}) != before
    r = runner.invoke(main, ["apply", "--base", str(art), "--in-place", "--revert", "--patch",
                             str(tmp_path / "mfp16.patch.safetensors")])
    assert r.exit_code == 0, r.output
    assert _fp(art, skip={NAMES_FILE}) == before


def test_int4_artifact_is_refused_with_the_reason(genai_dirs, copy_of):
    art = copy_of("int4")
    with pytest.raises(InputError, match="MatMulNBits"):
        map_onnx(genai_dirs["hf"], art)
    assert not (art / NAMES_FILE).exists()


def test_artifact_of_another_model_is_refused_and_nothing_is_written(genai_dirs, copy_of, tmp_path):
    other = save_model_dir(tiny_llama(seed=5, vocab_size=49152, hidden_size=64, intermediate_size=128), tmp_path / "o")
    art = copy_of("fp32")
    before = dir_fingerprint(art)
    with pytest.raises(InputError, match="another model"):
        map_onnx(other, art)
    patch, _ = make_patch(base_state(genai_dirs["hf"]), GENAI_KEYS[:2])
    with pytest.raises(InputError, match="another model"):
        apply_mapped(art, [patch], None, base_model=other, in_place=True)
    assert dir_fingerprint(art) == before


def test_truncated_external_data_is_refused(genai_dirs, copy_of):
    art = copy_of("fp32")
    data = art / "model.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 4096)
    with pytest.raises(InputError, match="truncated"):
        map_onnx(genai_dirs["hf"], art)


def test_map_onnx_cli_writes_names_and_apply_refuses_without_them(genai_dirs, copy_of):
    art = copy_of("fp32")
    cli = [sys.executable, "-m", "roselora_export.cli"]
    r = subprocess.run(cli + ["apply", "--base", str(art), "--patch", "x.patch", "--in-place"], capture_output=True,
                       text=True)
    assert r.returncode == 2
    r = subprocess.run(cli + ["map-onnx", "--base", str(genai_dirs["hf"]), "--onnx", str(art), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["places"]["slice"] == 6
    assert open_artifact(art).targets("model.layers.1.self_attn.k_proj.weight")[0].region == (1, 64, 96)


# --- torch.onnx.export with constant folding: anonymous onnx::MatMul_N initializers holding W.T, inline


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """A tiny Llama exported by torch.onnx (legacy) with do_constant_folding=True, weights inline."""
    root = tmp_path_factory.mktemp("folded")
    model = tiny_llama(seed=2, tie_word_embeddings=False)
    with torch.no_grad():  # distinct norm weights, so every weight has a value of its own
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape) * 0.1)
    hf = save_model_dir(model, root / "hf")
    model.set_attn_implementation("eager")
    ids = torch.tensor(IDS[:, :6] % 128)
    (root / "onnx").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model).eval(), (ids, torch.ones_like(ids)), str(root / "onnx" / "model.onnx"),
                          dynamo=False, do_constant_folding=True, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
    return hf, root / "onnx"


def _ort_logits(art, ids):
    sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def test_constant_folded_export_maps_transposed_copies_and_patches_inline_bytes(folded, tmp_path):
    hf, src = folded
    art = tmp_path / "art"
    shutil.copytree(src, art)
    names, report = map_onnx(hf, art)
    t = names["tensors"]
    q = t["model.layers.0.self_attn.q_proj.weight"]["at"]
    assert q[0]["initializer"].startswith("onnx::MatMul_") and q[0]["transposed"]
    assert report["unmapped"] == []
    write_names(art, names)
    before = dir_fingerprint(art)
    keys = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight",
            "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"]
    patch, patched = make_patch(base_state(hf), keys, scale=0.5)
    apply_to_onnx_dir(art, [patch], None, in_place=True)
    ids = IDS % 128
    want = reference_logits(hf, patched, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert np.abs(_ort_logits(art, ids) - want).max() < MAX_LOGIT_DIFF
    apply_to_onnx_dir(art, [patch], None, in_place=True, revert=True)
    assert dir_fingerprint(art) == before


def test_patch_partly_covered_by_the_mapping_is_refused_whole(folded, tmp_path):
    hf, src = folded
    art = tmp_path / "art"
    shutil.copytree(src, art)
    names, _ = map_onnx(hf, art)
    names["tensors"]["model.layers.1.mlp.up_proj.weight"] = {"shape": [64, 32], "dtype": "F32",
                                                              "reason": "folded into another tensor"}
    write_names(art, names)
    before = dir_fingerprint(art)
    patch, _ = make_patch(base_state(hf), ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(InputError, match=r"refusing the whole patch, 1 of 2 .*up_proj.*folded"):
        apply_to_onnx_dir(art, [patch], None, in_place=True)
    assert dir_fingerprint(art) == before


def test_deduplicated_equal_weights_are_refused_by_name(tmp_path):
    """torch.onnx stores equal-valued weights once (all-ones norms of a fresh model): such keys are shared."""
    model = tiny_llama(seed=3)
    hf = save_model_dir(model, tmp_path / "hf")
    model.set_attn_implementation("eager")
    ids = torch.tensor(IDS[:, :5] % 128)
    (tmp_path / "onnx").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model).eval(), (ids, torch.ones_like(ids)), str(tmp_path / "onnx" / "model.onnx"),
                          dynamo=False, do_constant_folding=True, opset_version=17)
    names, report = map_onnx(hf, tmp_path / "onnx")
    assert "model.norm.weight" in report["unmapped"]
    write_names(tmp_path / "onnx", names)
    patch, _ = make_patch(base_state(hf), ["model.norm.weight"])
    with pytest.raises(InputError, match="deduplicated"):
        apply_to_onnx_dir(tmp_path / "onnx", [patch], None, in_place=True)


def test_wire_walk_finds_each_inline_initializer_at_its_bytes(folded):
    import onnx

    from roselora_export.onnx.wire import inline_data_ranges

    _, art = folded
    path = art / "model.onnx"
    raw = path.read_bytes()
    model = onnx.load(str(path))
    ranges = inline_data_ranges(path)
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.raw_data]
    assert floats and all(raw[ranges[t.name][0]: sum(ranges[t.name])] == t.raw_data for t in floats)



def test_onnx_generate_runtime_genai_runs_a_patch_on_a_copy_and_leaves_the_artifact(genai_dirs, copy_of, tmp_path):
    from click.testing import CliRunner

    from roselora_export.cli import main

    art = copy_of("fp32")
    write_names(art, map_onnx(genai_dirs["hf"], art)[0])
    before = dir_fingerprint(art)
    patch, _ = make_patch(base_state(genai_dirs["hf"]), GENAI_KEYS, scale=0.5)
    from roselora_export.patch.io import save_patch

    save_patch(patch, tmp_path / "p.patch.safetensors")
    args = ["onnx-generate", "--onnx", str(art), "--prompt", "The capital of France is", "--max-new-tokens", "5",
            "--json"]
    r = CliRunner().invoke(main, args + ["--patch", str(tmp_path / "p.patch.safetensors")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["runtime"] == "onnxruntime-genai"
    assert dir_fingerprint(art) == before
    apply_to_onnx_dir(art, [patch], None, in_place=True)
    assert out["results"][0]["new_token_ids"] == genai_generate(art, "The capital of France is", 5)[0]
    plain = json.loads(CliRunner().invoke(main, args[:-1] + ["--runtime", "genai", "--json"]).output)
    assert plain["results"][0]["new_token_ids"] == out["results"][0]["new_token_ids"]


def test_weights_that_agree_on_every_sampled_element_but_differ_are_kept_apart(tmp_path):
    """The value index samples 64 elements; weights equal there but not elsewhere are not 'equal-valued'."""
    import onnx
    from onnx import helper, numpy_helper
    from safetensors.numpy import save_file

    a = np.linspace(1, 2, 1000, dtype=np.float32)
    b = a.copy()
    b[1] += 1.0  # np.linspace(0, 999, 64) samples 0, 15, 31, ...: element 1 is not among them
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"w.a": a, "w.b": b}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text("{}")
    art = tmp_path / "onnx"
    art.mkdir()
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "A"], ["s"]), helper.make_node("Add", ["s", "B"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1000])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1000])],
        [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")])
    onnx.save(helper.make_model(graph), str(art / "model.onnx"))
    names, report = map_onnx(hf, art)
    assert names["tensors"]["w.a"]["at"] == [{"initializer": "A", "transposed": False}]
    assert names["tensors"]["w.b"]["at"] == [{"initializer": "B", "transposed": False}]
    assert report["unmapped"] == []
