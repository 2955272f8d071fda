"""Apply or revert patches on an ONNX artifact by rewriting only the touched bytes of its external data.

No re-export: names.json turns each state-dict key into (initializer, offset, transposed), the
whole-tensor fingerprint is checked on the bytes as the state dict sees them, and the XOR is written
at the touched elements only. Apply and revert are the same XOR, so both are bit-exact.

Atomicity. Nothing is written until every patch has been checked in memory. Then a new artifact is
built beside the destination: each touched data file copied (a reflink clone where the filesystem has
them, a kernel-side copy otherwise) and its touched elements written through an mmap, the other files
hard-linked (in place) or copied, the ledger (patch.ledger) written beside them; it is fsynced and
swapped in whole (checkpoint.atomic, as for checkpoints). A crash leaves the old artifact or the new
one, never a mix and never a ledger out of step with the weights, and a running onnxruntime session
that mmapped the old data file keeps reading the old inode unchanged. Writing the touched bytes in
place would be cheaper on filesystems without reflinks (ext4), but a crash mid-write would leave a
torn file that onnxruntime loads without complaint, so it is not done.

Stacking. Patches are checked as on checkpoints (patch.stack): independent patches apply in either
order and any patch reverts while no later one overlaps its elements.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..patch.model import BITS_DTYPE, Patch, TensorPatch
from ..core.atomic import atomic_dir, check_disjoint, copy_entry, fsync_files, is_temp_name, locked_dir
from ..core.dtypes import check_finite
from ..patch.apply import check_result
from ..patch.ledger import write_ledger
from ..patch.stack import Stack
from .names import Location, OnnxArtifact, Target, open_artifact

_FICLONE = 0x40049409  # linux/fs.h: share the source's blocks copy-on-write (btrfs, xfs, bcachefs)


@dataclass
class TouchedTensor:
    """One initializer's new contents, computed in memory: bits in storage order and the positions changed."""

    location: Location
    bits: np.ndarray
    chunks: list = field(default_factory=list)

    @property
    def positions(self) -> np.ndarray:
        """Sorted distinct storage positions changed by any patch."""
        return np.unique(np.concatenate(self.chunks)) if self.chunks else np.zeros(0, dtype=np.int64)


def _storage_positions(target: Target, flat_index: np.ndarray) -> np.ndarray:
    """Flat state-dict indices -> flat indices in the initializer (transposed, sliced: see Target)."""
    return target.storage_positions(flat_index)


def _state_order(target: Target, bits: np.ndarray) -> np.ndarray:
    return target.state_order(bits)


def _read_bits(artifact: OnnxArtifact, loc: Location, dtype) -> np.ndarray:
    with open(artifact.root / loc.file, "rb") as f:
        f.seek(loc.offset)
        raw = f.read(loc.length)
    if len(raw) != loc.length:
        raise InputError(f"{artifact.root / loc.file}: external data truncated at initializer {loc.initializer!r}")
    return np.frombuffer(raw, dtype=BITS_DTYPE[dtype]).copy()


def plan_patches(artifact: OnnxArtifact, patches: list[Patch], *, revert: bool = False,
                 stack: Stack | None = None) -> dict[str, TouchedTensor]:
    """Check every patch against the artifact and compute the touched initializers' new bits (nothing written).

    Patches apply in order (revert: in reverse order). Each is checked as on checkpoints (patch.stack):
    the whole-tensor fingerprint for a fresh base, else the touched-element rule, so independent patches
    stack in any order; a stack of patches on one tensor works, and so does a patch naming both keys of
    a tied weight. stack: the command's checks and ledger (made here from the artifact's ledger if None).
    """
    return _plan(artifact, patches, stack or Stack(artifact.root, patches, revert=revert))[0]


