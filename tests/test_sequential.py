"""Lifelong editing pieces: PatchRuntime.commit, and benchmark-edits --sequential's curve and --no-reverts."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.errors import InputError
from roselora_export.runtime import PatchRuntime
from test_runtime_helpers import random_patch, state_hash
from tiny_models import tiny_llama

NAME = "model.layers.0.mlp.down_proj.weight"


def test_commit_keeps_the_bits_frees_revert_state_and_stops_blocking():
    model = tiny_llama(seed=1)
    rng = np.random.default_rng(0)
    rt = PatchRuntime(model)
    first = rt.apply(random_patch(model, [NAME], rng, frac=0.5))
    second = rt.apply(random_patch(model, [NAME], rng, frac=0.5))  # built on the patched state: overlaps `first`
    assert rt.blocking(first) is second
    patched = state_hash(model)
    rt.commit(second)
    assert state_hash(model) == patched and rt.active == [first] and second._old is None
    with pytest.raises(InputError, match="not applied"):
        rt.revert(second)
    assert rt.blocking(first) is None  # a committed patch is part of the base now


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


REQUESTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
     "ground_truth": "Paris", "rephrase_prompts": ["The Eiffel Tower stands in"],
     "locality": [{"prompt": "The sun rises in the", "answer": "east"}]},
    {"prompt": "The capital of Japan is", "subject": "Japan", "target_new": "Seoul", "ground_truth": "Tokyo",
     "locality": [{"prompt": "Bread is made of", "answer": "flour"}]},
    {"prompt": "Tesla is led by its CEO", "subject": "Tesla", "target_new": "Jeff Bezos", "ground_truth": "Elon Musk"},
]
FAST = ["--steps", "3", "--t-init", "1", "--t-final", "2", "--prefixes", "0", "--lr", "5e-2", "--no-progress"]


def test_sequential_curve_measures_the_first_t_requests_after_t_edits(tiny_model_dirs, tmp_path):
    path = tmp_path / "req.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    out = tmp_path / "seq.json"
    result = _cli(["benchmark-edits", "--model", tiny_model_dirs["llama"], "--requests", path, "--sequential",
                   "--methods", "roselora", "--measure-at", "1,2", "--out", out, *FAST])
    assert result.exit_code == 0, result.output
    m = json.loads(out.read_text())["methods"]["roselora"]
    assert [p["edits"] for p in m["curve"]] == [1, 2, 3]
    assert m["curve"][-1]["locality"] == m["locality"] and m["bits_identical_after_reverts"] is True
    unions = [p["params_touched_union_fraction"] for p in m["curve"]]
    assert 0 < unions[0] <= unions[1] <= unions[2] == m["params_touched_union_fraction"]
    assert "after   1" in _cli(["benchmark-edits", "--model", tiny_model_dirs["llama"], "--requests", path,
                                "--sequential", "--methods", "ft-l", "--measure-at", "1", *FAST]).stdout


def test_no_reverts_commits_each_patch_and_says_it_did_not_revert(tiny_model_dirs, tmp_path):
    path = tmp_path / "req.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS[:2]))
    result = _cli(["benchmark-edits", "--model", tiny_model_dirs["llama"], "--requests", path, "--sequential",
                   "--methods", "ft-l", "--no-reverts", "--json", *FAST])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)["methods"]["ft-l"]
    assert m["revert_order"] == [] and m["bits_identical_after_reverts"] is None and m["reverts"].startswith("not kept")
    assert m["patches_overlapping_an_earlier_one"] == 1  # ft-l edits one weight twice: counted even once committed


@pytest.mark.parametrize("args, message", [
    (["--measure-at", "5"], "--sequential only"),
    (["--sequential", "--measure-at", "ten"], "whole numbers"),
    (["--sequential", "--measure-at", "0"], ">= 1"),
])
def test_sequential_options_are_checked(tiny_model_dirs, tmp_path, args, message):
    path = tmp_path / "req.jsonl"
    path.write_text(json.dumps(REQUESTS[0]) + "\n")
    result = _cli(["benchmark-edits", "--model", tiny_model_dirs["llama"], "--requests", path, *args, *FAST])
    assert result.exit_code == 2 and message in result.output


def test_on_measure_gets_each_curve_point_as_it_is_measured(tiny_model_dirs):
    from roselora_export.edit.benchmark import sequential_edits
    from roselora_export.edit.requests import EditRequest
    from roselora_export.edit.settings import EditSettings
    from roselora_export.method import RoseLoraConfig
    from roselora_export.models import load_model, load_tokenizer

    path = tiny_model_dirs["llama"]
    requests = [EditRequest(prompt=r["prompt"], subject=r["subject"], target_new=r["target_new"]) for r in REQUESTS]
    seen = []
    report = sequential_edits(load_model(path), load_tokenizer(path), requests, "ft-l",
                              RoseLoraConfig(steps=2, t_init=1, t_final=1), settings=EditSettings(prefixes=0),
                              measure_at=[1, 2], on_measure=seen.append)
    assert [p["edits"] for p in seen] == [1, 2] and seen == report["curve"][:2]


@pytest.mark.parametrize("command", ["evaluate", "benchmark-edits", "serve"])
def test_every_command_that_loads_a_model_defaults_model_to_the_embedded_one(command):
    result = _cli([command, "--help"])
    assert result.exit_code == 0 and "[default: the embedded SmolLM2-135M-Instruct]" in result.output


def test_evaluate_without_model_measures_the_embedded_model(monkeypatch, tiny_model_dirs, tmp_path):
    from pathlib import Path

    from roselora_export import models

    monkeypatch.setattr(models, "demo_model_dir", lambda *a, **k: Path(tiny_model_dirs["llama"]))
    path = tmp_path / "req.jsonl"
    path.write_text(json.dumps(REQUESTS[0]) + "\n")
    result = _cli(["evaluate", "--requests", path, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["per_request"][0]["locality"] == 1.0  # the unedited model itself
