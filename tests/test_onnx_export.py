"""export-onnx: graph + aligned external data + names.json, verified against the PyTorch model."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.onnx.export import export_onnx
from roselora_export.onnx.names import ALIGN_SMALL, open_artifact
from test_onnx_support import MAX_LOGIT_DIFF, TASKS, base_state, example_inputs, masked_max_diff, reference_logits


@pytest.fixture(scope="module")
def exported(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-export")
    return {arch: (export_onnx(tiny_model_dirs[arch], root / arch), root / arch) for arch in TASKS}


@pytest.mark.parametrize("arch", list(TASKS))
def test_export_passes_the_onnx_checker_with_external_data(exported, arch):
    _, out = exported[arch]
    onnx.checker.check_model(str(out / "model.onnx"))
    assert (out / "model.onnx.data").stat().st_size > 0
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@pytest.mark.parametrize("arch", list(TASKS))
def test_every_state_dict_key_maps_to_an_initializer_holding_its_bytes(exported, tiny_model_dirs, arch):
    _, out = exported[arch]
    art = open_artifact(out)
    state = base_state(tiny_model_dirs[arch])
    assert set(state) <= set(art.names["tensors"])
    data = (out / "model.onnx.data").read_bytes()
    for key, value in state.items():
        target = art.target(key)
        stored = np.frombuffer(data[target.location.offset: target.location.offset + target.location.length], np.float32)
        stored = stored.reshape(target.location.shape)
        assert np.array_equal(stored.T if target.transposed else stored, value.numpy()), key


def test_tied_lm_head_shares_the_embedding_initializer(exported):
    _, out = exported["llama"]
    tensors = json.loads((out / "names.json").read_text())["tensors"]
    assert tensors["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"
    assert tensors["lm_head.weight"]["initializer"] == tensors["model.embed_tokens.weight"]["initializer"]


def test_equal_valued_parameters_keep_their_own_initializers(exported):
    # Tiny Llama's norm weights are all ones: the exporter would deduplicate them into one initializer.
    _, out = exported["llama"]
    tensors = json.loads((out / "names.json").read_text())["tensors"]
    norms = [k for k in tensors if k.endswith("layernorm.weight")]
    assert len(norms) == 4
    assert len({tensors[k]["initializer"] for k in norms}) == 4


def test_initializers_are_named_by_state_dict_key(exported):
    _, out = exported["gpt2"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert "transformer.h.0.attn.c_attn.weight" in {t.name for t in model.graph.initializer}


@pytest.mark.parametrize("arch", list(TASKS))
def test_tensor_starts_are_page_aligned(exported, arch):
    _, out = exported[arch]
    assert all(loc.offset % ALIGN_SMALL == 0 for loc in open_artifact(out).locations.values())


@pytest.mark.parametrize("arch", list(TASKS))
def test_graph_runs_any_batch_and_sequence_like_pytorch(exported, tiny_model_dirs, arch):
    report, out = exported[arch]
    assert report["max_abs_logit_diff"] <= MAX_LOGIT_DIFF
    inputs = example_inputs(128, batch=3, seq=13)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], inputs)[0]
    want = reference_logits(tiny_model_dirs[arch], {}, inputs, TASKS[arch])
    assert got.shape == want.shape
    assert masked_max_diff(got, want, inputs["attention_mask"]) <= MAX_LOGIT_DIFF


def test_export_report_names_task_and_tied_keys(exported):
    report, _ = exported["bert"]
    assert report["task"] == "sequence-classification" and report["tied"] == [] and report["unmapped"] == []


def test_cli_refuses_an_existing_nonempty_out_dir(tiny_model_dirs, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = CliRunner().invoke(main, ["export-onnx", "--model", str(tiny_model_dirs["llama"]), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "not an empty directory" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_refuses_a_directory_without_a_model(tmp_path):
    result = CliRunner().invoke(main, ["export-onnx", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no config.json" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_json_report(tiny_model_dirs, tmp_path):
    result = CliRunner().invoke(main, ["export-onnx", "--model", str(tiny_model_dirs["gpt2"]), "--out",
                                       str(tmp_path / "o"), "--json", "--no-check"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["task"] == "causal-lm" and report["max_abs_logit_diff"] is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_graph_decodes_incrementally_like_pytorch(tiny_model_dirs, tmp_path, arch):
    report = export_onnx(tiny_model_dirs[arch], tmp_path / "kv", kv_cache=True)
    assert report["max_abs_logit_diff"] <= MAX_LOGIT_DIFF
    names = json.loads((tmp_path / "kv" / "names.json").read_text())
    past_names = names["inputs"][2:]
    geo = names["kv_cache"]
    assert len(past_names) == 2 * geo["layers"]
    sess = ort.InferenceSession(str(tmp_path / "kv" / "model.onnx"), providers=["CPUExecutionProvider"])
    full = example_inputs(128, batch=1, seq=9)["input_ids"]
    empty = np.zeros((1, geo["kv_heads"], 0, geo["head_dim"]), np.float32)
    first = sess.run(None, {"input_ids": full[:, :6], "attention_mask": np.ones((1, 6), np.int64),
                            **{n: empty for n in past_names}})
    second = sess.run(None, {"input_ids": full[:, 6:], "attention_mask": np.ones((1, 9), np.int64),
                             **dict(zip(past_names, first[1:]))})
    want = reference_logits(tiny_model_dirs[arch], {}, {"input_ids": full, "attention_mask": np.ones_like(full)})
    assert np.abs(np.concatenate([first[0], second[0]], axis=1) - want).max() <= MAX_LOGIT_DIFF


def test_kv_cache_is_refused_for_sequence_classification(tiny_model_dirs, tmp_path):
    result = CliRunner().invoke(main, ["export-onnx", "--model", str(tiny_model_dirs["bert"]), "--out",
                                       str(tmp_path / "o"), "--kv-cache"])
    assert result.exit_code == 2 and "causal LM" in result.output