def _plan(artifact: OnnxArtifact, patches: list[Patch], stack: Stack
          ) -> tuple[dict[str, TouchedTensor], dict[str, tuple[Target, str]]]:
    """plan_patches, plus each touched key's (first) target and initializer, for its final fingerprint."""
    revert = stack.revert
    touched: dict[str, TouchedTensor] = {}
    places: dict[str, tuple[Target, str]] = {}
    for k in stack.order():
        for tp, target in artifact.resolve(patches[k].tensors.values()):  # every place of every key, or refused whole
            _check_compatible(artifact, target, tp)
            loc = target.location
            if loc.initializer not in touched:
                touched[loc.initializer] = TouchedTensor(loc, _read_bits(artifact, loc, tp.dtype))
            entry = touched[loc.initializer]
            have = _state_sha(target, entry.bits)
            pos = _storage_positions(target, tp.flat_index)
            stack.check(k, tp, have, entry.bits[pos])
            entry.bits[pos] ^= tp.xor_bits
            entry.chunks.append(pos)
            check_finite(tp.name, entry.bits[pos], tp.dtype_name)  # the same checks as checkpoints and live models
            check_result(tp, have, _state_sha(target, entry.bits), revert=revert)
            places.setdefault(tp.name, (target, loc.initializer))
    return touched, places


def _state_sha(target: Target, bits: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(_state_order(target, bits))).hexdigest()


def _final_sha(touched: dict[str, TouchedTensor], places: dict[str, tuple[Target, str]]) -> dict[str, str]:
    """Whole sha256 (state-dict order) of every key the planned patches touch, after them (for the ledger)."""
    return {name: _state_sha(target, touched[init].bits) for name, (target, init) in places.items()}


def _check_compatible(artifact: OnnxArtifact, target: Target, tp: TensorPatch) -> None:
    loc = target.location
    if loc.dtype != tp.dtype:
        raise InputError(f"{artifact.root}: tensor {tp.name!r} is {loc.dtype} in the ONNX model but the patch is "
                         f"{tp.dtype}; export the ONNX model from the checkpoint the patch was built on")
    if target.state_shape != tuple(tp.shape):
        raise InputError(f"{artifact.root}: tensor {tp.name!r} has shape {target.state_shape} in the ONNX model "
                         f"but {tuple(tp.shape)} in the patch; was the patch built for another model?")


