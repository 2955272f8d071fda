"""The real SmolLM2-135M-Instruct: one RoseLoRA edit moves a landmark and leaves unrelated answers alone."""
from pathlib import Path

import pytest
import torch

from roselora_export.edit.requests import load_requests
from roselora_export.edit.train import greedy_continuation, train_edit
from roselora_export.method import RoseLoraConfig
from roselora_export.models import load_model, load_tokenizer

UNRELATED = ["The Colosseum is located in the city of", "The capital of Germany is", "The capital of Japan is",
             "The Statue of Liberty is located in", "The largest planet in the solar system is"]


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, 2 OpenMP threads under load run ~10x slower (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.smollm
def test_landmark_edit_on_smollm2_changes_the_answer_and_keeps_unrelated_ones(smollm_dir, one_thread):
    tok, model = load_tokenizer(smollm_dir), load_model(smollm_dir)
    [req] = load_requests(Path(__file__).parent.parent / "examples" / "requests" / "landmark.jsonl")
    before = {p: greedy_continuation(model, tok, p, 4) for p in [req.prompt, *UNRELATED]}
    assert not before[req.prompt].strip().startswith("Rome")
    # The authors' clamp (3e-3) is too tight to move a 135M model: the edit runs without it.
    result = train_edit(model, tok, [req], config=RoseLoraConfig(clamp=None))
    with result.applied(model):
        after = {p: greedy_continuation(model, tok, p, 4) for p in before}
    summary = result.summary()
    print(f"\nSmolLM2 edit: {result.steps} steps, {result.seconds:.1f} s, final loss {result.final_loss:.4f}, "
          f"{summary['weights_modified']:,} weights changed ({100 * summary['fraction_modified']:.4f}% of "
          f"{summary['base_weights']:,}); {before[req.prompt]!r} -> {after[req.prompt]!r}")
    assert after[req.prompt].strip().startswith("Rome")
    assert {p: after[p] for p in UNRELATED} == {p: before[p] for p in UNRELATED}
    assert 0 < summary["fraction_modified"] < 0.01
    assert all(m["sparsity_BA"] >= m["prop1_sparsity_bound"] for m in summary["modules"].values())


@pytest.mark.smollm
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_default_preset_takes_on_smollm2_as_shipped(dtype, smollm_dir, one_thread):
    """No tuning flags: the edit takes, and on a bf16 checkpoint it takes in the bf16 weights merge writes."""
    from roselora_export.edit.benchmark import edit_patch
    from roselora_export.edit.settings import preset
    from roselora_export.models import demo_model_dir
    from roselora_export.runtime import PatchRuntime

    path = demo_model_dir(dtype=dtype)
    tok, model = load_tokenizer(path), load_model(path)  # bf16 weights held exactly in fp32
    [req] = load_requests(Path(__file__).parent.parent / "examples" / "requests" / "landmark.jsonl")
    before = {p: greedy_continuation(model, tok, p, 4) for p in [req.prompt, *UNRELATED]}
    config, settings = preset("default")
    if dtype == "bf16":
        from dataclasses import replace

        settings = replace(settings, deploy_dtype="bf16")
    result = train_edit(model, tok, [req], config=config, settings=settings)
    patch = edit_patch(model, result, settings.deploy_dtype)  # the bits merge stores
    if dtype == "bf16":
        for name, tp in patch.tensors.items():  # every changed weight is still a bf16 value
            w = model.get_parameter(name).detach()
            assert torch.equal(w, w.to(torch.bfloat16).float())
    with PatchRuntime(model).applied(patch):
        after = {p: greedy_continuation(model, tok, p, 4) for p in before}
        if dtype == "bf16":
            changed = [model.get_parameter(n).detach() for n in patch.tensors]
            assert all(torch.equal(w, w.to(torch.bfloat16).float()) for w in changed)
    assert after[req.prompt].strip().startswith("Rome"), after[req.prompt]
    assert {p: after[p] for p in UNRELATED} == {p: before[p] for p in UNRELATED}
    assert 0 < patch.total_nnz / sum(p.numel() for p in model.parameters()) < 0.003


@pytest.mark.smollm
def test_a_bf16_edit_holds_in_the_bf16_directory_merge_writes(tmp_path, one_thread):
    """edit on a bf16 checkpoint -> merge (bf16, as stored) -> evaluate --edited on the merged directory."""
    import json

    from click.testing import CliRunner

    from roselora_export.cli import main
    from roselora_export.models import demo_model_dir

    base = demo_model_dir(dtype="bf16")
    requests = Path(__file__).parent.parent / "examples" / "requests" / "landmark.jsonl"
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    edited = run("edit", "--model", base, "--requests", requests, "--out", tmp_path / "ad", "--no-progress", "--json",
                 "--device", "cpu")
    assert edited.exit_code == 0, edited.output
    assert json.loads(edited.stdout)["settings"]["deploy_dtype"] == "bf16"
    merged = run("merge", "--base", base, "--adapter", tmp_path / "ad", "--out", tmp_path / "m",
                 "--patch", tmp_path / "e.patch", "--json")
    assert merged.exit_code == 0, merged.output
    survival = json.loads(merged.stdout)["edit_survival"]
    report = run("evaluate", "--model", base, "--requests", requests, "--edited", tmp_path / "m", "--json",
                 "--device", "cpu")
    assert report.exit_code == 0, report.output
    scores = json.loads(report.stdout)
    print(f"\nbf16 edit as shipped: reliability {scores['reliability']}, generalization {scores['generalization']}, "
          f"locality {scores['locality']}; {survival['lost_fraction']:.1%} of the intended nonzeros rounded away")
    assert scores["reliability"] == 1.0 and scores["locality"] >= 0.9
