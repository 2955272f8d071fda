"""The ledger: which patches a checkpoint or ONNX directory holds, oldest first, in `roselora-ledger.json`.

Writers put it inside the directory they build and swap in (core.atomic), so the ledger and the
weights change in one step and a crash never leaves them out of step. Besides the patches (file
sha256, nnz, tensors, provenance, applied_at) it keeps the whole-tensor sha256 each touched tensor
had after the last write: a later apply or revert compares them with the weights, which detects a
ledger that disagrees with them. A checksum over the rest detects a hand-edited or truncated file.
A directory without a ledger (a fresh base, or patched before ledgers existed) holds no recorded
patches; its reverts rely on fingerprints alone.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.atomic import atomic_write
from ..errors import InputError
from .model import Patch
from .overlap import content_sha256, intersects
from .provenance import now_iso

LEDGER_NAME = "roselora-ledger.json"
FORMAT_NAME = "roselora-ledger"
FORMAT_VERSION = 1


@dataclass
class Entry:
    """One applied patch. sha256: its file's (of the bytes save_patch writes, for a patch never saved);
    content_sha256: of its changes (overlap.content_sha256), which is how a revert finds it."""

    sha256: str
    content_sha256: str
    nnz: int
    tensors: list[str]
    provenance: dict
    applied_at: str
    file: str | None = None

    def label(self) -> str:
        return f"{Path(self.file).name if self.file else 'patch'} (sha256 {self.sha256[:12]})"


@dataclass
class Ledger:
    entries: list[Entry] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)  # tensor -> whole-tensor sha256 after the last write

    def find(self, content: str) -> int | None:
        """Index of the entry with this content_sha256, or None."""
        return next((i for i, e in enumerate(self.entries) if e.content_sha256 == content), None)

    def to_json(self) -> dict:
        body = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "patches": [asdict(e) for e in self.entries],
                "weights": dict(sorted(self.weights.items()))}
        return {**body, "checksum": _checksum(body)}


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def entry_for(patch: Patch, path: str | os.PathLike | None = None) -> Entry:
    """The ledger entry for applying `patch` now (read from `path`, or built in memory)."""
    if path is not None:
        sha, file = file_sha256(path), str(Path(path).resolve())
    else:
        from safetensors.numpy import save

        from .io import encode_patch

        metadata, arrays = encode_patch(patch)
        sha, file = hashlib.sha256(save(arrays, metadata=metadata)).hexdigest(), None
    return Entry(sha256=sha, content_sha256=content_sha256(patch), nnz=patch.total_nnz, tensors=list(patch.tensors),
                 provenance=dict(patch.provenance), applied_at=now_iso(), file=file)


def _damaged(path: Path, why: str) -> InputError:
    return InputError(f"{path}: {why}; the ledger cannot be trusted. To recover, move it away (apply and revert "
                      "then check the weights by their fingerprints alone) or restore the directory from a backup")


def read_ledger(root: str | os.PathLike) -> Ledger:
    """The ledger of directory `root` (empty when it has none). InputError when it is damaged or was edited."""
    path = Path(root) / LEDGER_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Ledger()
    except (OSError, UnicodeDecodeError) as err:
        raise _damaged(path, f"cannot be read ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise _damaged(path, "is not valid JSON (truncated or damaged)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise _damaged(path, f"is not a {FORMAT_NAME} file")
    if data.get("version") != FORMAT_VERSION:
        raise InputError(f"{path}: ledger version {data.get('version')!r}; this tool reads version {FORMAT_VERSION}")
    body = {k: v for k, v in data.items() if k != "checksum"}
    if data.get("checksum") != _checksum(body):
        raise _damaged(path, "does not match its checksum (edited by hand, or damaged)")
    try:
        entries = [Entry(**e) for e in data["patches"]]
        weights = {str(k): str(v) for k, v in data["weights"].items()}
    except (KeyError, TypeError, AttributeError) as err:
        raise _damaged(path, f"is malformed ({err})") from None
    return Ledger(entries, weights)


def write_ledger(ledger: Ledger, root: str | os.PathLike) -> None:
    """Write `ledger` into directory `root` by temp file and rename (which also breaks a hard link to an old
    copy); an empty ledger removes the file. Call it on the directory that is then swapped in whole."""
    path = Path(root) / LEDGER_NAME
    if not ledger.entries:
        path.unlink(missing_ok=True)
        return
    # An owner-locked temporary: one a kill leaves behind is removed by the next writer or recovery.
    atomic_write(path, (json.dumps(ledger.to_json(), indent=1) + "\n").encode())


def check_weights(ledger: Ledger, root: str | os.PathLike, name: str, sha: str) -> None:
    """The tensor's whole sha256 must be what the ledger recorded after the last write (if it recorded one)."""
    want = ledger.weights.get(name)
    if want is not None and want != sha:
        raise InputError(
            f"{root}: the ledger does not match the weights: {name} is not what the last recorded apply or revert "
            f"left (changed by another tool, or files copied in by hand). To recover, rebuild the directory from its "
            f"base (`apply --patch ...` of the patches `roselora-export log {root}` lists), or capture the change with "
            f"`roselora-export diff --base BASE --target {root}`; deleting {LEDGER_NAME} continues without the ledger")


def overlapping_entries(entries: list[Entry], patch: Patch, tensor: str) -> list[Entry]:
    """Those of `entries` that change elements of `tensor` that `patch` changes: exactly, when an entry's
    patch file is still where it was applied from and unchanged; otherwise every entry touching `tensor`."""
    from .io import load_patch

    out = []
    for e in entries:
        if tensor not in e.tensors:
            continue
        other = None
        if e.file and Path(e.file).is_file():
            try:
                other = load_patch(e.file)
                if content_sha256(other) != e.content_sha256:
                    other = None
            except InputError:
                other = None
        if other is None or intersects(other.tensors[tensor].flat_index, patch.tensors[tensor].flat_index):
            out.append(e)
    return out


def describe(entries: list[Entry]) -> str:
    return ", ".join(e.label() for e in entries)


def record_merge(base_root: str | os.PathLike, out_tmp: str | os.PathLike, patch: Patch, patch_file: str | os.PathLike,
                 final_path: str | os.PathLike, *, converted: bool) -> None:
    """The ledger of a merge's output (`out_tmp`, before it is renamed into place): the base's ledger, if any,
    plus the merge's patch, whose base is the base directory's state. When the merge converted dtypes, the
    base's patches cannot be reverted in the new dtype, so only the merge's own patch is recorded."""
    old = Ledger() if converted else read_ledger(base_root)
    for name, tp in patch.tensors.items():
        check_weights(old, base_root, name, tp.base_sha256)
    entry = entry_for(patch, patch_file)
    entry.file = str(Path(final_path).resolve())
    write_ledger(Ledger(old.entries + [entry], {**old.weights, **{n: tp.patched_sha256 for n, tp in patch.tensors.items()}}),
                 out_tmp)
