"""apply / revert on checkpoint directories: bit-exact, checked before writing, ordered, atomic in place."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from roselora_export.checkpoint import apply_to_checkpoint, fingerprints, load_state_dict, merge_checkpoint
from roselora_export.errors import InputError
from roselora_export.patch import build_patch_from_state_dicts, load_patch, save_patch
from roselora_export.patch.ledger import read_ledger
from test_patch_fixtures import DTYPES, make_adapter, tiny_llama_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("apply")
    base = tiny_llama_dir(root / "base", shard_kb=40)
    a1 = make_adapter(base, root / "a1", seed=1)
    a2 = make_adapter(base, root / "a2", seed=2, targets=("q_proj", "o_proj"))
    return root, base, a1, a2


def _tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_revert_of_a_merged_checkpoint_gives_the_base_back_bit_for_bit(setup, tmp_path, dtype):
    _, base, a1, _ = setup
    res = merge_checkpoint(base, a1, tmp_path / "merged", dtype=DTYPES[dtype])
    apply_to_checkpoint(tmp_path / "merged", [load_patch(res.patch_path)], tmp_path / "back", revert=True)
    want = {k: v.to(DTYPES[dtype]) for k, v in load_state_dict(base).items()}
    got = load_state_dict(tmp_path / "back")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_several_patches_apply_in_order_and_revert_in_reverse(setup, tmp_path):
    _, base, a1, a2 = setup
    m1 = merge_checkpoint(base, a1, tmp_path / "m1")
    m12 = merge_checkpoint(tmp_path / "m1", a2, tmp_path / "m12")
    p1, p2 = load_patch(m1.patch_path), load_patch(m12.patch_path)
    apply_to_checkpoint(base, [p1, p2], tmp_path / "both")
    assert fingerprints(tmp_path / "both") == fingerprints(tmp_path / "m12")
    apply_to_checkpoint(tmp_path / "both", [p1, p2], tmp_path / "none", revert=True)
    assert fingerprints(tmp_path / "none") == fingerprints(base)


def test_patches_in_the_wrong_order_are_refused_naming_the_tensor(setup, tmp_path):
    _, base, a1, a2 = setup
    m1 = merge_checkpoint(base, a1, tmp_path / "m1")
    m12 = merge_checkpoint(tmp_path / "m1", a2, tmp_path / "m12")
    p1, p2 = load_patch(m1.patch_path), load_patch(m12.patch_path)
    with pytest.raises(InputError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: fingerprint mismatch"):
        apply_to_checkpoint(base, [p2, p1], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_applying_an_applied_patch_is_refused_and_nothing_is_written(setup, tmp_path):
    _, base, a1, _ = setup
    res = merge_checkpoint(base, a1, tmp_path / "merged")
    before = _tree(tmp_path / "merged")
    with pytest.raises(InputError, match="already applied"):
        apply_to_checkpoint(tmp_path / "merged", [load_patch(res.patch_path)], in_place=True)
    assert _tree(tmp_path / "merged") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.patch.safetensors"]


def test_a_patch_for_another_base_model_is_refused(setup, tmp_path):
    _, base, a1, _ = setup
    res = merge_checkpoint(base, a1, tmp_path / "merged")
    other = tiny_llama_dir(tmp_path / "other", hidden_size=48, intermediate_size=96)
    with pytest.raises(InputError, match="another base model"):
        apply_to_checkpoint(other, [load_patch(res.patch_path)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_shard_is_refused(setup, tmp_path):
    _, base, a1, _ = setup
    res = merge_checkpoint(base, a1, tmp_path / "merged")
    broken = tmp_path / "merged"
    shard = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    (broken / shard).unlink()
    with pytest.raises(InputError, match="missing shard"):
        apply_to_checkpoint(broken, [load_patch(res.patch_path)], tmp_path / "out", revert=True)


def test_shard_index_pointing_outside_the_model_dir_is_refused(setup, tmp_path):
    _, base, a1, _ = setup
    res = merge_checkpoint(base, a1, tmp_path / "merged")
    index_path = tmp_path / "merged" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    (tmp_path / "evil.safetensors").write_bytes((tmp_path / "merged" / index["weight_map"][first]).read_bytes())
    index["weight_map"][first] = "../evil.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match="outside the model directory"):
        apply_to_checkpoint(tmp_path / "merged", [load_patch(res.patch_path)], tmp_path / "out", revert=True)


def test_truncated_shard_is_refused(setup, tmp_path):
    _, base, a1, _ = setup
    res = merge_checkpoint(base, a1, tmp_path / "merged")
    shard = sorted((tmp_path / "merged").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated|corrupt"):
        apply_to_checkpoint(tmp_path / "merged", [load_patch(res.patch_path)], tmp_path / "out", revert=True)


def test_in_place_apply_replaces_the_directory_and_leaves_no_temp_files(setup, tmp_path):
    _, base, a1, _ = setup
    res = merge_checkpoint(base, a1, tmp_path / "merged", patch_path=tmp_path / "p.safetensors")
    import shutil

    shutil.copytree(base, tmp_path / "work")
    apply_to_checkpoint(tmp_path / "work", [load_patch(res.patch_path)], in_place=True)
    assert fingerprints(tmp_path / "work") == fingerprints(tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "p.safetensors", "work"]


# ----------------------------------------------------------------------------- kill mid-write

def _big_checkpoint(root: Path, shards: int = 3, numel: int = 3 << 20) -> tuple[Path, Path]:
    """A synthetic sharded fp32 checkpoint (12 MB per shard) and a patch touching every shard."""
    base, target = root / "ckpt", {}
    base.mkdir()
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        t = {f"layer{s}.weight": torch.randn(numel // 1024, 1024, generator=g)}
        save_file(t, str(base / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        changed = t[f"layer{s}.weight"].clone()
        changed[::97, ::13] += 1.0
        target.update({f"layer{s}.weight": changed, **{}})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text('{"model_type": "synthetic"}')
    base_sd = load_state_dict(base)
    patch = build_patch_from_state_dicts(base_sd, target)
    return base, save_patch(patch, root / "p.safetensors")


def _apply_process(ckpt: Path, patch: Path, revert: bool, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    args = [sys.executable, "-c", "from roselora_export.cli import main; main()", "apply", "--base", str(ckpt),
            "--patch", str(patch), "--in-place"] + (["--revert"] if revert else [])
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)


def _wait_for_partial_shard(parent: Path, proc: subprocess.Popen, nth: int, timeout: float = 60.0) -> bool:
    """Poll until the nth shard of the temp copy exists (being written); False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        for tmp in parent.glob(".ckpt.inplace-*"):
            shards = sorted(tmp.glob("model-*.safetensors"))
            if len(shards) > nth:
                return True
        time.sleep(0.0005)
    return False


