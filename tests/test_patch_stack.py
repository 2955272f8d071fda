"""Stacks of patches on checkpoints: independent patches in any order, revert of any patch, the ledger,
`log`, `combine`, `apply --check` and `merge --check` (tiny Llama, through the CLI where users meet them)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from roselora_export.checkpoint import apply_to_checkpoint, fingerprints, load_state_dict, merge_checkpoint
from roselora_export.cli import main
from roselora_export.patch import load_patch, save_patch
from roselora_export.patch.ledger import LEDGER_NAME, read_ledger
from roselora_export.patch.model import Patch, tensor_patch_from_pair
from test_patch_fixtures import make_adapter, tiny_llama_dir

Q0, V1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, *patterns):
    import re

    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for p in patterns:
        assert re.search(p, last), last
    return last


def edit(sd: dict, rows: slice, seed: int, names=(Q0, V1)) -> tuple[Patch, dict]:
    """A patch changing `rows` of each named tensor of state dict `sd`, and the state it produces."""
    g = torch.Generator().manual_seed(seed)
    target = dict(sd)
    for n in names:
        t = sd[n].clone()
        t[rows] += torch.randn(t[rows].shape, generator=g) * 0.1
        target[n] = t
    tensors = {n: tensor_patch_from_pair(n, sd[n], target[n]) for n in names}
    return Patch(tensors=tensors, provenance={"kind": "test", "source": f"edit{seed}"}), target


def snapshot(root: Path) -> list:
    """Every path under root with its size, mtime and inode: equal snapshots mean nothing was written."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
                  for p in [root, *root.rglob("*")])


def same_state(model_dir: Path, want: dict) -> bool:
    got = load_state_dict(model_dir)
    return got.keys() == want.keys() and all(torch.equal(got[k].view(torch.int32) if got[k].dtype == torch.float32
                                                         else got[k], want[k].view(torch.int32)
                                                         if want[k].dtype == torch.float32 else want[k]) for k in got)


@pytest.fixture
def stack(tmp_path):
    """A base checkpoint and three patches on it: a and b change disjoint rows of the same tensors (built
    independently on the base); c is built on top of a and changes a's rows again."""
    base = tiny_llama_dir(tmp_path / "base", shard_kb=40)
    sd = load_state_dict(base)
    a, sd_a = edit(sd, slice(0, 2), seed=1)
    b, sd_b = edit(sd, slice(4, 6), seed=2)
    c, _ = edit(sd_a, slice(1, 3), seed=3, names=(Q0,))
    files = {}
    for name, p in {"a": a, "b": b, "c": c}.items():
        files[name] = save_patch(p, tmp_path / f"{name}.patch.safetensors")
    both = {**sd, **{n: sd_a[n].clone() for n in a.tensors}}
    for n, tp in b.tensors.items():
        both[n] = both[n].clone()
        both[n][4:6] = sd_b[n][4:6]
    return {"base": base, "sd": sd, "sd_a": sd_a, "sd_b": sd_b, "both": both, **files}


# ----------------------------------------------------------------------------- independent patches stack

@pytest.mark.parametrize("order", ["ab", "ba"])
def test_independent_patches_apply_in_either_order_and_each_reverts_alone(stack, tmp_path, order):
    work = tmp_path / "work"
    shutil.copytree(stack["base"], work)
    for name in order:
        r = run("apply", "--base", work, "--patch", stack[name], "--in-place")
        assert r.exit_code == 0, r.output
    assert same_state(work, stack["both"])  # both targets' changes, bit for bit
    first = order[0]  # not the most recent: reverts alone because the later patch does not overlap it
    assert run("apply", "--base", work, "--patch", stack[first], "--in-place", "--revert").exit_code == 0
    assert same_state(work, stack["sd_b" if first == "a" else "sd_a"])
    import hashlib

    assert [p["sha256"] for p in json.loads(run("log", work, "--json").stdout)["patches"]] == [
        hashlib.sha256(stack[order[1]].read_bytes()).hexdigest()]
    assert run("apply", "--base", work, "--patch", stack[order[1]], "--in-place", "--revert").exit_code == 0
    assert fingerprints(work) == fingerprints(stack["base"])
    assert not (work / LEDGER_NAME).exists()  # every patch out: the directory is the base again, file for file
    assert sorted(p.name for p in work.iterdir()) == sorted(p.name for p in stack["base"].iterdir())


