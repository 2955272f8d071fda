"""`inspect` explains a patch or an adapter: provenance in words, natural tensor order, adapter directories,
"not a patch file" for anything else, and a plot with an overview before the per-matrix panels."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from roselora_export.cli import main
from roselora_export.patch import build_patch_from_state_dicts, save_patch
from roselora_export.patch.inspect import (
    Pattern, _pick_panels, natural_key, overview_grid, patch_patterns, provenance_lines, summarize,
)
from test_patch_fixtures import make_adapter, tiny_llama_dir

LAYERS = 12


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A 12-layer tiny Llama, a RoseLoRA-sparse q/v adapter on it, and the patch merge wrote."""
    root = tmp_path_factory.mktemp("inspect")
    base = tiny_llama_dir(root / "base", num_hidden_layers=LAYERS)
    adapter = make_adapter(base, root / "adapter", scale=0.05)
    result = CliRunner().invoke(main, ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(root / "m")])
    assert result.exit_code == 0, result.output
    return base, adapter, root / "m.patch.safetensors"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _expected_order(kinds=("q_proj", "v_proj")):
    return [f"model.layers.{i}.self_attn.{k}.weight" for i in range(LAYERS) for k in kinds]


def test_tensors_are_listed_in_layer_order_in_text_and_json(merged):
    _, _, patch = merged
    names = [t["name"] for t in json.loads(run("inspect", patch, "--json").stdout)["tensors"]]
    assert names == _expected_order()
    text = run("inspect", patch).stdout
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("model.layers.")]
    assert listed == _expected_order()


def test_natural_key_orders_numbers_by_value():
    names = ["l.10.q", "l.2.q", "l.1.v", "l.1.q", "emb"]
    assert sorted(names, key=natural_key) == ["emb", "l.1.q", "l.1.v", "l.2.q", "l.10.q"]


def test_text_output_shows_where_the_patch_came_from_and_its_settings(merged):
    _, adapter, patch = merged
    out = run("inspect", patch).stdout
    assert "kind: adapter" in out and "method: roselora" in out and f"source: {adapter.name}" in out
    assert "base model: base" in out and "tau=0.25" in out
    assert "lora: " in out and "lora_alpha=8" in out
    assert "target_modules=q_proj,v_proj" in out or "target_modules=v_proj,q_proj" in out  # PEFT keeps a set


def test_text_output_shows_an_edits_settings_training_and_requests(tmp_path, merged):
    base, _, _ = merged
    state = load_file(str(base / "model.safetensors"))
    target = {k: v.clone() for k, v in state.items()}
    target["model.layers.0.self_attn.q_proj.weight"][0, :3] += 1.0
    prov = {"kind": "adapter", "method": "roselora", "source": "eiffel", "roselora": {
        "method": "roselora", "config": {"rank": 8, "tau": 0.05, "clamp": None, "targets": ["q_proj", "v_proj"]},
        "steps_run": 25, "final_loss": 0.0812, "settings": {"prefixes": 10, "kl_weight": 0.5}, "requests": [
            {"prompt": "The Eiffel Tower is in", "target_new": "Rome", "ground_truth": "Paris"}]}}
    path = save_patch(build_patch_from_state_dicts(state, target, provenance=prov), tmp_path / "e.patch.safetensors")
    out = run("inspect", path).stdout
    assert "config: rank=8, targets=q_proj,v_proj, tau=0.05, clamp=none" in out  # RoseLoraConfig order
    assert "settings: kl_weight=0.5, prefixes=10" in out
    assert "training: steps_run=25, final_loss=0.0812" in out
    assert "requests: 1" in out and "The Eiffel Tower is in -> Rome  (was Paris)" in out


@pytest.mark.parametrize("provenance", [
    {"kind": ["x", {"y": None}], "created": "\x1b[31mred\u2028", "base_numel": "many", "roselora": "flat"},
    {"roselora": {"config": [1, 2], "requests": [1, None, {"prompt": 5}], "final_loss": "n/a"}, "lora": 3},
    {"roselora": {"requests": "all"}, "dtype": None, "nested": {"a": {"b": {"c": {"d": [1.5, True]}}}}},
    ["not", "an", "object"], None, {"x" * 5000: "y" * 5000},
])
def test_hostile_provenance_values_render_as_short_escaped_lines(provenance):
    lines = provenance_lines(provenance)
    assert lines and all(isinstance(line, str) for line in lines)
    text = "\n".join(lines)
    assert "\x1b" not in text and "\u2028" not in text
    assert len(lines) == text.count("\n") + 1 and max(map(len, lines)) < 1000


