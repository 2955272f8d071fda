"""Apply or revert patches on an ONNX artifact by rewriting only the touched bytes of its files.

No re-export: names.json turns each state-dict key into (initializer, offset, layout), the whole-tensor
fingerprint is checked on the bytes as the state dict sees them, and the XOR is written at the touched
elements only; apply and revert are the same XOR, so both are bit-exact. Nothing is written until every
patch has been checked in memory (stacking as on checkpoints, patch.stack). In place, the touched
elements are written where they are under an undo journal (journal.py); where a touched file is a
symlink or has other hard links, the artifact is rebuilt beside and swapped in whole, as --out always
does (core.atomic). Neither torch nor onnx is imported here: `apply` on an artifact needs numpy only.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core import dtypes
from ..core.atomic import (atomic_dir, check_disjoint, check_empty_out, copy_entry, fsync_file, fsync_files, is_temp_name,
                           locked_dir)
from ..core.dtypes import check_finite
from ..errors import InputError
from ..patch.apply import check_result
from ..patch.ledger import LEDGER_NAME, write_ledger
from ..patch.model import Patch, TensorPatch
from ..patch.stack import Stack
from .journal import Region, recover, write_in_place
from .names import MODEL_FILE, Location, OnnxArtifact, Target, open_artifact

_FICLONE = 0x40049409  # linux/fs.h: share the source's blocks copy-on-write (btrfs, xfs, bcachefs)


@dataclass
class TouchedTensor:
    """One initializer's new contents, computed in memory: bits in storage order and the positions changed."""

    location: Location
    bits: np.ndarray
    chunks: list = field(default_factory=list)
    before: list = field(default_factory=list)  # per chunk: the bits at its positions before its XOR
    _positions: tuple = (-1, None)

    def original(self, positions: np.ndarray) -> np.ndarray:
        """The bits at `positions` (changed ones, sorted) as read from the file, before any patch."""
        full = np.empty_like(self.bits)
        for pos, old in zip(reversed(self.chunks), reversed(self.before)):  # the first XOR's "before" wins
            full[pos] = old
        return full[positions]

    @property
    def positions(self) -> np.ndarray:
        """Sorted distinct storage positions changed by any patch."""
        if self._positions[0] != len(self.chunks):
            mask = np.zeros(self.bits.size, dtype=bool)  # (np.unique would sort, and import numpy.ma)
            for chunk in self.chunks:
                mask[chunk] = True
            self._positions = (len(self.chunks), np.flatnonzero(mask))
        return self._positions[1]


