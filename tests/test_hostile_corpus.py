"""The hostile corpus (issue 16): what an adversarial user tries, and what must come out of it.

Every case is one attack on `merge`, `diff`, `apply` or `inspect` (checkpoints and ONNX): hostile
files, outputs aimed at the inputs, races, kills, full or read-only filesystems, special files,
stopped lock holders. Each must end in a correct result or a clean refusal (exit 2, one `error:`
line), with no silent wrong result, no traceback, no input byte changed and no temporary left.
The last test prints the totals:

    cases tried / refused cleanly / silent wrong results / tracebacks / bytes lost / leftovers
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from roselora_export.checkpoint import apply_to_checkpoint, diff_checkpoints, fingerprints
from roselora_export.cli import main
from roselora_export.core.atomic import locked_dir
from roselora_export.patch import load_patch, save_patch

ROOT = Path(__file__).resolve().parent.parent
TOTALS: Counter = Counter()
EDITED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight")
OTHER = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight")


# ----------------------------------------------------------------------------- fixtures and helpers

def _edit_copy(base: Path, out: Path, keys, seed: int) -> Path:
    """A copy of checkpoint `base` with a few elements of `keys` changed (numpy, same shards and index)."""
    shutil.copytree(base, out)
    rng = np.random.default_rng(seed)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(shard))
        hit = [k for k in keys if k in tensors]
        for k in hit:
            flat = tensors[k].reshape(-1).copy()
            idx = rng.choice(flat.size, 5, replace=False)
            flat[idx] += np.float32(0.01)
            tensors[k] = flat.reshape(tensors[k].shape)
        if hit:
            save_file(tensors, str(shard), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A sharded tiny checkpoint, two independent patches of it (in two shards each), an ONNX artifact of it."""
    from test_patch_fixtures import make_adapter, tiny_llama_dir

    from roselora_export.onnx.export import export_onnx

    root = tmp_path_factory.mktemp("hostile")
    base = tiny_llama_dir(root / "base", shard_kb=40)
    diff_checkpoints(base, _edit_copy(base, root / "t1", EDITED, 1), root / "p1.safetensors")
    diff_checkpoints(base, _edit_copy(base, root / "t2", OTHER, 2), root / "p2.safetensors")
    export_onnx(base, root / "onnx", check_runtime=False)
    adapter = make_adapter(base, root / "adapter")
    return {"root": root, "base": base, "p1": root / "p1.safetensors", "p2": root / "p2.safetensors",
            "onnx": root / "onnx", "adapter": adapter, "want1": fingerprints(root / "t1")}


def _tree(path: Path) -> dict[str, tuple]:
    """Every entry under `path`: content sha256 (files) and permission bits."""
    out = {}
    for p in [path, *sorted(path.rglob("*"))]:
        st = p.lstat()
        data = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        out[str(p.relative_to(path))] = (data, stat.S_IMODE(st.st_mode))
    return out


def _temps(*dirs: Path) -> list[str]:
    return [p.name for d in dirs if d.is_dir() for p in d.iterdir()
            if p.name.startswith(".") and (".tmp" in p.name or ".inplace-" in p.name)]


def _cli(*args, timeout: float | None = None):
    """Run the CLI in this process; returns the click Result."""
    return CliRunner().invoke(main, [str(a) for a in args])


def _record(case: str, result, *, expect: str, lost: int = 0, leftovers: int = 0, wrong: int = 0) -> None:
    """Classify one attempt; `expect` is "refused" (exit 2, one error: line) or "ok" (exit 0, checked by the caller)."""
    traceback = result.exit_code not in (0, 2) or (result.exception is not None
                                                  and not isinstance(result.exception, SystemExit))
    stderr_lines = [line for line in result.stderr.splitlines() if line.strip()]
    refused = (result.exit_code == 2 and len(stderr_lines) >= 1 and stderr_lines[-1].startswith("error: ")
               and "Traceback" not in result.output)
    TOTALS["tried"] += 1
    TOTALS["refused"] += refused
    TOTALS["tracebacks"] += traceback
    TOTALS["wrong"] += wrong + (expect == "refused" and result.exit_code == 0)
    TOTALS["lost"] += lost
    TOTALS["leftovers"] += leftovers
    assert not traceback, f"{case}: traceback\n{result.output}\n{result.exception!r}"
    assert wrong == 0 and lost == 0 and leftovers == 0, f"{case}: wrong={wrong} lost={lost} leftovers={leftovers}"
    if expect == "refused":
        assert refused, f"{case}: not a clean refusal (exit {result.exit_code}): {result.output}"
    else:
        assert result.exit_code == 0, f"{case}: {result.output}"


