"""In-place writes of scattered elements into an artifact's files, made crash-safe by an undo journal.

    write_in_place(root, regions, graph_file, ledger)  writes, then commits (removes the journal)
    recover(root)                                       rolls back an interrupted write_in_place, if any

Copying a data file of hundreds of MB to swap it in costs more than the patch, so the touched elements
are written where they are, each step durable before the next: (1) the journal `.roselora-undo.journal`
(per region its file, inode, offset, positions, old and new bits; the old ledger; a sha256 over it all),
written atomically; (2) the graph file renamed to `NAME.interrupted`, so a loader finds no model rather
than a half-patched one; (3) the elements (pwrite, read back, fsync) and the ledger; (4) the graph
renamed back, the journal removed. A failure rolls back at once; after a kill, the next command on the
directory calls `recover` first. Recovery refuses (one line, nothing written) when a file was replaced
or an element holds neither its old nor its new bits. Guarantees: docs/design.md "What is guaranteed".
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_write, fsync_dir, locked_dir, remove_stale_temps
from ..errors import InputError

JOURNAL = ".roselora-undo.journal"
HIDDEN = ".interrupted"  # suffix of the graph file while its weights are rewritten
_MAGIC, _VERSION = b"RLUNDO01", 1
_GAP = 1 << 16  # elements this close (bytes) are written in one read-modify-write: fewer system calls


@dataclass
class Region:
    """Elements of one initializer to change: its bytes start at `offset` in `file` (relative to the root);
    `positions` (int64, sorted, distinct) index elements of dtype `old.dtype`; old/new: their bits."""

    file: str
    offset: int
    positions: np.ndarray
    old: np.ndarray
    new: np.ndarray


def journal_path(root: Path) -> Path:
    return Path(root) / JOURNAL


def _encode(root: Path, regions: list[Region], graph_file: str, ledger_text: str | None, ledger_name: str) -> bytes:
    entries, blobs = [], []
    for r in regions:
        st = os.stat(root / r.file)
        entries.append({"file": r.file, "offset": r.offset, "count": int(r.positions.size),
                        "bits": r.old.dtype.str, "inode": [st.st_dev, st.st_ino], "size": st.st_size})
        blobs += [np.ascontiguousarray(r.positions, "<i8").tobytes(), np.ascontiguousarray(r.old).tobytes(),
                  np.ascontiguousarray(r.new).tobytes()]
    head = json.dumps({"version": _VERSION, "graph": graph_file, "ledger_name": ledger_name, "ledger": ledger_text,
                       "entries": entries}).encode()
    body = _MAGIC + struct.pack("<Q", len(head)) + head + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def _decode(path: Path) -> tuple[dict, list[Region]]:
    raw = path.read_bytes()
    body, digest = raw[:-32], raw[-32:]
    if len(raw) < len(_MAGIC) + 40 or not body.startswith(_MAGIC) or hashlib.sha256(body).digest() != digest:
        raise InputError(f"{path}: the undo journal of an interrupted in-place apply is damaged, so the directory "
                         "cannot be rolled back; restore the artifact from a copy (or rebuild it) and remove the journal")
    (n,) = struct.unpack_from("<Q", body, len(_MAGIC))
    pos = len(_MAGIC) + 8
    head = json.loads(body[pos: pos + n])
    pos += n
    regions = []
    for e in head["entries"]:
        bits, count = np.dtype(e["bits"]), e["count"]
        old, new = (np.frombuffer(body, bits, count, pos + (8 + k * bits.itemsize) * count) for k in (0, 1))
        regions.append(Region(e["file"], e["offset"], np.frombuffer(body, "<i8", count, pos), old, new))
        pos += (8 + 2 * bits.itemsize) * count
    return head, regions


def _runs(positions: np.ndarray, itemsize: int) -> list[tuple[int, int]]:
    """(first, last+1) index ranges into `positions` whose neighbours lie within _GAP bytes of each other."""
    if positions.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) * itemsize > _GAP) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [positions.size]])
    return list(zip(starts.tolist(), ends.tolist()))


def _pread(fd: int, n: int, at: int, path: Path) -> bytes:
    data = os.pread(fd, n, at)
    if len(data) != n:
        raise InputError(f"{path}: shorter than the journal says ({at + n} bytes needed); the file was replaced")
    return data


def _put(fd: int, path: Path, region: Region, values: np.ndarray) -> None:
    """Write `values` at the region's positions: one read-modify-write of each run of nearby elements."""
    item = values.dtype.itemsize
    for a, b in _runs(region.positions, item):
        lo, hi = int(region.positions[a]), int(region.positions[b - 1]) + 1
        at = region.offset + lo * item
        span = np.frombuffer(_pread(fd, (hi - lo) * item, at, path), values.dtype).copy()
        span[region.positions[a:b] - lo] = values[a:b]
        view, done = memoryview(span).cast("B"), 0
        while done < view.nbytes:
            done += os.pwrite(fd, view[done:], at + done)