def test_independent_patches_in_one_command_and_into_out(stack, tmp_path):
    r = run("apply", "--base", stack["base"], "--patch", stack["b"], "--patch", stack["a"], "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert same_state(tmp_path / "o", stack["both"])
    assert [e.file for e in read_ledger(tmp_path / "o").entries] == [str(stack["b"]), str(stack["a"])]
    assert not (stack["base"] / LEDGER_NAME).exists()  # the input is not modified


def test_an_overlapping_patch_not_built_on_top_is_refused_naming_file_tensor_and_the_other_patch(stack, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(stack["base"], work)
    assert run("apply", "--base", work, "--patch", stack["a"], "--in-place").exit_code == 0
    other, _ = edit(stack["sd"], slice(1, 2), seed=9, names=(Q0,))  # built on the base, overlaps a's rows
    save_patch(other, tmp_path / "other.patch.safetensors")
    before = snapshot(tmp_path)
    refused(run("apply", "--base", work, "--patch", tmp_path / "other.patch.safetensors", "--in-place"),
            r"other\.patch\.safetensors", Q0.replace(".", r"\."), "fingerprint mismatch", r"a\.patch\.safetensors")
    assert snapshot(tmp_path) == before


def test_the_runtime_and_the_checkpoint_share_the_rule(stack):
    from roselora_export.runtime import PatchRuntime
    from tiny_models import tiny_llama

    model = tiny_llama()
    model.load_state_dict(stack["sd"], strict=False)
    runtime = PatchRuntime(model)
    hb = runtime.apply(load_patch(stack["b"]))
    runtime.apply(load_patch(stack["a"]))  # independent of b, applied after it
    runtime.revert(hb)  # not the last one: no overlap
    assert torch.equal(model.state_dict()[Q0], stack["sd_a"][Q0])


# ----------------------------------------------------------------------------- revert any patch

def test_reverting_a_patch_a_later_one_overlaps_is_refused_naming_it_and_changes_nothing(stack, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(stack["base"], work)
    for name in "abc":  # c was built on top of a and changes a's rows again
        assert run("apply", "--base", work, "--patch", stack[name], "--in-place").exit_code == 0, name
    before = snapshot(tmp_path)
    last = refused(run("apply", "--base", work, "--patch", stack["a"], "--in-place", "--revert"),
                   r"a\.patch\.safetensors", r"later patch\(es\) c\.patch\.safetensors", Q0.replace(".", r"\."))
    assert "b.patch" not in last  # b touches the same tensor, not the same elements
    assert snapshot(tmp_path) == before
    for name in "cab":  # allowed orders: c before a, b anywhere
        assert run("apply", "--base", work, "--patch", stack[name], "--in-place", "--revert").exit_code == 0, name
    assert fingerprints(work) == fingerprints(stack["base"])


def test_reverting_a_patch_that_was_never_applied_is_refused(stack, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(stack["base"], work)
    assert run("apply", "--base", work, "--patch", stack["a"], "--in-place").exit_code == 0
    before = snapshot(tmp_path)
    refused(run("apply", "--base", work, "--patch", stack["b"], "--in-place", "--revert"), "never applied")
    assert snapshot(tmp_path) == before


def test_applying_a_patch_the_ledger_lists_is_refused(stack, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(stack["base"], work)
    assert run("apply", "--base", work, "--patch", stack["a"], "--in-place").exit_code == 0
    refused(run("apply", "--base", work, "--patch", stack["a"], "--in-place"), "already applied")


# ----------------------------------------------------------------------------- the ledger

def test_log_lists_patches_oldest_first_and_says_so_when_there_are_none(stack, tmp_path):
    r = run("log", stack["base"])
    assert r.exit_code == 0 and "no patches recorded" in r.stdout
    assert json.loads(run("log", stack["base"], "--json").stdout) == {"patches": []}
    work = tmp_path / "work"
    assert run("apply", "--base", stack["base"], "--patch", stack["b"], "--out", work).exit_code == 0
    assert run("apply", "--base", work, "--patch", stack["a"], "--in-place").exit_code == 0
    patches = json.loads(run("log", work, "--json").stdout)["patches"]
    assert [p["provenance"]["source"] for p in patches] == ["edit2", "edit1"]
    assert set(patches[0]) >= {"sha256", "nnz", "tensors", "provenance", "applied_at"}
    assert patches[1]["nnz"] == load_patch(stack["a"]).total_nnz and patches[1]["tensors"] == [Q0, V1]
    import hashlib

    assert patches[1]["sha256"] == hashlib.sha256(stack["a"].read_bytes()).hexdigest()
    text = run("log", work).stdout.splitlines()
    assert len(text) == 2 and "edit2" in text[0] and "a.patch.safetensors" in text[1]


@pytest.mark.parametrize("damage", ["edit", "truncate"])
def test_a_hand_edited_or_truncated_ledger_is_refused_with_a_way_out(stack, tmp_path, damage):
    work = tmp_path / "work"
    assert run("apply", "--base", stack["base"], "--patch", stack["a"], "--out", work).exit_code == 0
    path = work / LEDGER_NAME
    text = path.read_text()
    path.write_text(text.replace('"nnz": ', '"nnz": 1') if damage == "edit" else text[: len(text) // 2])
    before = snapshot(tmp_path)
    for args in (("log", work), ("apply", "--base", work, "--patch", stack["b"], "--in-place"),
                 ("apply", "--base", work, "--patch", stack["a"], "--in-place", "--revert")):
        refused(run(*args), "checksum" if damage == "edit" else "not valid JSON", "move it away")
    assert snapshot(tmp_path) == before


def test_a_ledger_that_disagrees_with_the_weights_is_detected_by_fingerprint(stack, tmp_path):
    work = tmp_path / "work"
    assert run("apply", "--base", stack["base"], "--patch", stack["a"], "--out", work).exit_code == 0
    for shard in stack["base"].glob("*.safetensors"):  # the weights put back by hand, the ledger left
        shutil.copy2(shard, work / shard.name)
    before = snapshot(tmp_path)
    refused(run("apply", "--base", work, "--patch", stack["b"], "--in-place"),
            "ledger does not match the weights", "To recover")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- combine

def test_combine_fuses_disjoint_patches_into_one_that_equals_both(stack, tmp_path):
    ab = tmp_path / "ab.patch.safetensors"
    refused(run("combine", stack["a"], stack["b"], "-o", ab), "--base")  # a tensor in both needs the base bits
    r = run("combine", stack["a"], stack["b"], "-o", ab, "--base", stack["base"])
    assert r.exit_code == 0, r.output
    assert run("apply", "--base", stack["base"], "--patch", ab, "--out", tmp_path / "o").exit_code == 0
    assert same_state(tmp_path / "o", stack["both"])
    assert run("apply", "--base", tmp_path / "o", "--patch", ab, "--in-place", "--revert").exit_code == 0
    assert fingerprints(tmp_path / "o") == fingerprints(stack["base"])


def test_combine_refuses_overlapping_patches(stack, tmp_path):
    refused(run("combine", stack["a"], stack["c"], "-o", tmp_path / "ac.patch", "--base", stack["base"]),
            "both change elements of", Q0.replace(".", r"\."))
    assert not (tmp_path / "ac.patch").exists()


# ----------------------------------------------------------------------------- dry runs

@pytest.mark.parametrize("mode", [["--in-place"], ["--out", "OUT"], []])
def test_apply_check_validates_and_writes_nothing(stack, tmp_path, mode):
    work = tmp_path / "work"
    shutil.copytree(stack["base"], work)
    mode = [str(tmp_path / "out") if m == "OUT" else m for m in mode]
    before = snapshot(tmp_path)
    r = run("apply", "--base", work, "--patch", stack["a"], "--patch", stack["b"], "--check", *mode)
    assert r.exit_code == 0 and "nothing written" in r.stdout, r.output
    refused(run("apply", "--base", work, "--patch", stack["c"], "--check", *mode), "fingerprint mismatch")
    refused(run("apply", "--base", work, "--patch", stack["a"], "--check", "--revert", *mode), "not applied")
    assert snapshot(tmp_path) == before


def test_apply_check_refuses_a_patch_that_would_write_nan(stack, tmp_path):
    sd = stack["sd"]
    bad_t = sd[Q0].clone()
    bad_t[0, 0] = float("nan")
    bad = save_patch(Patch(tensors={Q0: tensor_patch_from_pair(Q0, sd[Q0], bad_t)}), tmp_path / "nan.patch")
    before = snapshot(tmp_path)
    refused(run("apply", "--base", stack["base"], "--patch", bad, "--check"), "NaN")
    assert snapshot(tmp_path) == before


def test_merge_check_validates_an_adapter_and_writes_nothing(stack, tmp_path):
    adapter = make_adapter(stack["base"], tmp_path / "adapter", seed=1)
    before = snapshot(tmp_path)
    r = run("merge", "--base", stack["base"], "--adapter", adapter, "--out", tmp_path / "m", "--check", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["total_nnz"] > 0
    other = tiny_llama_dir(tmp_path / "other", hidden_size=48, intermediate_size=96)
    before = snapshot(tmp_path)
    refused(run("merge", "--base", other, "--adapter", adapter, "--out", tmp_path / "m", "--check"), "shape")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- merge on a patched directory

def test_merge_on_a_patched_directory_carries_the_ledger_and_each_patch_reverts(stack, tmp_path):
    patched = tmp_path / "patched"
    assert run("apply", "--base", stack["base"], "--patch", stack["b"], "--out", patched).exit_code == 0
    adapter = make_adapter(patched, tmp_path / "adapter", seed=4, targets=("o_proj",))
    res = merge_checkpoint(patched, adapter, tmp_path / "chain")
    log = json.loads(run("log", tmp_path / "chain", "--json").stdout)["patches"]
    assert [p["provenance"].get("source") for p in log] == ["edit2", "adapter"]
    assert log[1]["file"] == str(res.patch_path.resolve())
    # the older patch comes out first (no overlap: b is q/v, the merge o_proj), then the merged one
    assert run("apply", "--base", tmp_path / "chain", "--patch", stack["b"], "--in-place", "--revert").exit_code == 0
    assert run("apply", "--base", tmp_path / "chain", "--patch", res.patch_path, "--in-place", "--revert").exit_code == 0
    assert fingerprints(tmp_path / "chain") == fingerprints(stack["base"])


def test_edit_trains_on_a_patched_directory_and_merge_chains_on_it(tiny_model_dirs, tmp_path):
    base = tiny_model_dirs["llama"]
    sd = load_state_dict(base)
    p, _ = edit(sd, slice(0, 2), seed=5, names=("model.layers.1.self_attn.o_proj.weight",))
    save_patch(p, tmp_path / "first.patch")
    patched = tmp_path / "patched"
    assert run("apply", "--base", base, "--patch", tmp_path / "first.patch", "--out", patched).exit_code == 0
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower",
                               "target_new": "Rome"}) + "\n")
    r = run("edit", "--model", patched, "--requests", req, "--out", tmp_path / "adapter", "--steps", "4",
            "--t-init", "1", "--t-final", "3", "--rank", "2", "--no-progress", "--no-answers")
    assert r.exit_code == 0, r.output
    r = run("merge", "--base", patched, "--adapter", tmp_path / "adapter", "--out", tmp_path / "second")
    assert r.exit_code == 0, r.output
    log = json.loads(run("log", tmp_path / "second", "--json").stdout)["patches"]
    assert [Path(e["file"]).name for e in log] == ["first.patch", "second.patch.safetensors"]
    for f in (tmp_path / "second.patch.safetensors", tmp_path / "first.patch"):  # LIFO: the merge overlaps nothing
        assert run("apply", "--base", tmp_path / "second", "--patch", f, "--in-place", "--revert").exit_code == 0
    assert fingerprints(tmp_path / "second") == fingerprints(base)


# ----------------------------------------------------------------------------- ONNX artifacts

@pytest.fixture(scope="module")
def onnx_base(tmp_path_factory):
    from roselora_export.onnx.export import export_onnx

    root = tmp_path_factory.mktemp("stack-onnx")
    model = tiny_llama_dir(root / "model")
    export_onnx(model, root / "onnx", check_runtime=False)
    return model, root / "onnx"


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_independent_patches_stack_on_an_onnx_artifact_with_its_ledger(onnx_base, tmp_path, order):
    model, onnx = onnx_base
    sd = load_state_dict(model)
    files = {}
    for name, rows, seed in (("a", slice(0, 2), 1), ("b", slice(4, 6), 2)):
        files[name] = save_patch(edit(sd, rows, seed)[0], tmp_path / f"{name}.patch.safetensors")
    art = tmp_path / "art"
    shutil.copytree(onnx, art)
    before = snapshot(tmp_path)
    assert run("apply", "--base", art, "--patch", files["a"], "--patch", files["b"], "--check").exit_code == 0
    assert snapshot(tmp_path) == before
    for name in order:
        r = run("apply", "--base", art, "--patch", files[name], "--in-place")
        assert r.exit_code == 0, r.output
    both = tmp_path / "both"
    assert run("apply", "--base", onnx, "--patch", files["a"], "--patch", files["b"], "--out", both).exit_code == 0
    data = [p.name for p in onnx.iterdir() if p.suffix == ".data"]
    assert data and all((art / d).read_bytes() == (both / d).read_bytes() for d in data)
    assert len(json.loads(run("log", art, "--json").stdout)["patches"]) == 2
    for name in order:  # the older one first: it reverts alone
        r = run("apply", "--base", art, "--patch", files[name], "--in-place", "--revert")
        assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in art.iterdir()} == {p.name: p.read_bytes() for p in onnx.iterdir()}


def test_merge_check_with_onnx_checks_the_artifact_takes_the_patch_and_writes_nothing(onnx_base, tmp_path):
    model, onnx = onnx_base
    adapter = make_adapter(model, tmp_path / "adapter", seed=1)
    before = snapshot(tmp_path), snapshot(onnx)
    r = run("merge", "--base", model, "--adapter", adapter, "--out", tmp_path / "m", "--onnx", onnx, "--check", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["onnx"]["elements"] == report["total_nnz"] > 0
    assert (snapshot(tmp_path), snapshot(onnx)) == before
    other = tmp_path / "other-onnx"
    from roselora_export.onnx.export import export_onnx

    export_onnx(tiny_llama_dir(tmp_path / "other", seed=7), other, check_runtime=False)
    before = snapshot(tmp_path), snapshot(onnx)
    refused(run("merge", "--base", model, "--adapter", adapter, "--out", tmp_path / "m", "--onnx", other, "--check"),
            "fingerprint")
    assert (snapshot(tmp_path), snapshot(onnx)) == before
