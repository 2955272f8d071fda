"""The CLI on ONNX artifacts: `apply --base ONNX_DIR` and `merge --onnx`; bad input exits 2 with nothing modified."""
from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.onnx.export import export_onnx
from roselora_export.onnx.session import create_session
from roselora_export.patch import save_patch
from test_onnx_support import (
    MAX_LOGIT_DIFF, PATCH_KEYS, base_state, dir_fingerprint, example_inputs, make_patch, masked_max_diff,
    reference_logits, run,
)


@pytest.fixture(scope="module")
def llama_onnx(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-cli") / "llama"
    export_onnx(tiny_model_dirs["llama"], out, check_runtime=False)
    return out


@pytest.fixture
def art_and_patch(llama_onnx, tiny_model_dirs, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(llama_onnx, art)
    patch, _ = make_patch(base_state(tiny_model_dirs["llama"]), PATCH_KEYS["llama"])
    save_patch(patch, tmp_path / "edit.patch.safetensors")
    return art, tmp_path / "edit.patch.safetensors"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_apply_in_place_and_revert_through_the_cli(art_and_patch):
    art, patch_file = art_and_patch
    before = dir_fingerprint(art)
    assert cli("apply", "--base", art, "--patch", patch_file, "--in-place").exit_code == 0
    assert dir_fingerprint(art) != before
    assert cli("apply", "--base", art, "--patch", patch_file, "--in-place", "--revert").exit_code == 0
    assert dir_fingerprint(art) == before


def _refused(art, patch_file, message):
    before = dir_fingerprint(art)
    result = cli("apply", "--base", art, "--patch", patch_file, "--in-place")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error:") and message in result.output
    assert dir_fingerprint(art) == before


def test_cli_refuses_an_onnx_dir_without_names_json(art_and_patch):
    art, patch_file = art_and_patch
    (art / "names.json").unlink()
    _refused(art, patch_file, "no names.json")


def test_cli_refuses_a_patch_naming_a_tensor_the_model_lacks(art_and_patch, tiny_model_dirs, tmp_path):
    art, _ = art_and_patch
    state = base_state(tiny_model_dirs["llama"])
    wide = {"model.layers.5.mlp.up_proj.weight": state["model.layers.0.mlp.up_proj.weight"]}
    save_patch(make_patch(wide, list(wide))[0], tmp_path / "other.patch.safetensors")
    _refused(art, tmp_path / "other.patch.safetensors", "lacks")


def test_cli_refuses_truncated_external_data(art_and_patch):
    art, patch_file = art_and_patch
    with open(art / "model.onnx.data", "r+b") as f:
        f.truncate(4096)
    _refused(art, patch_file, "truncated")


def test_cli_refuses_missing_external_data(art_and_patch):
    art, patch_file = art_and_patch
    (art / "model.onnx.data").unlink()
    _refused(art, patch_file, "missing")


def test_cli_refuses_a_model_file_that_is_not_onnx(art_and_patch):
    art, patch_file = art_and_patch
    (art / "model.onnx").write_text("not a graph\n")
    _refused(art, patch_file, "not an ONNX model")


def test_merge_with_onnx_writes_a_patched_artifact_matching_the_merged_checkpoint(llama_onnx, tiny_model_dirs, tmp_path):
    from test_patch_fixtures import make_adapter

    adapter = make_adapter(tiny_model_dirs["llama"], tmp_path / "adapter", tau=0.25, scale=0.05)
    result = cli("merge", "--base", tiny_model_dirs["llama"], "--adapter", adapter, "--out", tmp_path / "merged",
                 "--onnx", llama_onnx)
    assert result.exit_code == 0, result.output
    inputs = example_inputs(128)
    got = run(create_session(tmp_path / "merged" / "onnx"), inputs)
    want = reference_logits(tmp_path / "merged", {}, inputs)
    base = reference_logits(tiny_model_dirs["llama"], {}, inputs)
    diff = masked_max_diff(got, want, inputs["attention_mask"])
    assert diff <= MAX_LOGIT_DIFF
    assert masked_max_diff(want, base, inputs["attention_mask"]) > 100 * diff


def test_merge_with_a_bad_onnx_dir_writes_nothing(tiny_model_dirs, tmp_path):
    from test_patch_fixtures import make_adapter

    adapter = make_adapter(tiny_model_dirs["llama"], tmp_path / "adapter", tau=0.25, scale=0.05)
    (tmp_path / "not-onnx").mkdir()
    result = cli("merge", "--base", tiny_model_dirs["llama"], "--adapter", adapter, "--out", tmp_path / "merged",
                 "--patch", tmp_path / "p.patch.safetensors", "--onnx", tmp_path / "not-onnx")
    assert result.exit_code == 2 and "names.json" in result.output
    assert not (tmp_path / "merged").exists() and not (tmp_path / "p.patch.safetensors").exists()


def test_merge_with_an_onnx_artifact_of_another_base_takes_back_the_merge(llama_onnx, tiny_model_dirs, tmp_path):
    from test_patch_fixtures import make_adapter

    other = tmp_path / "other"
    shutil.copytree(llama_onnx, other)
    data = next(p for p in other.iterdir() if p.suffix not in (".onnx", ".json") and p.stat().st_size > 100_000)
    data.write_bytes(bytes(b ^ 0x55 for b in data.read_bytes()))  # same layout, other weights
    adapter = make_adapter(tiny_model_dirs["llama"], tmp_path / "adapter", tau=0.25, scale=0.05)
    result = cli("merge", "--base", tiny_model_dirs["llama"], "--adapter", adapter, "--out", tmp_path / "merged",
                 "--patch", tmp_path / "p.patch.safetensors", "--onnx", other)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "merged").exists() and not (tmp_path / "p.patch.safetensors").exists()


def test_onnx_generate_runs_a_patch_file_without_changing_the_artifact(art_and_patch, tmp_path):
    import json

    from roselora_export.onnx.patching import apply_to_onnx_dir
    from roselora_export.onnx.session import generate_greedy
    from roselora_export.patch import load_patch

    art, patch_file = art_and_patch
    before = dir_fingerprint(art)
    result = cli("onnx-generate", "--onnx", art, "--patch", patch_file, "--prompt", "The capital of France is",
                 "--max-new-tokens", "5", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["results"][0]["new_token_ids"]
    assert dir_fingerprint(art) == before
    apply_to_onnx_dir(art, [load_patch(patch_file)], tmp_path / "patched")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(art))("The capital of France is")["input_ids"]
    assert got == generate_greedy(create_session(tmp_path / "patched"), ids, 5)[: len(got)]


def test_onnx_generate_answers_every_prompt_and_each_request_with_its_target(llama_onnx, tmp_path):
    import json

    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "Berlin is in", "subject": "Berlin", "target_new": "Spain"}) + "\n")
    result = cli("onnx-generate", "--onnx", llama_onnx, "--prompt", "Hello", "--prompt", "The capital of France is",
                 "--requests", requests, "--max-new-tokens", "2", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [(r["prompt"], r["target"]) for r in out["results"]] == [
        ("Hello", None), ("The capital of France is", None), ("Berlin is in", "Spain")]
    assert all(len(r["new_token_ids"]) == 2 for r in out["results"])
    assert out["providers"] == ["CPUExecutionProvider"]


def test_onnx_generate_device_auto_says_what_it_picked(llama_onnx):
    result = cli("onnx-generate", "--onnx", llama_onnx, "--prompt", "Hello", "--max-new-tokens", "1")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("device:")]
    assert len(notes) == 1 and "(auto" in notes[0]


def test_onnx_generate_on_cuda_without_the_cuda_provider_is_an_input_error(llama_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA execution provider")
    result = cli("onnx-generate", "--onnx", llama_onnx, "--prompt", "Hello", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA execution provider" in result.stderr


def test_onnx_generate_and_try_share_the_max_new_tokens_default():
    from roselora_export.cli import main as group

    ctx = __import__("click").Context(group)
    defaults = {name: {p.name: p.default for p in group.get_command(ctx, name).params}["max_new_tokens"]
                for name in ("try", "onnx-generate")}
    assert defaults["try"] == defaults["onnx-generate"]


def test_export_onnx_model_defaults_to_the_embedded_model(tiny_model_dirs, tmp_path, monkeypatch):
    import roselora_export.models as models

    monkeypatch.setattr(models, "demo_model_dir", lambda out=None: tiny_model_dirs["llama"])
    result = cli("export-onnx", "--out", tmp_path / "o", "--no-check", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "names.json").is_file()
