"""benchmark-edits and evaluate: exact revert between edits, the JSON schema, bad input, one real SmolLM2 run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.edit.benchmark import benchmark_edits, state_sha256
from roselora_export.edit.requests import load_requests
from roselora_export.method.config import RoseLoraConfig

DEV_SET = Path(__file__).resolve().parent.parent / "examples" / "edits" / "counterfact_dev.jsonl"


@pytest.fixture(scope="module")
def two_requests(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("req") / "two.jsonl"
    path.write_text("".join(DEV_SET.read_text().splitlines(keepends=True)[:2]))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    from roselora_export.models import load_model, load_tokenizer

    return load_model(tiny_model_dirs["llama"]), load_tokenizer(tiny_model_dirs["llama"])


def test_benchmark_leaves_the_base_bit_identical_after_every_edit(tiny, two_requests):
    model, tok = tiny
    before = state_sha256(model)
    seen = []
    report = benchmark_edits(model, tok, load_requests(two_requests), ["roselora", "lora", "ft-l"],
                             RoseLoraConfig(steps=3, t_init=1, t_final=2),
                             on_edit=lambda m, i: seen.append((m, i, state_sha256(model))))
    assert [(m, i) for m, i, _ in seen] == [(m, i) for m in ("roselora", "lora", "ft-l") for i in (0, 1)]
    assert all(h == before for _, _, h in seen)
    assert all(report["methods"][m]["bits_checked"] == 2 for m in ("roselora", "lora", "ft-l"))


def test_each_method_modifies_weights_and_roselora_the_fewest(tiny, two_requests):
    model, tok = tiny
    report = benchmark_edits(model, tok, load_requests(two_requests), ["roselora", "lora"],
                             RoseLoraConfig(steps=3, t_init=1, t_final=2), check_bits=False)
    rose, lora = report["methods"]["roselora"], report["methods"]["lora"]
    assert 0 < rose["params_modified"] < lora["params_modified"]


def test_benchmark_edits_json_has_the_issue_schema(tiny_model_dirs, two_requests):
    res = CliRunner().invoke(main, ["benchmark-edits", "--model", str(tiny_model_dirs["llama"]), "--requests",
                                    str(two_requests), "--methods", "lora,ft-l", "--steps", "2", "--mass", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out["methods"]) == {"lora", "ft-l"}
    for m in out["methods"].values():
        for key in ("reliability", "generalization", "locality", "params_modified_fraction", "seconds_per_edit"):
            assert key in m
        assert 0 <= m["locality"] <= 1 and m["mode"] == "mass" and len(m["per_request"]) == 2


def test_evaluate_an_adapter_counts_the_weights_it_modifies(tiny, tiny_model_dirs, two_requests, tmp_path):
    from roselora_export.edit.train import save_edit, train_edit

    model, tok = tiny
    result = train_edit(model, tok, load_requests(two_requests), method="roselora",
                        config=RoseLoraConfig(steps=3, t_init=1, t_final=2))
    save_edit(result, tmp_path / "adapter")
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_model_dirs["llama"]), "--requests",
                                    str(two_requests), "--adapter", str(tmp_path / "adapter"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert 0 < out["params_modified"] == result.summary()["weights_modified"]
    assert out["params_modified_fraction"] < 0.01
    assert len(out["per_request"]) == 2


def test_evaluate_rejects_adapter_and_patch_together(tiny_model_dirs, two_requests, tmp_path):
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_model_dirs["llama"]), "--requests",
                                    str(two_requests), "--adapter", str(tmp_path), "--patch", str(tmp_path / "p")])
    assert res.exit_code == 2
    assert "one or the other" in res.output


@pytest.mark.smollm
def test_smollm_two_requests_end_to_end(smollm_dir, two_requests):
    res = CliRunner().invoke(main, ["benchmark-edits", "--model", str(smollm_dir), "--requests", str(two_requests),
                                    "--methods", "roselora", "--json", "--preset", "paper"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    rose = out["methods"]["roselora"]
    assert rose["bits_checked"] == 2
    assert rose["params_modified_fraction"] < 0.001  # q_proj/v_proj of 30 layers, tau 0.05, rank 8
    assert rose["locality"] > 0.5


def test_evaluate_a_patch_file_counts_its_elements_and_measures_every_request(tiny, tiny_model_dirs, two_requests, tmp_path):
    from roselora_export.edit.train import save_edit, train_edit
    from roselora_export.patch import build_patch_from_adapter, save_patch

    model, tok = tiny
    result = train_edit(model, tok, load_requests(two_requests), method="lora", config=RoseLoraConfig(steps=3))
    save_edit(result, tmp_path / "adapter")
    patch = build_patch_from_adapter(tmp_path / "adapter", model.state_dict())
    save_patch(patch, tmp_path / "edit.patch")
    args = ["evaluate", "--model", str(tiny_model_dirs["llama"]), "--requests", str(two_requests), "--json"]
    by_patch = json.loads(CliRunner().invoke(main, args + ["--patch", str(tmp_path / "edit.patch")]).stdout)
    assert by_patch["params_modified"] == patch.total_nnz > 0
    assert by_patch["applied_as"] == "patch" and len(by_patch["per_request"]) == 2
    # Exact agreement with the unmerged adapter is not asserted: a random tiny model has near-tied logits.


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_evaluate_an_edited_directory_matches_the_patch_it_was_merged_with(tiny, tiny_model_dirs, two_requests,
                                                                           tmp_path, dtype):
    from roselora_export.checkpoint import merge_checkpoint
    from roselora_export.edit.train import save_edit, train_edit
    import torch

    model, tok = tiny
    result = train_edit(model, tok, load_requests(two_requests), method="lora", config=RoseLoraConfig(steps=3))
    save_edit(result, tmp_path / "adapter")
    merged = merge_checkpoint(tiny_model_dirs["llama"], tmp_path / "adapter", tmp_path / "merged",
                              dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    args = ["evaluate", "--model", str(tiny_model_dirs["llama"]), "--requests", str(two_requests), "--json"]
    res = CliRunner().invoke(main, args + ["--edited", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    by_dir = json.loads(res.stdout)
    assert by_dir["params_modified"] == merged.patch.total_nnz > 0
    assert by_dir["applied_as"] == f"edited model directory ({'F32' if dtype == 'fp32' else 'BF16'})"
    if dtype == "fp32":  # the merged directory is the base with the patch applied: the same model, the same scores
        by_patch = json.loads(CliRunner().invoke(main, args + ["--patch", str(merged.patch_path)]).stdout)
        assert by_dir["per_request"] == by_patch["per_request"]


def test_evaluate_refuses_an_edited_directory_of_another_architecture(tiny_model_dirs, two_requests):
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_model_dirs["llama"]), "--requests",
                                    str(two_requests), "--edited", str(tiny_model_dirs["gpt2"])])
    assert res.exit_code == 2
    assert "not the same architecture" in res.output


def test_evaluate_names_the_edited_option_in_its_errors(tiny_model_dirs, two_requests, tmp_path):
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_model_dirs["llama"]), "--requests",
                                    str(two_requests), "--edited", str(tmp_path / "missing")])
    assert res.exit_code == 2
    assert f"--edited {tmp_path / 'missing'}: not a directory" in res.output
