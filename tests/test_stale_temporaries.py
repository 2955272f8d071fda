"""Temporaries of killed writers inside an ONNX artifact: recovery removes them, never a live writer's.

A writer killed while its temporary (`.NAME.tmp-PID-XXXXXXXX`, core.atomic) exists leaves it behind;
the next command on the directory recovers first (onnx/journal.recover) and removes it when its owner
is dead and its lock free, whether or not an undo journal was left, and touches nothing else.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from roselora_export.core.atomic import TEMP_MARK, owned_temp
from roselora_export.onnx import journal
from roselora_export.onnx.export import export_onnx
from roselora_export.patch import save_patch
from test_onnx_support import PATCH_KEYS, base_state, dir_fingerprint, make_patch

ROOT = Path(__file__).resolve().parent.parent


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tree(root: Path) -> dict[str, bytes | None]:
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(root.iterdir())}


def test_recovery_removes_the_temporaries_of_dead_writers_and_nothing_else(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / ".hidden").write_bytes(b"a user's file")
    (tmp_path / f".x{TEMP_MARK}12-short").write_bytes(b"not our name's shape")
    keep = _tree(tmp_path)
    dead = _dead_pid()
    (tmp_path / f"..roselora-undo.journal{TEMP_MARK}{dead}-abcdefgh").write_bytes(b"half a journal")
    (tmp_path / f".roselora-ledger.json{TEMP_MARK}{dead}-ab_d1234").write_bytes(b"half a ledger")
    (tmp_path / f".sub{TEMP_MARK}{dead}-abcdefgh").mkdir()
    assert journal.recover(tmp_path) is False  # no journal: nothing to roll back, but the leftovers go
    assert _tree(tmp_path) == keep


def test_recovery_keeps_a_temporary_whose_owner_lives_or_holds_its_lock(tmp_path):
    locked = tmp_path / f".data{TEMP_MARK}{_dead_pid()}-abcdefgh"  # its pid is gone, its lock is held
    locked.write_bytes(b"in use")
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with owned_temp(tmp_path, "model.onnx.data", is_dir=False) as live:  # ours: a writer still running
            journal.recover(tmp_path)
            assert live.exists() and locked.exists()
    finally:
        os.close(fd)
    journal.recover(tmp_path)
    assert not locked.exists()  # lock released, pid dead: now it is a leftover


_DIE_WITH_TEMP = """
import os, sys, tempfile
from pathlib import Path

real = tempfile.mkstemp
def mkstemp(*args, **kwargs):  # the writer of `name` dies, as under SIGKILL, once its temporary exists
    out = real(*args, **kwargs)
    if kwargs.get("prefix", "").startswith("." + sys.argv[1]):
        os._exit(9)
    return out
tempfile.mkstemp = mkstemp
"""
_APPLY = """
from roselora_export.onnx.patching import apply_to_onnx_dir
from roselora_export.patch import load_patch
apply_to_onnx_dir(Path(sys.argv[2]), [load_patch(sys.argv[3])], None, in_place=True, sources=[sys.argv[3]])
"""


def test_a_map_onnx_killed_while_writing_names_json_leaves_nothing_after_recovery(tmp_path):
    (tmp_path / "names.json").write_text("{}")
    keep = _tree(tmp_path)
    code = _DIE_WITH_TEMP + ("from roselora_export.onnx.mapping import write_names\n"
                             "write_names(sys.argv[2], {'format': 2, 'tensors': {'w': []}})")
    r = subprocess.run([sys.executable, "-c", code, "names.json", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 9, r.stderr[-2000:]
    assert len(_tree(tmp_path)) == len(keep) + 1  # the killed writer's temporary
    journal.recover(tmp_path)  # what map-onnx, apply and sessions run first
    assert _tree(tmp_path) == keep


@pytest.fixture(scope="module")
def exported(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("stale-temps")
    export_onnx(tiny_model_dirs["llama"], root / "art", check_runtime=False)
    patch, _ = make_patch(base_state(tiny_model_dirs["llama"]), PATCH_KEYS["llama"])
    save_patch(patch, root / "edit.patch.safetensors")
    return root


@pytest.mark.parametrize("name,journal_left", [(journal.JOURNAL, False), ("roselora-ledger.json", True)])
def test_a_kill_while_a_temporary_exists_leaves_the_old_files_after_recovery(exported, tmp_path, name, journal_left):
    art = Path(shutil.copytree(exported / "art", tmp_path / "art"))
    before = dir_fingerprint(art)  # every file, hidden ones included
    patch = exported / "edit.patch.safetensors"
    r = subprocess.run([sys.executable, "-c", _DIE_WITH_TEMP + _APPLY, name, str(art), str(patch)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 9, r.stderr[-2000:]
    assert (art / journal.JOURNAL).exists() == journal_left
    assert [p for p in art.iterdir() if p.name.startswith(f".{name}")]  # the killed writer's temporary
    r = subprocess.run([sys.executable, "-m", "roselora_export.cli", "apply", "--base", str(art), "--patch",
                        str(patch), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert dir_fingerprint(art) == before
