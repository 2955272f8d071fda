"""diff / apply / revert on checkpoint directories (merge: `checkpoint.merge`), streaming shard by shard
(rewrite.py), written atomically. Memory stays a few tensors whatever the model size; tensors are numpy
bit arrays: none of diff, apply and revert imports torch."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from ..patch.apply import check_result, check_stored, xor_bits
from ..patch.io import save_patch
from ..patch.ledger import write_ledger
from ..patch.model import Patch, check_same_keys, diff_bits, sha256_bits
from ..patch.provenance import now_iso
from ..patch.stack import Stack
from ..core.atomic import atomic_dir, check_disjoint, check_empty_out, locked_dir
from .merge import Progress
from .model_dir import ModelDir, open_model_dir
from .rewrite import write_checkpoint

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------- diff

def diff_checkpoints(base_dir: str | os.PathLike, target_dir: str | os.PathLike, out_file: str | os.PathLike | None = None,
                     *, progress: Progress | None = None) -> Patch:
    """A patch of every element that differs between two checkpoints with the same keys, shapes and dtypes.

    Both directories are read under their shared lock (an in-place apply on either waits, or is waited for)."""
    check_disjoint({"--out": out_file}, {"--base": base_dir, "--target": target_dir})
    with locked_dir(open_model_dir(base_dir, "--base").path, shared=True), \
            locked_dir(open_model_dir(target_dir, "--target").path, shared=True):
        patch = _diff(base_dir, target_dir, progress)
    if out_file is not None:
        save_patch(patch, out_file)
    return patch


def _diff(base_dir, target_dir, progress: Progress | None) -> Patch:
    base = open_model_dir(base_dir, "--base")
    target = open_model_dir(target_dir, "--target")
    check_same_keys(base.keys(), target.keys(), "--base", "--target")
    for name in base.keys():
        a, b = base.locations[name][1], target.locations[name][1]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise InputError(f"{name}: base is {list(a.shape)} {a.dtype}, target is {list(b.shape)} {b.dtype}; "
                             "diff needs identical shapes and dtypes")
    patch = Patch(provenance={"kind": "diff", "source": target.name, "base_model": base.name,
                              "base_config_sha256": base.fingerprint, "base_numel": base.numel, "created": now_iso(),
                              "tool": "roselora-export"})
    for name in base.keys():
        info = base.locations[name][1]
        tp = diff_bits(name, info.shape, info.dtype, base.read_array(name), target.read_array(name))
        if tp is not None:
            patch.tensors[name] = tp
        if progress:
            progress(base.locations[name][1].nbytes)
    return patch


# ----------------------------------------------------------------------------- apply / revert

def check_base_model(patches: list[Patch], model: ModelDir) -> None:
    for i, p in enumerate(patches):
        want = p.provenance.get("base_config_sha256")
        if want and want != model.fingerprint:
            raise InputError(f"patch {i + 1} was made for another base model ({p.provenance.get('base_model') or 'unknown'},"
                             f" config {want[:12]}); {model.path} has config {model.fingerprint[:12]}")


def _chain(patches: list[Patch], model: ModelDir, name: str, revert: bool, stack: Stack | None,
           order: list[int] | None = None, final: dict[str, str] | None = None) -> np.ndarray:
    """The tensor's stored bits with every patch that touches it applied in order (reverted in reverse).

    With `stack`, each step is checked first (whole-tensor fingerprint, else the touched-element rule),
    and `final` (if given) receives the result's whole sha256, computed on the way."""
    info = model.locations[name][1]
    bits = model.read_array(name)
    sha = sha256_bits(bits) if stack is not None else ""
    for k in order if order is not None else (range(len(patches))[::-1] if revert else range(len(patches))):
        tp = patches[k].tensors.get(name)
        if tp is None:
            continue
        check_stored(tp, info.shape, info.dtype)
        if stack is not None:
            stack.check(k, tp, sha, bits[tp.flat_index])
        bits = xor_bits(tp, bits, revert=revert, check=False)
        if stack is not None:
            sha, before = sha256_bits(bits), sha
            check_result(tp, before, sha, revert=revert)  # a wrong patched (base) fingerprint: refused before any write
    if final is not None and stack is not None:
        final[name] = sha
    return bits


