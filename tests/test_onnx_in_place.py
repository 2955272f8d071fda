"""`apply --in-place` on ONNX artifacts: touched elements written where they are under an undo journal.

A kill at any step leaves, after the next command's recovery, the old files or the new ones (bit for
bit, ledger included); a failure rolls back at once; a foreign loader finds no graph while the data is
torn; files linked from elsewhere are never written through; and the process imports neither torch
nor onnx.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from roselora_export.errors import InputError
from roselora_export.onnx import journal
from roselora_export.onnx.export import export_onnx
from roselora_export.onnx.patching import apply_to_onnx_dir
from roselora_export.patch import load_patch, save_patch
from test_onnx_support import PATCH_KEYS, base_state, dir_fingerprint, make_patch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-in-place")
    export_onnx(tiny_model_dirs["llama"], root / "art", check_runtime=False)
    patch, _ = make_patch(base_state(tiny_model_dirs["llama"]), PATCH_KEYS["llama"])
    save_patch(patch, root / "edit.patch.safetensors")
    before = dir_fingerprint(root / "art")
    shutil.copytree(root / "art", root / "patched")
    apply_to_onnx_dir(root / "patched", [patch], None, in_place=True, sources=[root / "edit.patch.safetensors"])
    return {"art": root / "art", "patch": root / "edit.patch.safetensors", "before": before,
            "after": dir_fingerprint(root / "patched")}


@pytest.fixture
def art(exported, tmp_path):
    return Path(shutil.copytree(exported["art"], tmp_path / "art"))


def _weights(fp: dict) -> dict:
    """Every file but the ledger (its applied_at differs from run to run)."""
    return {k: v for k, v in fp.items() if k != "roselora-ledger.json"}


def _state(art: Path, exported: dict) -> str:
    fp = dir_fingerprint(art)
    if fp == exported["before"]:
        return "old"
    if _weights(fp) == _weights(exported["after"]) and (art / "roselora-ledger.json").is_file():
        return "new"
    return "mixed"


def _difference(art: Path, exported: dict) -> str:
    """How the directory differs from the old files and from the new ones (the message of a "mixed" state)."""
    fp = dir_fingerprint(art)
    out = []
    for name in ("before", "after"):
        want = exported[name]
        out.append(f"vs {name}: extra {sorted(set(fp) - set(want))}, missing {sorted(set(want) - set(fp))}, "
                   f"changed {sorted(k for k in set(fp) & set(want) if fp[k] != want[k])}")
    return "; ".join(out)


def test_in_place_apply_writes_only_the_touched_elements_and_leaves_no_journal(art, exported):
    report = apply_to_onnx_dir(art, [load_patch(exported["patch"])], None, in_place=True)
    assert report["copy"].startswith("none") and report["bytes_written"] > 0
    assert _state(art, exported) == "new"
    assert not (art / journal.JOURNAL).exists() and not list(art.glob("*" + journal.HIDDEN))
    apply_to_onnx_dir(art, [load_patch(exported["patch"])], None, in_place=True, revert=True)
    assert dir_fingerprint(art) == exported["before"]


def test_a_failure_mid_write_rolls_back_at_once(art, exported, monkeypatch):
    real, calls = journal._put, []

    def put_then_fail(fd, path, region, values):
        real(fd, path, region, values)
        calls.append(1)
        if values is region.new and len(calls) == 2:  # two initializers written, then the disk "fails"
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal, "_put", put_then_fail)
    with pytest.raises(OSError):
        apply_to_onnx_dir(art, [load_patch(exported["patch"])], None, in_place=True)
    assert dir_fingerprint(art) == exported["before"]  # old bits, no ledger, graph back, journal gone


_CRASH = """
import os, sys
from pathlib import Path
from roselora_export.onnx import journal
from roselora_export.onnx.patching import apply_to_onnx_dir
from roselora_export.patch import load_patch

where, n = sys.argv[3], int(sys.argv[4])
counts = {}
def die_after(name, fn):
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        counts[name] = counts.get(name, 0) + 1
        if name == where and counts[name] == n:
            os._exit(9)  # as a SIGKILL would: no cleanup, no rollback
        return out
    return run
