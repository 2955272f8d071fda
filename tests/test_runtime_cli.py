"""`roselora-export try` and PatchRuntime.apply on patch files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from roselora_export.cli import main
from roselora_export.errors import InputError
from roselora_export.patch import build_patch_from_state_dicts, config_fingerprint, save_patch
from roselora_export.runtime import PatchRuntime
from test_runtime_helpers import random_patch, state_hash
from tiny_models import tiny_llama


def _scrambled_patch(model_dir: Path, out: Path) -> Path:
    """A patch that rewrites a third of every matrix of the tiny Llama with large values: answers change."""
    base = load_file(str(model_dir / "model.safetensors"))
    target = {k: v.clone() for k, v in base.items()}
    g = torch.Generator().manual_seed(0)
    for t in target.values():
        if t.dim() == 2:
            mask = torch.rand(t.shape, generator=g) < 0.3
            t[mask] = torch.randn(int(mask.sum()), generator=g) * 5
    config = json.loads((model_dir / "config.json").read_text())
    patch = build_patch_from_state_dicts(base, target, provenance={"base_config_sha256": config_fingerprint(config)})
    return save_patch(patch, out)


@pytest.fixture(scope="module")
def llama_patch(tiny_model_dirs, tmp_path_factory) -> tuple[Path, Path]:
    model_dir = tiny_model_dirs["llama"]
    return model_dir, _scrambled_patch(model_dir, tmp_path_factory.mktemp("patch") / "edit.patch.safetensors")


def test_try_prints_base_patched_and_reverted_answers_and_a_bit_identical_revert(llama_patch):
    model_dir, patch = llama_patch
    result = CliRunner().invoke(main, ["try", "--model", str(model_dir), "--patch", str(patch), "--prompt",
                                       "The capital of France is", "--max-new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["bit_identical"] is True and out["base_sha256"] == out["reverted_sha256"]
    [answer] = out["answers"]
    assert answer["prompt"] == "The capital of France is"
    assert answer["patched"] != answer["base"]
    assert answer["reverted"] == answer["base"]
    assert out["apply_ms"] > 0 and out["revert_ms"] > 0 and out["nnz"] > 0


def test_try_text_output_names_the_times_and_the_bit_check(llama_patch):
    model_dir, patch = llama_patch
    result = CliRunner().invoke(main, ["try", "--model", str(model_dir), "--patch", str(patch), "--prompt", "Hello",
                                       "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "apply:" in result.output and "revert:" in result.output
    assert "bit-identical to base: yes" in result.output


def test_try_refuses_a_patch_for_another_model_with_exit_2(llama_patch, tiny_model_dirs):
    _, patch = llama_patch
    result = CliRunner().invoke(main, ["try", "--model", str(tiny_model_dirs["gpt2"]), "--patch", str(patch),
                                       "--prompt", "Hello", "--max-new-tokens", "2"])
    assert result.exit_code == 2
    assert result.output.startswith("error:") or "error:" in result.output


def test_try_refuses_a_corrupt_patch_file_with_exit_2(llama_patch, tmp_path):
    model_dir, patch = llama_patch
    data = bytearray(patch.read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "bad.patch.safetensors"
    bad.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["try", "--model", str(model_dir), "--patch", str(bad), "--prompt", "Hello"])
    assert result.exit_code == 2 and "error:" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_try_on_cuda_without_a_gpu_is_an_input_error(llama_patch):
    model_dir, patch = llama_patch
    result = CliRunner().invoke(main, ["try", "--model", str(model_dir), "--patch", str(patch), "--prompt", "Hi",
                                       "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_apply_reads_a_patch_file_and_reverts_exactly(tmp_path):
    model = tiny_llama(seed=7)
    base = state_hash(model)
    patch = random_patch(model, ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"], np.random.default_rng(0))
    path = save_patch(patch, tmp_path / "p.safetensors")
    rt = PatchRuntime(model)
    handle = rt.apply(path)
    assert handle.source == str(path) and state_hash(model) != base
    rt.revert(handle)
    assert state_hash(model) == base


def test_apply_refuses_a_truncated_patch_file_and_leaves_the_model_untouched(tmp_path):
    model = tiny_llama(seed=7)
    base = state_hash(model)
    path = save_patch(random_patch(model, ["model.layers.0.self_attn.q_proj.weight"], np.random.default_rng(1)),
                      tmp_path / "p.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError):
        PatchRuntime(model).apply(path)
    assert state_hash(model) == base


@pytest.mark.smollm
def test_a_patch_on_smollm2_q_and_v_applies_live_and_reverts_bit_exactly(smollm_dir):
    from roselora_export.models import load_model

    model = load_model(smollm_dir)
    base = state_hash(model)
    names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(0, 30, 3) for p in ("q", "v")]
    patch = random_patch(model, names, np.random.default_rng(2), frac=0.02, scale=0.01,
                         provenance={"base_config_sha256": config_fingerprint(model.config.to_dict())})
    rt = PatchRuntime(model)
    handle = rt.apply(patch)
    assert handle.nnz == patch.total_nnz and state_hash(model) != base
    rt.revert()
    assert state_hash(model) == base


def _try(*args):
    return CliRunner().invoke(main, ["try", *map(str, args)])


def test_try_answers_every_prompt_given_in_order(llama_patch):
    model_dir, patch = llama_patch
    result = _try("--model", model_dir, "--patch", patch, "--prompt", "The capital of France is", "--prompt", "Hello",
                  "--max-new-tokens", "3", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)["answers"]
    assert [a["prompt"] for a in answers] == ["The capital of France is", "Hello"]
    assert all(a["reverted"] == a["base"] for a in answers)


def test_try_reads_prompts_and_targets_from_a_requests_file(llama_patch, tmp_path):
    model_dir, patch = llama_patch
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Rome"})
                        + "\n" + json.dumps({"prompt": "Berlin is in", "subject": "Berlin", "target_new": "Spain"}) + "\n")
    result = _try("--model", model_dir, "--patch", patch, "--prompt", "Hello", "--requests", requests,
                  "--max-new-tokens", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("prompt:")]
    assert lines == ["prompt:   Hello", "prompt:   The Eiffel Tower is in   (target: Rome)",
                     "prompt:   Berlin is in   (target: Spain)"]


def test_try_without_a_prompt_is_an_input_error(llama_patch):
    model_dir, patch = llama_patch
    result = _try("--model", model_dir, "--patch", patch)
    assert result.exit_code == 2 and "error: give --prompt" in result.stderr


def test_try_device_auto_says_in_one_line_what_it_picked(llama_patch):
    model_dir, patch = llama_patch
    result = _try("--model", model_dir, "--patch", patch, "--prompt", "Hi", "--max-new-tokens", "1", "--json")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("device:")]
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert len(notes) == 1 and notes[0].startswith(f"device: {expected} (auto")
    assert json.loads(result.stdout)["device"] == expected


def test_try_no_progress_hides_the_model_loading_bar(llama_patch):
    model_dir, patch = llama_patch
    args = ["--model", model_dir, "--patch", patch, "--prompt", "Hi", "--max-new-tokens", "1", "--device", "cpu"]
    shown, hidden = _try(*args), _try(*args, "--no-progress")
    assert shown.exit_code == 0 and hidden.exit_code == 0, shown.output + hidden.output
    assert "Loading weights" in shown.stderr
    assert "Loading weights" not in hidden.stderr and hidden.stderr == ""


def test_try_model_defaults_to_the_embedded_model(llama_patch, monkeypatch):
    import roselora_export.models as models

    model_dir, patch = llama_patch
    monkeypatch.setattr(models, "demo_model_dir", lambda out=None: model_dir)
    result = _try("--patch", patch, "--prompt", "Hi", "--max-new-tokens", "1", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == str(model_dir)


def test_try_warns_in_one_line_when_a_requests_subject_is_not_in_its_prompt(llama_patch, tmp_path):
    model_dir, patch = llama_patch
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "The capital of Germany is", "subject": "Eiffel Tower",
                                    "target_new": "Rome"}) + "\n")
    result = _try("--model", model_dir, "--patch", patch, "--requests", requests, "--max-new-tokens", "1",
                  "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: r.jsonl line 1: subject 'Eiffel Tower' does not occur")