@pytest.mark.timeout(180)
def test_in_place_apply_killed_mid_write_leaves_old_or_new_checkpoint_whole(tmp_path):
    ckpt, patch = _big_checkpoint(tmp_path)
    base_state = fingerprints(ckpt)
    p = load_patch(patch)
    patched_state = {k: (p.tensors[k].patched_sha256 if k in p.tensors else v) for k, v in base_state.items()}
    t0 = time.monotonic()
    assert _apply_process(ckpt, patch, revert=False).wait() == 0
    full_run = time.monotonic() - t0
    assert fingerprints(ckpt) == patched_state
    before, after, revert, outcomes = patched_state, base_state, True, []
    # Kill while shard 0, 1, 2 of the new copy is being written, then late (around the final renames).
    for when in ("shard0", "shard1", "shard2", "late"):
        proc = _apply_process(ckpt, patch, revert)
        if when == "late":
            time.sleep(full_run * 0.97)
            hit = proc.poll() is None
        else:
            hit = _wait_for_partial_shard(tmp_path, proc, nth=int(when[-1]))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = fingerprints(ckpt)
        assert state in (before, after), f"killed at {when}: the checkpoint is a mix of old and new tensors"
        # the ledger is swapped in with the weights: it lists the patch exactly when the weights hold it
        assert len(read_ledger(ckpt).entries) == (1 if state == patched_state else 0), f"killed at {when}"
        outcomes.append((when, hit, "unchanged" if state == before else "done"))
        if state == after:  # the run completed before the kill: the next one goes the other way
            before, after, revert = after, before, not revert
    assert sum(hit for _, hit, _ in outcomes) >= 3, outcomes
    ledger = ["roselora-ledger.json"] if fingerprints(ckpt) == patched_state else []
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model-00001-of-00003.safetensors",
                                                      "model-00002-of-00003.safetensors",
                                                      "model-00003-of-00003.safetensors",
                                                      "model.safetensors.index.json", *ledger]