@pytest.fixture
def base(world, tmp_path):
    """A private copy of the base checkpoint (for in-place attacks)."""
    return Path(shutil.copytree(world["base"], tmp_path / "ckpt"))


def _rewrite_patch(src: Path, dst: Path, edit) -> Path:
    """A patch file whose in-memory patch was changed by `edit(patch)`, saved with a valid checksum."""
    patch = load_patch(src)
    edit(patch)
    return save_patch(patch, dst)


# ----------------------------------------------------------------------------- silent wrong results, lost data

@pytest.mark.parametrize("command", ["apply --out", "diff", "merge"])
def test_readers_hold_the_shared_lock_while_they_read(world, base, tmp_path, monkeypatch, command):
    """While a reader reads the base, an in-place writer cannot take the directory's lock (so cannot swap)."""
    import fcntl

    from roselora_export.checkpoint import model_dir

    seen = []
    real = model_dir.ModelDir.read_array

    def read_array(self, name):
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append("unlocked")
        except BlockingIOError:
            seen.append("locked")
        finally:
            os.close(fd)
        return real(self, name)

    monkeypatch.setattr(model_dir.ModelDir, "read_array", read_array)
    args = {"apply --out": ["apply", "--base", base, "--patch", world["p1"], "--out", tmp_path / "o"],
            "diff": ["diff", "--base", base, "--target", world["root"] / "t1", "--out", tmp_path / "d.safetensors"],
            "merge": ["merge", "--base", base, "--adapter", world["adapter"], "--out", tmp_path / "m"]}[command]
    r = _cli(*args)
    _record(f"{command} reads under the shared lock", r, expect="ok", wrong=int(not seen or "unlocked" in seen))


def test_apply_out_racing_an_in_place_apply_reads_one_whole_state(world, base, tmp_path):
    """Readers take the shared lock: every --out is the base or the in-place result, plus its own patch."""
    p1, p2 = load_patch(world["p1"]), load_patch(world["p2"])
    stop, errors = threading.Event(), []

    def toggle():
        try:
            while not stop.is_set():
                apply_to_checkpoint(base, [p2], in_place=True)
                apply_to_checkpoint(base, [p2], in_place=True, revert=True)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    t = threading.Thread(target=toggle)
    t.start()
    outs = []
    try:
        for i in range(20):
            outs.append(tmp_path / f"out{i}")
            apply_to_checkpoint(base, [p1], outs[-1])
    finally:
        stop.set()
        t.join(60)
    assert not errors
    p2_keys = set(p2.tensors)
    base_fp = fingerprints(world["base"])
    ok = 0
    for out in outs:
        got = fingerprints(out)
        both = {k: v for k, v in got.items() if k not in p2_keys} == {k: v for k, v in world["want1"].items()
                                                                       if k not in p2_keys}
        half = len({got[k] == base_fp[k] for k in p2_keys}) > 1  # some p2 tensors old, some new
        ok += both and not half
    TOTALS["tried"] += len(outs)
    TOTALS["wrong"] += len(outs) - ok
    assert ok == len(outs)
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("attack", ["diff --out into base", "diff --out via symlink", "merge --patch into base",
                                    "merge --out inside base", "apply --out inside base", "onnx --out inside base",
                                    "merge --patch is --out", "inspect --plot onto the patch"])