def _get(fd: int, path: Path, region: Region) -> np.ndarray:
    """The bits now at the region's positions."""
    item = region.old.dtype.itemsize
    out = np.empty(region.positions.size, region.old.dtype)
    for a, b in _runs(region.positions, item):
        lo, hi = int(region.positions[a]), int(region.positions[b - 1]) + 1
        span = np.frombuffer(_pread(fd, (hi - lo) * item, region.offset + lo * item, path), region.old.dtype)
        out[a:b] = span[region.positions[a:b] - lo]
    return out


def _where(root: Path, graph_file: str, file: str) -> Path:
    """A file's path now: the graph file is under its hidden name while it is rewritten."""
    hidden = root / (graph_file + HIDDEN)
    return hidden if file == graph_file and hidden.exists() else root / file


def _write_ledger_text(root: Path, name: str, text: str | None) -> None:
    if text is None:
        (root / name).unlink(missing_ok=True)
    else:
        atomic_write(root / name, text.encode())


def _open_all(root: Path, graph_file: str, regions: list[Region]) -> dict[str, int]:
    fds: dict[str, int] = {}
    try:
        for r in regions:
            if r.file not in fds:
                fds[r.file] = os.open(_where(root, graph_file, r.file), os.O_RDWR)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _roll_back(root: Path, head: dict, regions: list[Region], *, check: bool) -> None:
    graph = head["graph"]
    if check:
        for r, e in zip(regions, head["entries"]):
            st = os.stat(_where(root, graph, r.file))
            if [st.st_dev, st.st_ino] != e["inode"] or st.st_size != e["size"]:
                raise InputError(f"{root / r.file}: replaced since an in-place apply was interrupted, so its undo "
                                 f"journal no longer applies; if the artifact was rebuilt, remove {root / JOURNAL}")
    fds = _open_all(root, graph, regions)
    try:
        if check:
            for r in regions:
                now = _get(fds[r.file], root / r.file, r)
                if not np.all((now == r.old) | (now == r.new)):
                    raise InputError(f"{root / r.file}: changed since an in-place apply was interrupted, so its undo "
                                     f"journal no longer applies; if the artifact was rebuilt, remove {root / JOURNAL}")
        for r in regions:
            _put(fds[r.file], root / r.file, r, r.old)
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    _write_ledger_text(root, head["ledger_name"], head["ledger"])
    hidden = root / (graph + HIDDEN)
    if hidden.exists():
        os.rename(hidden, root / graph)
    fsync_dir(root)
    (root / JOURNAL).unlink()
    fsync_dir(root)


def recover(root: str | os.PathLike) -> bool:
    """Roll back an interrupted in-place write (the journal is there); True if there was one. First removes
    killed writers' temporaries in `root`, journal or not. Takes the directory's exclusive lock: call it
    before taking any lock of your own on `root`."""
    root = Path(root)
    remove_stale_temps(root)
    if not (root / JOURNAL).exists():
        return False
    with locked_dir(root):
        if not (root / JOURNAL).exists():
            return False
        head, regions = _decode(root / JOURNAL)
        if (root / head["graph"]).exists() and (root / (head["graph"] + HIDDEN)).exists():
            raise InputError(f"{root}: both {head['graph']} and {head['graph'] + HIDDEN} exist beside the undo journal "
                             f"of an interrupted in-place apply; keep the right one and remove {root / JOURNAL}")
        _roll_back(root, head, regions, check=True)
    return True


def write_in_place(root: Path, regions: list[Region], graph_file: str, ledger_name: str,
                   write_ledger: Callable[[], None]) -> None:
    """Write each region's new bits where they are, then the new ledger (`write_ledger()`), crash-safe (module
    docstring). The caller holds the directory's exclusive lock and has checked everything."""
    old_ledger = (root / ledger_name).read_text() if (root / ledger_name).exists() else None
    fds = _open_all(root, graph_file, regions)
    try:
        atomic_write(root / JOURNAL, _encode(root, regions, graph_file, old_ledger, ledger_name))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    try:
        try:
            os.rename(root / graph_file, root / (graph_file + HIDDEN))  # the fds stay valid
            fsync_dir(root)
            for r in regions:
                _put(fds[r.file], root / r.file, r, r.new)
            for r in regions:  # read back what was written (the touched elements only)
                if not np.array_equal(_get(fds[r.file], root / r.file, r), r.new):
                    raise OSError(f"{root / r.file}: read-back differs after writing")
            for fd in fds.values():
                os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
        write_ledger()
        os.rename(root / (graph_file + HIDDEN), root / graph_file)
        fsync_dir(root)
        (root / JOURNAL).unlink()
        fsync_dir(root)
    except BaseException:
        head, journaled = _decode(root / JOURNAL)
        try:
            _roll_back(root, head, journaled, check=False)
        except BaseException:
            pass  # the journal stays: the next command rolls back
        raise


__all__ = ["JOURNAL", "HIDDEN", "Region", "write_in_place", "recover", "journal_path"]