def clone_file(src: Path, dst: Path) -> str:
    """Copy src to dst: a copy-on-write reflink when the filesystem offers one, else a kernel-side copy."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return "reflink"
        except OSError:
            pass
    shutil.copyfile(src, dst)  # sendfile/copy_file_range on Linux: no copy through Python
    return "copy"


def _write_touched(data_path: Path, touched: list[TouchedTensor]) -> tuple[int, int]:
    """Write the changed elements into data_path through an mmap; returns (bytes changed, pages dirtied)."""
    mm = np.memmap(data_path, dtype=np.uint8, mode="r+")
    changed, pages = 0, set()
    try:
        for t in touched:
            pos = t.positions
            view = mm[t.location.offset: t.location.offset + t.location.length].view(t.bits.dtype)
            view[pos] = t.bits[pos]
            item = t.bits.dtype.itemsize
            changed += pos.size * item
            pages.update(((t.location.offset + pos * item) // 4096).tolist())
        mm.flush()
        for t in touched:  # read back what was written (cheap: the touched elements only)
            view = mm[t.location.offset: t.location.offset + t.location.length].view(t.bits.dtype)
            if not np.array_equal(view[t.positions], t.bits[t.positions]):
                raise RuntimeError(f"{data_path}: read-back of {t.location.initializer!r} differs after writing")
    finally:
        del mm
    return changed, len(pages)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_to_onnx_dir(base_dir: Path, patches: list[Patch], out_dir: Path | None, *, revert: bool = False,
                      in_place: bool = False, names: dict | None = None, sources: list | None = None,
                      check: bool = False, lock_timeout: float | None = None) -> dict:
    """Apply (or revert) patches to the ONNX artifact at base_dir, into out_dir or in place; returns a report.

    Only the touched initializers' elements are rewritten in the external data. With out_dir, the
    artifact is copied there first (out_dir must not exist or be empty); with in_place, the artifact
    is replaced atomically by a patched copy (see the module docstring). sources: the patch files, for
    the ledger; check=True validates everything and writes nothing. The artifact is read under its
    directory lock (core.atomic: shared for --out, exclusive in place; lock_timeout bounds the wait).
    """
    t0 = time.perf_counter()
    base_dir = Path(base_dir)
    if not check and in_place == (out_dir is not None):
        raise InputError("give exactly one of --out DIR (a patched copy) or --in-place")
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.resolve() == base_dir.resolve():
            raise InputError(f"--out {out_dir} is the base directory; use --in-place to patch it in place")
        check_disjoint({"--out": out_dir}, {"--base": base_dir})
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise InputError(f"--out {out_dir}: exists and is not an empty directory; choose a new path")
    if check:  # everything validated, nothing written: no lock, no temp file
        artifact = open_artifact(base_dir, names)
        touched = plan_patches(artifact, patches, stack=Stack(artifact.root, patches, sources, revert=revert))
        return {"format": "onnx", "check": True, "revert": revert, "out": None, "patches": len(patches),
                "tensors": sum(len(p.tensors) for p in patches), "initializers": len(touched),
                "elements": sum(int(t.positions.size) for t in touched.values())}
    # The checks and the write happen under the directory's lock, as for checkpoints (shared for --out).
    with locked_dir(base_dir, shared=not in_place, timeout=lock_timeout):
        return _apply(base_dir, patches, out_dir, revert=revert, in_place=in_place, t0=t0, names=names,
                      sources=sources)


def _apply(base_dir: Path, patches: list[Patch], out_dir: Path | None, *, revert: bool, in_place: bool,
           t0: float, names: dict | None = None, sources: list | None = None) -> dict:
    artifact = open_artifact(base_dir, names)  # names: a mapping made on demand (map-onnx), else names.json
    stack = Stack(artifact.root, patches, sources, revert=revert)
    touched, places = _plan(artifact, patches, stack)
    ledger = stack.ledger_after(_final_sha(touched, places))
    by_file: dict[str, list[TouchedTensor]] = {}
    for t in touched.values():
        by_file.setdefault(t.location.file, []).append(t)

    copy_kind, changed, pages = "none", 0, 0
    # The new artifact is built beside the destination and swapped in whole (checkpoint.atomic), with its
    # ledger inside: weights and ledger change in one step. In place, unchanged files are hard links.
    with atomic_dir(base_dir if in_place else out_dir, replace=in_place) as tmp:
        for src in sorted(base_dir.iterdir()):
            if is_temp_name(src.name):
                continue
            if src.name in by_file:
                copy_kind = clone_file(src, tmp / src.name)
                shutil.copymode(src, tmp / src.name)
            else:
                copy_entry(src, tmp / src.name, link=in_place)  # a FIFO or device is refused, not hung on
        for file, items in by_file.items():
            c, p = _write_touched(tmp / file, items)
            changed, pages = changed + c, pages + p
        for file in by_file:
            _fsync(tmp / file)
        write_ledger(ledger, tmp)
        if in_place:
            fsync_files(tmp)  # cheap for hard links; a power loss after the swap must not lose data

    data_bytes = sum((base_dir / f).stat().st_size for f in {loc.file for loc in artifact.locations.values()})
    return {
        "format": "onnx", "mode": "in-place" if in_place else "copy", "revert": revert,
        "out": str(base_dir if in_place else out_dir), "patches": len(patches),
        "tensors": sum(len(p.tensors) for p in patches), "initializers": len(touched),
        "elements": sum(int(t.positions.size) for t in touched.values()),
        "bytes_written": changed, "pages_written": pages, "data_bytes": data_bytes,
        "copy": copy_kind, "seconds": round(time.perf_counter() - t0, 4),
    }