def test_an_output_inside_an_input_is_refused_and_the_input_untouched(world, base, tmp_path, attack):
    onnx = Path(shutil.copytree(world["onnx"], tmp_path / "onnx"))
    (tmp_path / "link").symlink_to(base)
    before, onnx_before = _tree(base), _tree(onnx)
    shard = sorted(base.glob("*.safetensors"))[0].name
    args = {
        "diff --out into base": ["diff", "--base", base, "--target", world["root"] / "t1", "--out", base / shard],
        "diff --out via symlink": ["diff", "--base", base, "--target", world["root"] / "t1", "--out",
                                   tmp_path / "link" / shard],
        "merge --patch into base": ["merge", "--base", base, "--adapter", world["adapter"], "--out", tmp_path / "m",
                                    "--patch", base / shard],
        "merge --out inside base": ["merge", "--base", base, "--adapter", world["adapter"], "--out", base / "sub"],
        "apply --out inside base": ["apply", "--base", base, "--patch", world["p1"], "--out", base / "sub"],
        "onnx --out inside base": ["apply", "--base", onnx, "--patch", world["p1"], "--out", onnx / "sub"],
        "merge --patch is --out": ["merge", "--base", base, "--adapter", world["adapter"], "--out", tmp_path / "m",
                                   "--patch", tmp_path / "m"],
        "inspect --plot onto the patch": ["inspect", tmp_path / "p.safetensors", "--plot", tmp_path / "p.safetensors"],
    }[attack]
    shutil.copy2(world["p1"], tmp_path / "p.safetensors")
    r = _cli(*args)
    lost = int(_tree(base) != before) + int(_tree(onnx) != onnx_before)
    lost += int((tmp_path / "p.safetensors").read_bytes() != world["p1"].read_bytes())
    _record(attack, r, expect="refused", lost=lost, leftovers=len(_temps(tmp_path, base)))
    assert not (tmp_path / "m").exists()


def _forge_patched_fingerprint(patch):
    tp = next(iter(patch.tensors.values()))
    tp.patched_sha256 = hashlib.sha256(b"forged").hexdigest()


@pytest.mark.parametrize("target", ["checkpoint in place", "checkpoint --out", "onnx in place", "onnx --out"])
def test_a_patch_whose_xor_misses_its_patched_fingerprint_is_refused(world, base, tmp_path, target):
    bad = _rewrite_patch(world["p1"], tmp_path / "forged.safetensors", _forge_patched_fingerprint)
    where = Path(shutil.copytree(world["onnx"], tmp_path / "onnx")) if "onnx" in target else base
    before = _tree(where)
    out = ["--in-place"] if "in place" in target else ["--out", tmp_path / "out"]
    r = _cli("apply", "--base", where, "--patch", bad, *out)
    _record(f"forged fingerprint, {target}", r, expect="refused", lost=int(_tree(where) != before),
            leftovers=len(_temps(tmp_path, where)))
    assert "fingerprint" in r.stderr and not (tmp_path / "out").exists()


def _nan_patch(world, tmp_path, value: int):
    """A patch (valid checksum, true fingerprints) that writes the F32 bit pattern `value` into one element."""
    from roselora_export.core.dtypes import NUMPY
    from roselora_export.patch.model import TensorPatch, sha256_bits

    name = EDITED[0]
    model_bits = None
    for shard in world["base"].glob("*.safetensors"):
        tensors = load_file(str(shard))
        if name in tensors:
            model_bits = tensors[name].reshape(-1).view(NUMPY["F32"]).copy()
    new = model_bits.copy()
    new[3] = value
    patch = load_patch(world["p1"])
    patch.tensors = {name: TensorPatch(name, tuple(patch.tensors[name].shape), "F32", np.array([3], np.int64),
                                       np.array([model_bits[3] ^ value], np.uint32),
                                       hashlib.sha256(model_bits.tobytes()).hexdigest(),
                                       hashlib.sha256(new.tobytes()).hexdigest(), sha256_bits(model_bits[[3]]))}
    return save_patch(patch, tmp_path / f"nan{value:x}.safetensors")