def _read_bits(artifact: OnnxArtifact, loc: Location, dtype: str) -> np.ndarray:
    bits = np.empty(loc.length // dtypes.ITEMSIZE[dtype], dtype=dtypes.BITS[dtype])
    with open(artifact.root / loc.file, "rb", buffering=0) as f:
        f.seek(loc.offset)
        view, done = memoryview(bits).cast("B"), 0
        while done < loc.length and (n := f.readinto(view[done:])):
            done += n
    if done != loc.length:
        raise InputError(f"{artifact.root / loc.file}: external data truncated at initializer {loc.initializer!r}")
    return bits


def plan_patches(artifact: OnnxArtifact, patches: list[Patch], *, revert: bool = False,
                 stack: Stack | None = None) -> dict[str, TouchedTensor]:
    """Check every patch against the artifact and compute the touched initializers' new bits (nothing written).

    Patches apply in order (revert: in reverse order). Each is checked as on checkpoints (patch.stack):
    the whole-tensor fingerprint for a fresh base, else the touched-element rule, so independent patches
    stack in any order; a stack of patches on one tensor works, and so does a patch naming both keys of
    a tied weight. stack: the command's checks and ledger (made here from the artifact's ledger if None).
    """
    return _plan(artifact, patches, stack or Stack(artifact.root, patches, revert=revert))[0]


class _Shas:
    """Whole sha256 (state-dict order) of a target's tensor in its initializer's planned bits, computed again
    only after an XOR inside the target's region (q and v slices of one fused qkv are hashed once each)."""

    def __init__(self):
        self.known: dict[Target, tuple[int, str]] = {}

    def __call__(self, target: Target, entry: TouchedTensor) -> str:
        version, sha = self.known.get(target, (-1, ""))
        if version >= 0 and not any(target.covers(chunk) for chunk in entry.chunks[version:]):
            version = len(entry.chunks)  # nothing written inside the region since: still its fingerprint
        if version != len(entry.chunks):
            sha, version = _state_sha(target, entry.bits), len(entry.chunks)
        self.known[target] = (version, sha)
        return sha


def _plan(artifact: OnnxArtifact, patches: list[Patch], stack: Stack
          ) -> tuple[dict[str, TouchedTensor], dict[str, str]]:
    """plan_patches, plus each touched key's final whole sha256 (state-dict order), for the ledger."""
    revert = stack.revert
    touched: dict[str, TouchedTensor] = {}
    places: dict[str, tuple[Target, str]] = {}
    sha = _Shas()
    for k in stack.order():
        for tp, target in artifact.resolve(patches[k].tensors.values()):  # every place of every key, or refused whole
            _check_compatible(artifact, target, tp)
            loc = target.location
            if loc.initializer not in touched:
                touched[loc.initializer] = TouchedTensor(loc, _read_bits(artifact, loc, tp.dtype_name))
            entry = touched[loc.initializer]
            have = sha(target, entry)
            pos = target.storage_positions(tp.flat_index)  # transposed, sliced: see Target
            old = entry.bits[pos]
            stack.check(k, tp, have, old)
            entry.bits[pos] = old ^ tp.xor_bits
            entry.chunks.append(pos)
            entry.before.append(old)
            check_finite(tp.name, entry.bits[pos], tp.dtype_name)  # the same checks as checkpoints and live models
            check_result(tp, have, sha(target, entry), revert=revert)
            places.setdefault(tp.name, (target, loc.initializer))
    return touched, {name: sha(target, touched[init]) for name, (target, init) in places.items()}


def _state_sha(target: Target, bits: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(target.state_order(bits))).hexdigest()


def _check_compatible(artifact: OnnxArtifact, target: Target, tp: TensorPatch) -> None:
    loc = target.location
    if loc.dtype != tp.dtype_name:
        raise InputError(f"{artifact.root}: tensor {tp.name!r} is {loc.dtype} in the ONNX model but the patch is "
                         f"{tp.dtype_name}; export the ONNX model from the checkpoint the patch was built on")
    if target.state_shape != tuple(tp.shape):
        raise InputError(f"{artifact.root}: tensor {tp.name!r} has shape {target.state_shape} in the ONNX model "
                         f"but {tuple(tp.shape)} in the patch; was the patch built for another model?")


def clone_file(src: Path, dst: Path) -> str:
    """Copy src to dst: a copy-on-write reflink when the filesystem offers one, else a kernel-side copy."""
    with open(src, "rb") as fin, open(dst, "wb") as fout, contextlib.suppress(OSError):
        fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        return "reflink"
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


def _writable_in_place(root: Path, by_file: dict) -> bool:
    """Whether every touched file is a regular file of its own (not a symlink, no other hard links)."""
    return all(stat.S_ISREG(st.st_mode) and st.st_nlink == 1 for st in (os.lstat(root / name) for name in by_file))


def _rebuild(base_dir: Path, out_dir: Path | None, by_file: dict[str, list[TouchedTensor]], ledger, *,
             in_place: bool) -> tuple[str, int, int]:
    """The artifact rebuilt beside its destination with the touched elements written, and swapped in whole
    (core.atomic), its ledger inside: weights and ledger change in one step. In place, unchanged files
    are hard links. Returns (how touched files were copied, bytes changed, pages dirtied)."""
    copy_kind, changed, pages = "none", 0, 0
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
            fsync_file(tmp / file)
        write_ledger(ledger, tmp)
        if in_place:
            fsync_files(tmp)  # cheap for hard links; a power loss after the swap must not lose data
    return copy_kind, changed, pages


def apply_to_onnx_dir(base_dir: Path, patches: list[Patch], out_dir: Path | None, *, revert: bool = False,
                      in_place: bool = False, names: dict | None = None, sources: list | None = None,
                      check: bool = False, lock_timeout: float | None = None) -> dict:
    """Apply (or revert) patches to the ONNX artifact at base_dir, into out_dir (new or empty) or in place;
    returns a report. sources: the patch files, for the ledger; check=True validates and writes nothing.
    Every mode first rolls back an interrupted in-place apply (journal.recover); the artifact is read
    under its directory lock (shared for --out, exclusive in place; lock_timeout bounds the wait)."""
    t0 = time.perf_counter()
    base_dir = Path(base_dir)
    if base_dir.is_dir():
        recover(base_dir)
    if not check and in_place == (out_dir is not None):
        raise InputError("give exactly one of --out DIR (a patched copy) or --in-place")
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.resolve() == base_dir.resolve():
            raise InputError(f"--out {out_dir} is the base directory; use --in-place to patch it in place")
        check_disjoint({"--out": out_dir}, {"--base": base_dir})
        check_empty_out(out_dir)
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
    touched, final_sha = _plan(artifact, patches, stack)
    ledger = stack.ledger_after(final_sha)
    by_file: dict[str, list[TouchedTensor]] = {}
    for t in touched.values():
        by_file.setdefault(t.location.file, []).append(t)

    copy_kind, changed, pages = "none", 0, 0
    if in_place and _writable_in_place(base_dir, by_file):
        regions = []
        for t in touched.values():
            pos, item = t.positions, t.bits.dtype.itemsize
            regions.append(Region(t.location.file, t.location.offset, pos, t.original(pos), t.bits[pos]))
            changed += pos.size * item
            page = (t.location.offset + pos * item) // 4096  # sorted
            pages += int(page.size and 1 + np.count_nonzero(np.diff(page)))
        write_in_place(base_dir, regions, artifact.names.get("model_file", MODEL_FILE), LEDGER_NAME,
                       lambda: write_ledger(ledger, base_dir))
        copy_kind = "none: written in place under an undo journal"
    else:
        copy_kind, changed, pages = _rebuild(base_dir, out_dir, by_file, ledger, in_place=in_place)
    data_bytes = sum((base_dir / f).stat().st_size for f in {loc.file for loc in artifact.locations.values()})
    return {
        "format": "onnx", "mode": "in-place" if in_place else "copy", "revert": revert,
        "out": str(base_dir if in_place else out_dir), "patches": len(patches),
        "tensors": sum(len(p.tensors) for p in patches), "initializers": len(touched),
        "elements": sum(int(t.positions.size) for t in touched.values()),
        "bytes_written": changed, "pages_written": pages, "data_bytes": data_bytes,
        "copy": copy_kind, "seconds": round(time.perf_counter() - t0, 4),
    }
