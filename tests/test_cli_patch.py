"""The merge / diff / apply / inspect commands: thin, with --json, and one-line errors with exit code 2."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from roselora_export.checkpoint import fingerprints
from roselora_export.cli import main
from test_patch_fixtures import make_adapter, tiny_llama_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama_dir(root / "base")
    return root, base, make_adapter(base, root / "adapter")


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def test_merge_json_reports_files_sizes_and_edit_survival(dirs, tmp_path):
    _, base, adapter = dirs
    r = run("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "m", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["patch"] == str(tmp_path / "m.patch.safetensors")
    assert report["total_nnz"] > 0 and report["bytes_per_nnz"] > 0
    assert {"intended_nnz", "lost_nnz", "lost_fraction", "rel_l2_error", "tensors"} <= set(report["edit_survival"])


def test_merge_warns_when_the_edit_is_mostly_rounded_away(dirs, tmp_path):
    _, base, _ = dirs
    tiny = make_adapter(base, tmp_path / "tiny", scale=2e-3, seed=4)
    r = run("merge", "--base", base, "--adapter", tiny, "--out", tmp_path / "m", "--dtype", "bf16")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stderr and "rounded away" in r.stderr


def test_inspect_json_has_the_documented_schema_and_plot_writes_a_png(dirs, tmp_path):
    _, base, adapter = dirs
    assert run("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "m").exit_code == 0
    r = run("inspect", tmp_path / "m.patch.safetensors", "--json", "--plot", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert {"format_version", "file_bytes", "total_nnz", "bytes_per_nnz", "tensors"} <= set(s)
    t = s["tensors"][0]
    assert {"name", "shape", "dtype", "nnz", "density", "rows_touched", "cols_touched", "bytes"} <= set(t)
    assert sum(t["nnz"] for t in s["tensors"]) == s["total_nnz"]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_apply_in_place_then_revert_round_trips_through_the_cli(dirs, tmp_path):
    import shutil

    _, base, adapter = dirs
    run("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "m")
    shutil.copytree(base, tmp_path / "w")
    p = tmp_path / "m.patch.safetensors"
    assert run("apply", "--base", tmp_path / "w", "--patch", p, "--in-place").exit_code == 0
    assert fingerprints(tmp_path / "w") == fingerprints(tmp_path / "m")
    assert run("apply", "--base", tmp_path / "w", "--patch", p, "--in-place", "--revert").exit_code == 0
    assert fingerprints(tmp_path / "w") == fingerprints(base)


def test_diff_reports_density_per_tensor(dirs, tmp_path):
    _, base, adapter = dirs
    run("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "m")
    r = run("diff", "--base", base, "--target", tmp_path / "m", "--out", tmp_path / "d.safetensors")
    assert r.exit_code == 0, r.output
    assert "q_proj.weight" in r.stdout and "density" in r.stdout


@pytest.mark.parametrize("case", ["truncated", "already_applied", "missing_flag", "no_patch_file"])
def test_bad_input_is_one_line_on_stderr_with_exit_code_2(dirs, tmp_path, case):
    _, base, adapter = dirs
    run("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "m")
    p = tmp_path / "m.patch.safetensors"
    if case == "truncated":
        (tmp_path / "t.safetensors").write_bytes(p.read_bytes()[:50])
        args = ["apply", "--base", base, "--patch", tmp_path / "t.safetensors", "--out", tmp_path / "o"]
    elif case == "already_applied":
        args = ["apply", "--base", tmp_path / "m", "--patch", p, "--out", tmp_path / "o"]
    elif case == "missing_flag":
        args = ["apply", "--base", base, "--patch", p]
    else:
        args = ["inspect", tmp_path / "nope.safetensors"]
    r = run(*args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_apply_on_an_onnx_directory_dispatches_to_onnx_patching(dirs, tmp_path, monkeypatch):
    import roselora_export.onnx.patching as patching

    _, base, adapter = dirs
    run("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "m")
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "names.json").write_text("{}")
    (onnx_dir / "model.onnx").write_bytes(b"")
    calls = []
    monkeypatch.setattr(patching, "apply_to_onnx_dir",
                        lambda base_dir, patches, out_dir, revert=False, in_place=False, **_:
                        calls.append((base_dir, len(patches), out_dir, revert, in_place)) or {"out": str(out_dir), "elements": 1})
    r = run("apply", "--base", onnx_dir, "--patch", tmp_path / "m.patch.safetensors", "--out", tmp_path / "o", "--revert")
    assert r.exit_code == 0, r.output
    assert calls == [(onnx_dir, 1, tmp_path / "o", True, False)]


def test_merge_with_onnx_patches_the_artifact_into_out_onnx(dirs, tmp_path, monkeypatch):
    import roselora_export.onnx.names as names
    import roselora_export.onnx.patching as patching

    _, base, adapter = dirs
    calls = []
    monkeypatch.setattr(names, "open_artifact", lambda root: None)  # the dispatch is under test, not the artifact
    monkeypatch.setattr(patching, "apply_to_onnx_dir",
                        lambda base_dir, patches, out_dir, revert=False, in_place=False, **_:
                        calls.append((base_dir, [len(p.tensors) for p in patches], out_dir, revert, in_place))
                        or {"out": str(out_dir), "elements": 1})
    r = run("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "m", "--onnx", tmp_path / "art")
    assert r.exit_code == 0, r.output
    assert calls == [(tmp_path / "art", [4], tmp_path / "m" / "onnx", False, False)]