journal.atomic_write = die_after("journal written", journal.atomic_write)
journal.fsync_dir = die_after("fsync_dir", journal.fsync_dir)
journal._put = die_after("element run written", journal._put)
apply_to_onnx_dir(Path(sys.argv[1]), [load_patch(sys.argv[2])], None, in_place=True, sources=[sys.argv[2]])
"""

# (where the process dies, after how many calls, whether the graph is hidden then, what recovery leaves).
# fsync_dir runs after hiding the graph (1), after the ledger and the graph's return (2), after the journal's removal (3).
KILL_POINTS = [("journal written", 1, False, "old"), ("fsync_dir", 1, True, "old"), ("element run written", 1, True, "old"),
               ("element run written", 3, True, "old"), ("fsync_dir", 2, False, "old"), ("fsync_dir", 3, False, "new")]


@pytest.mark.parametrize("where,n,hidden,want", KILL_POINTS, ids=[f"{w} x{n}" for w, n, _, _ in KILL_POINTS])
def test_a_kill_at_each_step_leaves_the_old_or_the_new_files_after_recovery(art, exported, where, n, hidden, want):
    r = subprocess.run([sys.executable, "-c", _CRASH, str(art), str(exported["patch"]), where, str(n)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 9, r.stderr[-2000:]
    assert (art / journal.JOURNAL).exists() == (want == "old")
    # While the data may be torn, a loader (onnxruntime, genai) finds no graph rather than a wrong one.
    assert (art / "model.onnx").exists() != hidden and (art / ("model.onnx" + journal.HIDDEN)).exists() == hidden
    # The next command on the directory, whatever it is (here a check that writes nothing), recovers first.
    r = subprocess.run([sys.executable, "-m", "roselora_export.cli", "apply", "--base", str(art), "--patch",
                        str(exported["patch"]), "--check"] + (["--revert"] if want == "new" else []),
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert _state(art, exported) == want
    # The ledger agrees with the weights: the patch applies (or reverts) cleanly from here.
    apply_to_onnx_dir(art, [load_patch(exported["patch"])], None, in_place=True, revert=want == "new")
    assert _state(art, exported) == ("old" if want == "new" else "new")


def test_sigkill_at_random_moments_never_leaves_a_mix(art, exported):
    args = [sys.executable, "-m", "roselora_export.cli", "apply", "--base", str(art), "--patch", str(exported["patch"]),
            "--in-place"]
    seen = set()
    for delay in (0.05, 0.2, 0.35, 0.5, 0.8):
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        journal.recover(art)
        state = _state(art, exported)
        assert state in ("old", "new"), f"killed after {delay} s: {_difference(art, exported)}"
        seen.add(state)
        if state == "new":
            apply_to_onnx_dir(art, [load_patch(exported["patch"])], None, in_place=True, revert=True)
    assert dir_fingerprint(art) == exported["before"]


def test_recovery_refuses_a_journal_that_no_longer_describes_the_files(art, exported):
    r = subprocess.run([sys.executable, "-c", _CRASH, str(art), str(exported["patch"]), "element run written", "2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 9
    data = art / "model.onnx.data"
    shutil.copy2(data, art / "copy")
    os.replace(art / "copy", data)  # the data file replaced (say, the artifact rebuilt) after the kill
    before = dir_fingerprint(art)
    with pytest.raises(InputError, match="no longer applies"):
        apply_to_onnx_dir(art, [load_patch(exported["patch"])], None, in_place=True)
    assert dir_fingerprint(art) == before  # nothing written, the journal kept for a person to judge


def test_a_hard_linked_data_file_is_never_written_through(art, exported, tmp_path):
    os.link(art / "model.onnx.data", tmp_path / "elsewhere.data")
    report = apply_to_onnx_dir(art, [load_patch(exported["patch"])], None, in_place=True)
    assert not report["copy"].startswith("none")  # rebuilt beside and swapped in, as before journals
    assert _weights(dir_fingerprint(art)) == _weights(exported["after"])
    assert dir_fingerprint(tmp_path)["elsewhere.data"] == exported["before"]["model.onnx.data"]


def test_a_failure_while_rebuilding_a_linked_artifact_leaves_the_old_files_whole(art, exported, tmp_path, monkeypatch):
    import roselora_export.onnx.patching as patching

    os.link(art / "model.onnx.data", tmp_path / "elsewhere.data")
    real = patching._write_touched

    def crash(path, touched):
        real(path, touched[:1])  # some bytes are written into the copy, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(patching, "_write_touched", crash)
    with pytest.raises(KeyboardInterrupt):
        apply_to_onnx_dir(art, [load_patch(exported["patch"])], None, in_place=True)
    assert dir_fingerprint(art) == exported["before"]


def test_apply_and_revert_in_place_in_a_fresh_process_import_neither_torch_nor_onnx(art, exported):
    # Their imports alone cost more CPU than patching an artifact of hundreds of megabytes.
    for extra in ([], ["--revert"]):
        args = ["apply", "--base", str(art), "--patch", str(exported["patch"]), "--in-place", *extra]
        code = (f"import sys, json; from roselora_export.cli import main; main({args!r}, standalone_mode=False); "
                "print(json.dumps([m for m in ('torch', 'onnx', 'onnxruntime', 'ml_dtypes', 'transformers') "
                "if m in sys.modules]))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == [], args
    assert dir_fingerprint(art) == exported["before"]


def test_an_onnxruntime_session_through_the_package_recovers_first(art, exported):
    from roselora_export.onnx.session import create_session

    r = subprocess.run([sys.executable, "-c", _CRASH, str(art), str(exported["patch"]), "element run written", "1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 9 and not (art / "model.onnx").exists()
    create_session(art, providers=["CPUExecutionProvider"])  # finds the graph again, with the old weights
    assert dir_fingerprint(art) == exported["before"]