@pytest.mark.parametrize("value", [0x7FC00000, 0x7F800000, 0xFF800000], ids=["NaN", "Inf", "-Inf"])
@pytest.mark.parametrize("target", ["checkpoint in place", "checkpoint --out", "onnx in place", "onnx --out"])
def test_a_patch_that_writes_nan_or_inf_is_refused_by_every_target(world, base, tmp_path, target, value):
    bad = _nan_patch(world, tmp_path, value)
    where = Path(shutil.copytree(world["onnx"], tmp_path / "onnx")) if "onnx" in target else base
    before = _tree(where)
    out = ["--in-place"] if "in place" in target else ["--out", tmp_path / "out"]
    r = _cli("apply", "--base", where, "--patch", bad, *out)
    _record(f"NaN/Inf, {target}", r, expect="refused", lost=int(_tree(where) != before),
            leftovers=len(_temps(tmp_path, where)))
    assert "NaN or Inf" in r.stderr


def test_a_patch_that_writes_nan_is_refused_by_the_live_runtime(world):
    import torch

    from roselora_export.errors import InputError
    from roselora_export.runtime import PatchRuntime

    from test_patch_fixtures import tiny_llama

    model = tiny_llama()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    bits = sd[EDITED[0]].reshape(-1).view(torch.int32).numpy().view(np.uint32)
    from roselora_export.patch.model import Patch, TensorPatch, sha256_bits

    new = bits.copy()
    new[3] = 0x7FC00000
    tp = TensorPatch(EDITED[0], tuple(sd[EDITED[0]].shape), "F32", np.array([3], np.int64),
                     np.array([bits[3] ^ 0x7FC00000], np.uint32), hashlib.sha256(bits.tobytes()).hexdigest(),
                     hashlib.sha256(new.tobytes()).hexdigest(), sha256_bits(bits[[3]]))
    rt = PatchRuntime(model)
    TOTALS["tried"] += 1
    with pytest.raises(InputError, match="NaN or Inf"):
        rt.apply(Patch(tensors={tp.name: tp}))
    TOTALS["refused"] += 1
    assert torch.equal(model.state_dict()[EDITED[0]], sd[EDITED[0]])


def _shard_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


F32x4 = np.arange(4, dtype="<f4").tobytes()
BAD_SHARDS = {
    "negative dim": ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, F32x4),
    "float dim": ({"w": {"dtype": "F32", "shape": [4.9], "data_offsets": [0, 16]}}, F32x4),
    "float dim 64.9": ({"w": {"dtype": "F32", "shape": [2, 2.9], "data_offsets": [0, 16]}}, F32x4),
    "bool dim": ({"w": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, F32x4),
    "string dim": ({"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, F32x4),
    "overlapping offsets": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                             "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, F32x4),
    "gap before a tensor": ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [4, 16]}}, F32x4),
    "float offsets": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, F32x4),
    "trailing bytes": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, F32x4 + b"junk"),
    "metadata a list": ({"__metadata__": ["x"], "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, F32x4),
    "metadata value not a string": ({"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [4],
                                                                     "data_offsets": [0, 16]}}, F32x4),
    "entry not an object": ({"w": [1, 2]}, F32x4),
    "unknown dtype": ({"w": {"dtype": "F8", "shape": [16], "data_offsets": [0, 16]}}, F32x4),
}


@pytest.mark.parametrize("case", [*BAD_SHARDS, "duplicate name"])
def test_a_shard_that_safetensors_itself_rejects_is_refused(world, tmp_path, case):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    if case == "duplicate name":
        entry = '"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}'
        raw = ("{" + entry + "," + entry + "}").encode()
        raw += b" " * (-len(raw) % 8)
        (model / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + F32x4)
    else:
        (model / "model.safetensors").write_bytes(_shard_bytes(*BAD_SHARDS[case]))
    before = _tree(model)
    results = [_cli("apply", "--base", model, "--patch", world["p1"], "--out", tmp_path / "o"),
               _cli("diff", "--base", model, "--target", model, "--out", tmp_path / "d.safetensors")]
    for r in results:
        _record(f"bad shard: {case}", r, expect="refused", lost=int(_tree(model) != before),
                leftovers=len(_temps(tmp_path)))
        assert "model.safetensors" in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "d.safetensors").exists()


