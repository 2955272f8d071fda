"""diff / apply / revert on checkpoint directories (merge: `checkpoint.merge`), streaming shard by shard,
written atomically.

Memory stays a few tensors (plus the adapter's deltas) whatever the model size: tensors are read one at a
time, each output shard is written header first and then tensor by tensor at fixed offsets, and unchanged
bytes are copied file to file in the kernel by a background thread while changed tensors are computed.
"""
from __future__ import annotations

import contextlib

import json
import os
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import InputError
from ..patch.apply import xor_tensor
from ..patch.build import diff_tensor, now_iso
from ..patch.io import save_patch
from ..patch.model import DTYPE_NAMES, Patch, tensor_bits
from .atomic import atomic_dir, fsync_files, link_or_copy, locked_dir
from .copier import copy_side_files
from .merge import (  # noqa: F401 (MergeResult, default_patch_path, merge_checkpoint: re-exported)
    FLOAT_DTYPES,
    OVERLAP_BYTES,
    MergeResult,
    Progress,
    default_patch_path,
    merge_checkpoint,
)
from .model_dir import INDEX_NAME, ModelDir, open_model_dir
from .safetensors_stream import ITEMSIZE, ST_DTYPES, TORCH_DTYPES, OutTensor, ShardWriter, TensorInfo

CONVERT_JOBS = 2  # tensors converted to the new dtype at once (merge --dtype)


def _out_dtype(info: TensorInfo, dtype: torch.dtype | None) -> str:
    return DTYPE_NAMES[dtype] if dtype is not None and info.dtype in FLOAT_DTYPES else info.dtype


def _convert(model: ModelDir, writer: ShardWriter, name: str, dtype: torch.dtype) -> None:
    writer.write_at(name, model.read(name).to(dtype))