def test_concurrent_in_place_applies_both_land(tmp_path, monkeypatch):
    """While one in-place apply writes, a second one starts: the directory lock makes it wait and
    apply on top, where without it both would start from the old checkpoint and one edit be lost."""
    import threading

    from roselora_export.checkpoint import ops

    ckpt, _ = _big_checkpoint(tmp_path, shards=3, numel=1 << 14)
    base_sd = load_state_dict(ckpt)
    patches, want = {}, dict(fingerprints(ckpt))
    for layer in ("layer0.weight", "layer2.weight"):
        target = dict(base_sd)
        target[layer] = base_sd[layer] * 2
        patches[layer] = build_patch_from_state_dicts(base_sd, target)
        want[layer] = patches[layer].tensors[layer].patched_sha256
    first_writing, second_done = threading.Event(), threading.Event()
    write = ops.write_checkpoint

    def slow_first_write(*args, **kwargs):
        result = write(*args, **kwargs)
        if not first_writing.is_set():  # written, not yet swapped in: let the second apply run meanwhile
            first_writing.set()
            second_done.wait(timeout=2.0)  # it finishes, unless it has to wait for this one
        return result

    monkeypatch.setattr(ops, "write_checkpoint", slow_first_write)
    errors = []

    def run(layer, after=None):
        try:
            if after is not None:
                after.wait()
            apply_to_checkpoint(ckpt, [patches[layer]], in_place=True)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)
        finally:
            if after is not None:
                second_done.set()

    threads = [threading.Thread(target=run, args=("layer0.weight",)),
               threading.Thread(target=run, args=("layer2.weight", first_writing))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert fingerprints(ckpt) == want


def test_in_place_apply_removes_leftovers_of_a_killed_one(tmp_path):
    ckpt, patch = _big_checkpoint(tmp_path, shards=1, numel=1 << 14)
    dead = tmp_path / ".ckpt.inplace-deadbeef"
    dead.mkdir()
    (dead / "model-00001-of-00001.safetensors").write_bytes(b"half written")
    others = [tmp_path / ".ckpt.tmp-othr1234",  # a new-directory write (--out), which takes no lock
              tmp_path / ".ckpt.inplace-x.inplace-abcdefgh"]  # an in-place apply on a sibling "ckpt.inplace-x"
    for other in others:
        other.mkdir()
    apply_to_checkpoint(ckpt, [load_patch(patch)], in_place=True)
    assert not dead.exists() and all(other.exists() for other in others)


@pytest.mark.parametrize("renameat2", ["linux", "unsupported"])
def test_a_failed_swap_leaves_the_checkpoint_where_it_was(tmp_path, monkeypatch, renameat2):
    from roselora_export.core import atomic
    from roselora_export.core.atomic import exchange_dirs

    if renameat2 == "unsupported":  # the two-rename fallback must put the old copy back too
        monkeypatch.setattr(atomic, "_renameat2_exchange", lambda a, b: False)
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    with pytest.raises(OSError):
        exchange_dirs(tmp_path / ".ckpt.inplace-missing0", dest)  # the new copy is gone
    assert (dest / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_in_place_apply_from_inside_the_checkpoint_directory(tmp_path, monkeypatch):
    ckpt, patch = _big_checkpoint(tmp_path, shards=1, numel=1 << 14)
    want = {k: load_patch(patch).tensors[k].patched_sha256 for k in load_patch(patch).tensors}
    monkeypatch.chdir(ckpt)
    apply_to_checkpoint(".", [load_patch(patch)], in_place=True)
    assert {k: v for k, v in fingerprints(ckpt).items() if k in want} == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "p.safetensors"]


def test_leftover_cleanup_treats_the_checkpoint_name_literally(tmp_path):
    """A name with glob characters must neither match a sibling's temp directory nor miss its own leftovers."""
    ckpt, patch = _big_checkpoint(tmp_path, shards=1, numel=1 << 14)
    named = ckpt.rename(tmp_path / "model[v2]")
    own, sibling = tmp_path / ".model[v2].inplace-deadbeef", tmp_path / ".model2.inplace-abcdefgh"
    own.mkdir()
    sibling.mkdir()
    apply_to_checkpoint(named, [load_patch(patch)], in_place=True)
    assert not own.exists() and sibling.exists()


def test_in_place_apply_syncs_every_new_file_before_the_swap(tmp_path, monkeypatch):
    from roselora_export.checkpoint import rewrite

    ckpt, patch = _big_checkpoint(tmp_path, shards=2, numel=1 << 14)
    synced = []
    real = rewrite.fsync_files
    monkeypatch.setattr(rewrite, "fsync_files", lambda root: (synced.append(sorted(p.name for p in root.iterdir())), real(root)))
    apply_to_checkpoint(ckpt, [load_patch(patch)], tmp_path / "out")
    assert synced == []  # a new directory is not synced, like cp
    apply_to_checkpoint(ckpt, [load_patch(patch)], in_place=True)
    # index, config and shards of the new copy; the ledger, written after them, is fsynced by write_ledger
    assert synced == [sorted(p.name for p in ckpt.iterdir() if p.name != "roselora-ledger.json")]


def test_apply_revert_and_diff_in_a_fresh_process_never_import_torch(tmp_path):
    # torch's import alone takes longer than applying a patch to a 500 MB checkpoint.
    ckpt, patch = _big_checkpoint(tmp_path, shards=2, numel=1 << 14)
    runs = [["apply", "--base", str(ckpt), "--patch", str(patch), "--out", str(tmp_path / "out")],
            ["apply", "--base", str(tmp_path / "out"), "--patch", str(patch), "--revert", "--in-place"],
            ["diff", "--base", str(ckpt), "--target", str(tmp_path / "out"), "--out", str(tmp_path / "d.safetensors")]]
    for args in runs:
        code = (f"import sys; from roselora_export.cli import main; main({args!r}, standalone_mode=False); "
                "print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == "False", args
    assert fingerprints(tmp_path / "out") == fingerprints(ckpt)  # reverted in place, bit for bit
    assert load_patch(tmp_path / "d.safetensors").total_nnz == 0