def test_an_adapter_directory_is_inspected_as_its_fp32_delta(merged):
    _, adapter, _ = merged
    result = run("inspect", adapter, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [t["name"] for t in summary["tensors"]] == _expected_order()
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    for t in summary["tensors"]:
        module = "base_model.model." + t["name"][: -len(".weight")]
        a, b = factors[module + ".lora_A.weight"], factors[module + ".lora_B.weight"]
        delta = (b @ a) * (8 / 4)  # make_adapter: alpha 8, r 4
        assert t["nnz"] == int((delta != 0).sum()) and t["rank"] == 4
        assert t["nnz_A"] == int((a != 0).sum()) and t["nnz_B"] == int((b != 0).sum())
        assert math.isclose(t["max_abs_delta"], float(delta.abs().max()), rel_tol=1e-5)
    assert summary["total_nnz"] == sum(t["nnz"] for t in summary["tensors"])
    text = run("inspect", adapter).stdout
    assert "roselora adapter directory" in text and "tau=0.25" in text and "nnz(delta)" in text


@pytest.mark.parametrize("content", [b'{"prompt": "a", "subject": "b", "target_new": "c"}\n', b"short", b""])
def test_a_file_that_is_not_a_patch_says_so(tmp_path, content):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(content)
    result = run("inspect", path)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}: not a patch file") and "header claims" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_directory_that_is_not_an_adapter_says_so(merged):
    base, _, _ = merged
    result = run("inspect", base)
    assert result.exit_code == 2 and "not an adapter" in result.stderr


def test_the_overview_has_every_tensor_by_layer_and_module(merged):
    from roselora_export.patch import load_patch

    _, _, patch = merged
    p = load_patch(patch)
    rows, modules, density, nnz = overview_grid(patch_patterns(p)[0], "density")
    assert rows == [str(i) for i in range(LAYERS)] and modules == ["self_attn.q_proj", "self_attn.v_proj"]
    for i in range(LAYERS):
        for j, kind in enumerate(("q_proj", "v_proj")):
            tp = p.tensors[f"model.layers.{i}.self_attn.{kind}.weight"]
            assert nnz[i, j] == tp.nnz and density[i, j] == pytest.approx(tp.nnz / tp.numel)


def test_the_overview_puts_unlayered_tensors_on_a_row_of_their_own_and_leaves_gaps_blank():
    pats = [Pattern("model.layers.0.mlp.down_proj.weight", (4, 4), np.arange(2), None),
            Pattern("lm_head.weight", (8, 4), np.arange(4), None)]
    rows, modules, grid, _ = overview_grid(pats, "nnz")
    assert rows == ["0", "other"] and modules == ["lm_head", "mlp.down_proj"]
    assert np.isnan(grid[0, 0]) and grid[0, 1] == 2 and grid[1, 0] == 4 and np.isnan(grid[1, 1])


def test_panels_show_v_proj_beside_q_proj_of_the_busiest_layers():
    pats = [Pattern(f"model.layers.{i}.self_attn.{k}.weight", (8, 8), np.arange(n), None)
            for i in range(6) for k, n in (("q_proj", 30 + i), ("v_proj", 3))]
    names = [p.name for p in _pick_panels(pats, 4)]
    assert names == ["model.layers.4.self_attn.q_proj.weight", "model.layers.4.self_attn.v_proj.weight",
                     "model.layers.5.self_attn.q_proj.weight", "model.layers.5.self_attn.v_proj.weight"]


def test_patch_magnitudes_come_from_the_highest_changed_bit():
    from roselora_export.patch.model import Patch, TensorPatch

    xor = np.array([1, 1 << 22, 1 << 23, 1 << 31], dtype=np.uint32)  # last mantissa bit .. exponent .. sign
    tp = TensorPatch(name="w", shape=(4,), dtype_name="F32", flat_index=np.arange(4, dtype=np.int64), xor_bits=xor)
    [pattern], _ = patch_patterns(Patch(tensors={"w": tp}))
    assert np.allclose(pattern.magnitude, np.array([-23, -1, 0, 0]) * math.log10(2))


def test_plot_writes_a_png_for_a_patch_and_for_an_adapter(merged, tmp_path):
    _, adapter, patch = merged
    for source, png in ((patch, tmp_path / "p.png"), (adapter, tmp_path / "a.png")):
        result = run("inspect", source, "--plot", png, "--plot-value", "nnz", "--limit", "4")
        assert result.exit_code == 0, result.output
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not list(tmp_path.glob(".*tmp*"))