def write_checkpoint(model: ModelDir, tmp: Path, produce: Callable[[str], torch.Tensor | None], changed: set[str], *,
                     dtype: torch.dtype | None = None, link_unchanged: bool = False, durable: bool = False,
                     progress: Progress | None = None) -> None:
    """Write `model` into `tmp` with the same sharding and index; `produce(name)` gives new values for `changed`.

    durable=True fsyncs every new file: in-place updates need it, so that even a power loss after the
    directory swap cannot leave the user's only copy with unwritten data. New output directories skip
    it (like cp or save_pretrained); a kill still leaves them absent or whole, thanks to the rename.
    """
    copy_side_files(model, tmp, str(dtype).removeprefix("torch.") if dtype is not None else None, link=link_unchanged)
    # Unchanged bytes are copied by one background thread (kernel copies, GIL released), and tensors
    # that only change dtype are converted by CONVERT_JOBS threads (torch releases the GIL), while this
    # thread computes and writes the changed tensors: every write is positional, so order is free.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roselora-copy")
    convert_pool = ThreadPoolExecutor(max_workers=CONVERT_JOBS, thread_name_prefix="roselora-convert")
    converting: deque[tuple[Future, int]] = deque()  # conversions in flight and the bytes each reads
    jobs: list[tuple[Future, int]] = []  # (copy or conversion job, bytes) not yet reported to `progress`
    shards: list[tuple[ShardWriter, int, list[Future]]] = []  # open output shards, their source fd and copy jobs

    def report(block: bool = False) -> None:
        while jobs and (block or jobs[0][0].done()):
            fut, nbytes = jobs.pop(0)
            fut.result()
            if progress:
                progress(nbytes)

    def close_finished(block: bool = False) -> None:
        while shards and (block or all(f.done() for f in shards[0][2])):
            writer, src_fd, futs = shards[0]
            for f in futs:
                f.result()
            writer.close(durable=durable)
            os.close(src_fd)
            shards.pop(0)

    try:
        for header in model.shards:
            dst = tmp / header.path.name
            infos = list(header.tensors.values())
            converts = dtype is not None and any(_out_dtype(i, dtype) != i.dtype for i in infos)
            if not converts and not any(i.name in changed for i in infos):
                copy = link_or_copy if link_unchanged else shutil.copy2
                jobs.append((pool.submit(copy, header.path, dst), sum(i.nbytes for i in infos)))
                continue
            outs = []
            for i in infos:
                od = _out_dtype(i, dtype)
                outs.append(OutTensor(i.name, od, i.shape, i.nbytes // ITEMSIZE[i.dtype] * ITEMSIZE[od]))
            writer = ShardWriter(dst, outs, header.metadata)
            try:
                src_fd = os.open(header.path, os.O_RDONLY)
            except BaseException:
                writer.abort()
                raise
            futs: list[Future] = []
            shards.append((writer, src_fd, futs))
            run: list[TensorInfo] = []  # unchanged tensors, contiguous in the source, copied as one range

            def flush_run() -> None:
                if run:
                    nbytes = sum(r.nbytes for r in run)
                    fut = pool.submit(writer.copy_run, [r.name for r in run], src_fd, run[0].start, nbytes)
                    futs.append(fut)
                    jobs.append((fut, nbytes))
                    run.clear()

            for i, o in zip(infos, outs):
                new = None
                if i.name in changed:
                    flush_run()
                    report()
                    new = produce(i.name)
                if new is not None:
                    if ST_DTYPES.get(new.dtype) != o.dtype or tuple(new.shape) != i.shape:
                        raise RuntimeError(f"{i.name}: produced {new.dtype} {tuple(new.shape)}, declared {o.dtype} {i.shape}")
                    writer.write_at(i.name, new)
                    del new
                elif o.dtype != i.dtype:
                    flush_run()
                    # Bounded: at most CONVERT_JOBS tensors, and one alone when large, so memory stays a few tensors.
                    while converting and (len(converting) >= CONVERT_JOBS
                                          or sum(n for _, n in converting) + i.nbytes > OVERLAP_BYTES):
                        converting.popleft()[0].result()
                    fut = convert_pool.submit(_convert, model, writer, i.name, TORCH_DTYPES[o.dtype])
                    converting.append((fut, i.nbytes))
                    futs.append(fut)
                    jobs.append((fut, i.nbytes))
                    report()
                    continue
                else:
                    if run and run[-1].start + run[-1].nbytes != i.start:
                        flush_run()
                    run.append(i)
                    continue
                if progress:
                    progress(i.nbytes)
            flush_run()
            close_finished()
        report(block=True)
        close_finished(block=True)
    except BaseException:
        convert_pool.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
        for writer, src_fd, _ in shards:
            writer.abort()
            os.close(src_fd)
        raise
    finally:
        convert_pool.shutdown(wait=True)
        pool.shutdown(wait=True)
    if model.index is not None:
        index = json.loads(json.dumps(model.index))
        total = sum(o for o in (os.path.getsize(tmp / h.path.name) for h in model.shards))
        index.setdefault("metadata", {})["total_size"] = total if dtype is not None else index.get("metadata", {}).get(
            "total_size", total)
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if durable:
        fsync_files(tmp)  # the index, and side files or shards copied where they could not be hard-linked


# ----------------------------------------------------------------------------- diff

def diff_checkpoints(base_dir: str | os.PathLike, target_dir: str | os.PathLike, out_file: str | os.PathLike | None = None,
                     *, progress: Progress | None = None) -> Patch:
    """A patch of every element that differs between two checkpoints with the same keys, shapes and dtypes."""
    base = open_model_dir(base_dir, "--base")
    target = open_model_dir(target_dir, "--target")
    missing, extra = set(base.keys()) - set(target.keys()), set(target.keys()) - set(base.keys())
    if missing or extra:
        which = sorted(missing)[0] if missing else sorted(extra)[0]
        raise InputError(f"base and target have different tensors (first: {which} is only in "
                         f"{'--base' if missing else '--target'}); diff needs the same keys")
    for name in base.keys():
        a, b = base.locations[name][1], target.locations[name][1]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise InputError(f"{name}: base is {list(a.shape)} {a.dtype}, target is {list(b.shape)} {b.dtype}; "
                             "diff needs identical shapes and dtypes")
    patch = Patch(provenance={"kind": "diff", "source": target.name, "base_model": base.name,
                              "base_config_sha256": base.fingerprint, "base_numel": base.numel, "created": now_iso(),
                              "tool": "roselora-export"})
    for name in base.keys():
        tp = diff_tensor(name, base.read(name), target.read(name))
        if tp is not None:
            patch.tensors[name] = tp
        if progress:
            progress(base.locations[name][1].nbytes)
    if out_file is not None:
        save_patch(patch, out_file)
    return patch


# ----------------------------------------------------------------------------- apply / revert

def check_base_model(patches: list[Patch], model: ModelDir) -> None:
    for i, p in enumerate(patches):
        want = p.provenance.get("base_config_sha256")
        if want and want != model.fingerprint:
            raise InputError(f"patch {i + 1} was made for another base model ({p.provenance.get('base_model') or 'unknown'},"
                             f" config {want[:12]}); {model.path} has config {model.fingerprint[:12]}")


def _chain(patches: list[Patch], name: str, t: torch.Tensor, revert: bool, check: bool) -> torch.Tensor:
    for p in (reversed(patches) if revert else patches):
        if name in p.tensors:
            t = xor_tensor(p.tensors[name], t, revert=revert, check=check)
    return t


def verify_patches(patches: list[Patch], model: ModelDir, *, revert: bool = False) -> list[str]:
    """Check every touched tensor against the patches in order, reading only those tensors; nothing is written.

    Returns the touched names in checkpoint order. Raises InputError naming the first bad tensor.
    """
    check_base_model(patches, model)
    touched = {n for p in patches for n in p.tensors}
    absent = sorted(n for n in touched if n not in model.locations)
    if absent:
        raise InputError(f"the patch changes {absent[0]}, which {model.path} does not have; wrong base model?")
    names = [n for n in model.keys() if n in touched]
    for name in names:
        _chain(patches, name, model.read(name), revert, check=True)
    return names


def apply_to_checkpoint(base_dir: str | os.PathLike, patches: list[Patch], out_dir: str | os.PathLike | None = None, *,
                        revert: bool = False, in_place: bool = False, progress: Progress | None = None) -> dict:
    """Apply (or revert) patches to a checkpoint directory, into `out_dir` or atomically in place."""
    if in_place == (out_dir is not None):
        raise InputError("give either --out DIR or --in-place (exactly one)")
    # In place, the checks and the write happen under the directory's lock: a concurrent apply waits,
    # then sees this one's result (and refuses a patch that is already applied).
    with locked_dir(open_model_dir(base_dir).path) if in_place else contextlib.nullcontext():
        model = open_model_dir(base_dir)
        names = verify_patches(patches, model, revert=revert)
        dest = model.path if in_place else Path(out_dir)
        with atomic_dir(dest, replace=in_place) as tmp:
            write_checkpoint(model, tmp, lambda n: _chain(patches, n, model.read(n), revert, check=False), set(names),
                             link_unchanged=in_place, durable=in_place, progress=progress)
    return {"out": str(dest), "tensors": len(names), "patches": len(patches), "revert": revert, "in_place": in_place,
            "nnz": sum(p.total_nnz for p in patches)}


def load_state_dict(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, in memory (for small models and tests)."""
    model = open_model_dir(model_dir)
    return {k: model.read(k) for k in model.keys()}


def fingerprints(model_dir: str | os.PathLike) -> dict[str, str]:
    """sha256 of every tensor of a checkpoint directory (what tests compare to prove bit-exactness)."""
    import hashlib

    model = open_model_dir(model_dir)
    out = {}
    for k in model.keys():
        t = model.read(k)
        out[k] = hashlib.sha256(tensor_bits(t).tobytes() if t.dtype in DTYPE_NAMES else t.numpy().tobytes()).hexdigest()
    return out