def verify_patches(patches: list[Patch], model: ModelDir, *, revert: bool = False, sources: list | None = None,
                   stack: Stack | None = None) -> tuple[list[str], dict[str, str]]:
    """Check every touched tensor against the patches in order, reading only those tensors; nothing is written.

    Returns the touched names in checkpoint order and each one's whole sha256 after the command.
    Raises InputError naming the patch and the first bad tensor (and the patches it conflicts with).
    """
    check_base_model(patches, model)
    stack = stack or Stack(model.path, patches, sources, revert=revert)
    touched = {n for p in patches for n in p.tensors}
    absent = sorted(n for n in touched if n not in model.locations)
    if absent:
        raise InputError(f"the patch changes {absent[0]}, which {model.path} does not have; wrong base model?")
    names = [n for n in model.keys() if n in touched]
    final: dict[str, str] = {}
    for name in names:
        _chain(patches, model, name, revert, stack, stack.order(), final)
    return names, final


def apply_to_checkpoint(base_dir: str | os.PathLike, patches: list[Patch], out_dir: str | os.PathLike | None = None, *,
                        revert: bool = False, in_place: bool = False, progress: Progress | None = None,
                        sources: list | None = None, check: bool = False, lock_timeout: float | None = None) -> dict:
    """Apply (or revert) patches to a checkpoint directory, into `out_dir` or atomically in place.

    Patches stack by the touched-element rule (patch.overlap); the ledger is updated inside the directory
    that is swapped in. sources: the patch files, for the ledger. check=True validates and writes nothing
    (no lock, no file). The base is read under its directory lock (shared for --out, exclusive in place;
    lock_timeout in seconds), and every written tensor's sha256 is the one verified."""
    if not check and in_place == (out_dir is not None):
        raise InputError("give either --out DIR or --in-place (exactly one)")
    check_disjoint({"--out": out_dir}, {"--base": base_dir})
    if check:
        check_empty_out(out_dir)
        model = open_model_dir(base_dir)
        stack = Stack(model.path, patches, sources, revert=revert)
        names, _ = verify_patches(patches, model, revert=revert, stack=stack)
        return {"out": None, "check": True, "tensors": len(names), "patches": len(patches), "revert": revert,
                "in_place": in_place, "nnz": sum(p.total_nnz for p in patches),
                "ledger_patches": len(stack.ledger.entries)}
    # The checks and the write happen under the directory's lock: in place exclusive (a concurrent apply
    # waits, then sees this one's result and refuses a patch already applied), for --out shared (an
    # in-place apply cannot swap the shards between the checks and the copy).
    with locked_dir(open_model_dir(base_dir).path, shared=not in_place, timeout=lock_timeout):
        model = open_model_dir(base_dir)
        stack = Stack(model.path, patches, sources, revert=revert)
        names, final = verify_patches(patches, model, revert=revert, stack=stack)
        ledger = stack.ledger_after(final)
        dest = model.path if in_place else Path(out_dir)

        def produce(name: str) -> np.ndarray:
            bits = _chain(patches, model, name, revert, None, stack.order())
            if sha256_bits(bits) != final[name]:  # what is written is what was verified, bit for bit
                raise InputError(f"{name}: changed in {model.path} while it was being read; try again")
            return bits

        with atomic_dir(dest, replace=in_place) as tmp:
            write_checkpoint(model, tmp, produce, set(names), link_unchanged=in_place, durable=in_place,
                             progress=progress)
            write_ledger(ledger, tmp)  # inside the directory that is swapped in: weights and ledger in one step
    return {"out": str(dest), "tensors": len(names), "patches": len(patches), "revert": revert, "in_place": in_place,
            "nnz": sum(p.total_nnz for p in patches), "ledger_patches": len(ledger.entries)}


def load_state_dict(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, in memory (for small models and tests)."""
    model = open_model_dir(model_dir)
    return {k: model.read(k) for k in model.keys()}


def fingerprints(model_dir: str | os.PathLike) -> dict[str, str]:
    """sha256 of every tensor of a checkpoint directory (what tests compare to prove bit-exactness)."""
    model = open_model_dir(model_dir)
    return {k: sha256_bits(model.read_array(k)) for k in model.keys()}