def test_in_place_apply_keeps_modes_and_new_outputs_follow_the_umask(world, base, tmp_path):
    shard = sorted(base.glob("*.safetensors"))[0]
    os.chmod(base, 0o755)
    os.chmod(shard, 0o600)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in base.iterdir()}
    r = _cli("apply", "--base", base, "--patch", world["p1"], "--in-place")
    got = {p.name: stat.S_IMODE(p.stat().st_mode) for p in base.iterdir() if p.name in modes}
    wrong = int(got != modes) + int(stat.S_IMODE(base.stat().st_mode) != 0o755)
    old = os.umask(0o027)
    try:
        r2 = _cli("apply", "--base", base, "--patch", world["p2"], "--out", tmp_path / "out")
        r3 = _cli("diff", "--base", world["base"], "--target", world["root"] / "t1", "--out", tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    wrong += int(stat.S_IMODE((tmp_path / "out").stat().st_mode) != 0o750)
    wrong += int(stat.S_IMODE((tmp_path / "p.safetensors").stat().st_mode) != 0o640)
    _record("modes kept in place", r, expect="ok", wrong=wrong)
    _record("--out follows the umask", r2, expect="ok")
    _record("patch follows the umask", r3, expect="ok")


# ----------------------------------------------------------------------------- tracebacks instead of one line

def _mount_tmpfs(path: Path, size: str, *extra: str) -> bool:
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", *extra, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@contextlib.contextmanager
def _mounted(path: Path, size: str):
    if not _mount_tmpfs(path, size):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing(world, tmp_path):
    with _mounted(tmp_path / "small", "32k") as small:
        r = _cli("apply", "--base", world["base"], "--patch", world["p1"], "--out", small / "out")
        r2 = _cli("merge", "--base", world["base"], "--adapter", world["adapter"], "--out", small / "m")
        left = sorted(p.name for p in small.iterdir())
    _record("ENOSPC apply --out", r, expect="refused", leftovers=len(left))
    _record("ENOSPC merge", r2, expect="refused")
    assert "no space left" in r.stderr and "no space left" in r2.stderr


@pytest.mark.parametrize("where", ["shard writer", "kernel copy", "patch file"])
def test_disk_full_simulated_is_one_line_and_leaves_nothing(world, tmp_path, monkeypatch, where):
    """The same without mount permission: the OS write calls fail with ENOSPC."""
    from roselora_export.checkpoint import safetensors_stream
    from roselora_export.core import atomic

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_write = os.write

    def write(fd, data):
        return full() if fd > 2 else real_write(fd, data)

    target = {"shard writer": (safetensors_stream, "_pwrite_all", full),
              "kernel copy": (safetensors_stream, "copy_range", full), "patch file": (atomic.os, "write", write)}[where]
    monkeypatch.setattr(*target)
    if where == "patch file":
        r = _cli("diff", "--base", world["base"], "--target", world["root"] / "t1", "--out", tmp_path / "p.safetensors")
    else:
        r = _cli("apply", "--base", world["base"], "--patch", world["p1"], "--out", tmp_path / "out")
    _record(f"ENOSPC ({where})", r, expect="refused", leftovers=len(_temps(tmp_path)) + len(list(tmp_path.iterdir())))
    assert "no space left" in r.stderr


def test_read_only_filesystem_and_mount_point_are_one_line(world, tmp_path):
    with _mounted(tmp_path / "mnt", "4m") as mnt:
        for p in world["base"].iterdir():
            shutil.copy2(p, mnt / p.name)
        before = _tree(mnt)
        r_busy = _cli("apply", "--base", mnt, "--patch", world["p1"], "--in-place")
        (mnt / "inner").mkdir()
        for p in world["base"].iterdir():
            shutil.copy2(p, mnt / "inner" / p.name)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        inner = _tree(mnt / "inner")
        r_ro = _cli("apply", "--base", mnt / "inner", "--patch", world["p1"], "--in-place")
        r_ro_out = _cli("apply", "--base", world["base"], "--patch", world["p1"], "--out", mnt / "new")
        lost = int(_tree(mnt / "inner") != inner) + int({k: v for k, v in _tree(mnt).items() if k in before} != before)
    _record("mount point in place", r_busy, expect="refused")
    _record("EROFS in place", r_ro, expect="refused", lost=lost)
    _record("EROFS --out", r_ro_out, expect="refused")
    assert "mount point" in r_busy.stderr and "read-only" in r_ro.stderr and "read-only" in r_ro_out.stderr


def test_read_only_simulated_is_one_line(world, base, monkeypatch):
    import tempfile

    def ro(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    before = _tree(base)
    monkeypatch.setattr(tempfile, "mkdtemp", ro)
    r = _cli("apply", "--base", base, "--patch", world["p1"], "--in-place")
    _record("EROFS (simulated)", r, expect="refused", lost=int(_tree(base) != before))
    assert "read-only" in r.stderr


def test_an_unreadable_patch_is_one_line():
    r = _cli("apply", "--base", ".", "--patch", "/proc/self/mem", "--out", "/nonexistent/x")
    _record("EIO patch", r, expect="refused")
    r = _cli("inspect", "/proc/self/mem")
    _record("EIO inspect", r, expect="refused")


@pytest.mark.parametrize("field,value", [("base_config_sha256", ["a"]), ("base_model", {"a": 1}), ("kind", 3),
                                         ("created", ["x"]), ("base_numel", "12"), ("base_numel", [1]),
                                         ("source", {"x": []}), ("roselora", ["not", "an", "object"])])
def test_provenance_of_the_wrong_type_is_refused_by_apply_and_inspect(world, tmp_path, field, value):
    bad = _rewrite_patch(world["p1"], tmp_path / "prov.safetensors", lambda p: p.provenance.__setitem__(field, value))
    for r in (_cli("apply", "--base", world["base"], "--patch", bad, "--out", tmp_path / "o"),
              _cli("inspect", bad), _cli("inspect", bad, "--json")):
        _record(f"provenance {field}={value!r}", r, expect="refused")
    assert not (tmp_path / "o").exists()


def test_an_index_whose_metadata_is_a_list_is_refused(world, tmp_path):
    model = Path(shutil.copytree(world["base"], tmp_path / "m"))
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["metadata"] = ["total_size", 1]
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    for r in (_cli("apply", "--base", model, "--patch", world["p1"], "--out", tmp_path / "o"),
              _cli("apply", "--base", model, "--patch", world["p1"], "--in-place"),
              _cli("merge", "--base", model, "--adapter", world["adapter"], "--out", tmp_path / "mm")):
        _record("index metadata list", r, expect="refused", leftovers=len(_temps(tmp_path)))


@pytest.mark.parametrize("kind", ["fifo", "dangling symlink", "symlink to a file"])
@pytest.mark.parametrize("target", ["checkpoint", "onnx"])
def test_special_files_beside_the_weights(world, tmp_path, kind, target):
    model = Path(shutil.copytree(world["base" if target == "checkpoint" else "onnx"], tmp_path / "m"))
    if kind == "fifo":
        os.mkfifo(model / "pipe")
    elif kind == "dangling symlink":
        (model / "gone.json").symlink_to(tmp_path / "nowhere.json")
    else:
        (tmp_path / "real.txt").write_text("hello")
        (model / "real.txt").symlink_to(tmp_path / "real.txt")
    done = []
    t = threading.Thread(target=lambda: done.append(_cli("apply", "--base", model, "--patch", world["p1"],
                                                         "--out", tmp_path / "out")), daemon=True)
    t.start()
    t.join(60)
    assert done, f"{kind}: the copy hung"
    r = done[0]
    if kind == "fifo":
        _record(f"{target}: FIFO beside weights", r, expect="refused", leftovers=len(_temps(tmp_path)))
        assert "FIFO" in r.stderr and not (tmp_path / "out").exists()
    elif kind == "dangling symlink":
        _record(f"{target}: dangling symlink", r, expect="ok", leftovers=len(_temps(tmp_path)))
        assert os.readlink(tmp_path / "out" / "gone.json") == str(tmp_path / "nowhere.json")
    else:
        _record(f"{target}: symlink to a file", r, expect="ok", leftovers=len(_temps(tmp_path)))
        assert (tmp_path / "out" / "real.txt").read_text() == "hello"


# ----------------------------------------------------------------------------- leftovers and waits

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed_only_when_their_owner_is_gone(world, tmp_path):
    import fcntl

    out = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{_dead_pid()}-abcdefgh"
    dead.mkdir()
    (dead / "big.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.tmp-{os.getpid()}-livelive"  # ours, and locked: a run in progress
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    patch_dead = tmp_path / f".p.safetensors.tmp-{_dead_pid()}-abcdefgh"
    patch_dead.write_bytes(b"half")
    try:
        r = _cli("apply", "--base", world["base"], "--patch", world["p1"], "--out", out)
        r2 = _cli("diff", "--base", world["base"], "--target", world["root"] / "t1", "--out", tmp_path / "p.safetensors")
        kept = live.exists()
    finally:
        os.close(fd)
    _record("stale temp of a dead owner", r, expect="ok", leftovers=int(dead.exists()), wrong=int(not kept))
    _record("stale patch temp", r2, expect="ok", leftovers=int(patch_dead.exists()))
    shutil.rmtree(live)


def test_onnx_apply_ignores_and_removes_leftovers_of_killed_runs(world, tmp_path):
    art = Path(shutil.copytree(world["onnx"], tmp_path / "onnx"))
    (art / ".model.onnx.data.x1y2z3.tmp").write_bytes(b"half")  # an older version's in-place temporary
    r = _cli("apply", "--base", art, "--patch", world["p1"], "--out", tmp_path / "out")
    copied = _temps(tmp_path / "out")
    _record("onnx --out skips temporaries", r, expect="ok", leftovers=len(copied))
    (tmp_path / ".onnx.inplace-abcdefgh").mkdir()  # an in-place run killed before its swap
    r = _cli("apply", "--base", art, "--patch", world["p1"], "--in-place")
    _record("onnx in place removes leftovers", r, expect="ok", leftovers=int((tmp_path / ".onnx.inplace-abcdefgh").exists()))


def _spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "roselora_export.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("command", ["merge", "apply --out", "apply --in-place"])
def test_killed_runs_leave_nothing_a_re_run_does_not_finish_or_remove(world, tmp_path, command):
    """SIGKILL at several moments; then one re-run: the result is whole and no temporary is left."""
    base = Path(shutil.copytree(world["base"], tmp_path / "b"))
    before = fingerprints(base)
    out, patch = tmp_path / "out", tmp_path / "out.patch.safetensors"
    args = {"merge": ["merge", "--base", base, "--adapter", world["adapter"], "--out", out],
            "apply --out": ["apply", "--base", base, "--patch", world["p1"], "--out", out],
            "apply --in-place": ["apply", "--base", base, "--patch", world["p1"], "--in-place"]}[command]
    lost = half = 0
    for delay in (0.0, 0.0, 0.002, 0.005, 0.02):  # after the first temporary (or the output) appears
        proc = _spawn(*args)
        deadline = time.monotonic() + 30
        while not (_temps(tmp_path) or out.exists()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        TOTALS["tried"] += 1
        if command == "merge":
            half += int(out.exists() and not patch.exists())  # a model directory without its patch
        if command == "apply --in-place":
            got = fingerprints(base)
            if got == world["want1"] or got == before:
                if got == world["want1"]:
                    apply_to_checkpoint(base, [load_patch(world["p1"])], in_place=True, revert=True)
            else:
                lost += 1
        elif out.exists():
            shutil.rmtree(out)
        patch.unlink(missing_ok=True)
    r = _cli(*args)
    leftovers = _temps(tmp_path)
    _record(f"killed {command}, re-run", r, expect="ok", lost=lost, wrong=half, leftovers=len(leftovers))
    if command != "merge":
        assert fingerprints(out if command == "apply --out" else base) == world["want1"]


def test_a_waiter_on_a_stopped_holder_says_so_and_lock_timeout_bounds_it(world, base):
    ready, release = threading.Event(), threading.Event()

    def hold():
        with locked_dir(base):
            ready.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    ready.wait(10)
    try:
        t0 = time.monotonic()
        r = _cli("apply", "--base", base, "--patch", world["p1"], "--in-place", "--lock-timeout", "0.5")
        r_out = _cli("apply", "--base", base, "--patch", world["p1"], "--out", base.parent / "o", "--lock-timeout", "0.3")
        waited = time.monotonic() - t0
    finally:
        release.set()
        t.join()
    _record("waiter in place, --lock-timeout", r, expect="refused")
    _record("--out reader, --lock-timeout", r_out, expect="refused")
    assert "waiting for the lock" in r.stderr and "--lock-timeout" in r.stderr.splitlines()[-1]
    assert waited < 10


def test_a_stopped_in_place_apply_is_waited_for_visibly(world, base, tmp_path):
    """A real holder, stopped with SIGSTOP mid-run: the second apply says what it waits for and gives up in time."""
    from roselora_export.core.atomic import _holder

    proc = _spawn("apply", "--base", base, "--patch", world["p1"], "--in-place")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + 30
        while f"pid {proc.pid})" not in _holder(fd) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGSTOP)
        holding = f"pid {proc.pid})" in _holder(fd)
        r = _cli("apply", "--base", base, "--patch", world["p2"], "--in-place", "--lock-timeout", "0.5")
    finally:
        os.close(fd)
        proc.send_signal(signal.SIGCONT)
        proc.wait(60)
    if not holding:
        pytest.skip("the first apply finished before it could be stopped")
    _record("waiter on a SIGSTOPped holder", r, expect="refused")
    assert "waiting for the lock" in r.stderr and "held by pid" in r.stderr
    assert fingerprints(base) == world["want1"]


@pytest.mark.parametrize("count", [300_000, 70_000])
def test_a_huge_hostile_patch_is_refused_fast(world, tmp_path, count):
    """300k tensors (a 58 MB header) is refused unread; 70k (under the header limit, valid checksum) before any
    entry is validated."""
    from roselora_export.patch import io

    fp = "A" * 43 + "="
    names = [f"model.layers.{i}.w" for i in range(count)]
    tensors = {"name": names, "shape": [[4]] * count, "dtype": ["F32"] * count, "nnz": [1] * count,
               "rows": [1] * count, "layout": ["sparse"] * count, "sha256_base": [fp] * count,
               "sha256_patched": [fp] * count, "sha256_base_touched": [fp] * count}
    texts = [json.dumps(tensors, separators=(",", ":")),
             json.dumps({"positions": {"codec": "none", "raw_bytes": 0}, "values": {"codec": "none", "raw_bytes": 0}},
                        separators=(",", ":"), sort_keys=True), "{}"]
    arrays = {"positions": np.zeros(0, np.uint8), "values": np.zeros(0, np.uint8)}
    meta = {"format": io.FORMAT_NAME, "format_version": str(io.FORMAT_VERSION), "tensors": texts[0],
            "streams": texts[1], "provenance": texts[2], "checksum": io._checksum(*texts, arrays)}
    path = tmp_path / "huge.safetensors"
    save_file(arrays, str(path), metadata=meta)
    t0 = time.monotonic()
    r = _cli("inspect", path)
    took = time.monotonic() - t0
    _record(f"huge patch ({count} tensors)", r, expect="refused")
    assert took < 3, f"took {took:.1f} s"


def test_zz_report():
    """The totals over every case above (run with the whole module)."""
    line = (f"hostile corpus: {TOTALS['tried']} cases tried, {TOTALS['refused']} refused cleanly, "
            f"{TOTALS['wrong']} silent wrong results, {TOTALS['tracebacks']} tracebacks, {TOTALS['lost']} bytes lost, "
            f"{TOTALS['leftovers']} leftovers")
    print("\n" + line)
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    (ROOT / ".pytest_cache" / "hostile_corpus.txt").write_text(line + "\n")
    assert TOTALS["wrong"] == TOTALS["tracebacks"] == TOTALS["lost"] == TOTALS["leftovers"] == 0
