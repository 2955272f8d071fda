"""Rewrite a checkpoint directory shard by shard: same sharding and index, some tensors new, maybe a new dtype.

Used by `apply` (ops) and by `merge --dtype` when tensors change dtype. Imports no torch: a torch
tensor handed in by `produce` is written as it is, dtype conversions are numpy (patch.merge_math).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import stat
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..core.atomic import fsync_files, link_or_copy
from ..core.dtypes import PATCHABLE, TORCH_NAMES
from .copier import copy_side_files
from .model_dir import INDEX_NAME, ModelDir
from .safetensors_stream import ITEMSIZE, OutTensor, ShardWriter, TensorInfo

FLOAT_DTYPES = PATCHABLE  # the dtypes merge can edit and --dtype converts
OVERLAP_BYTES = 256 << 20  # tensors converted at once hold at most this many bytes (one alone when larger)
Progress = Callable[[int], None]


def _check_produced(info: TensorInfo, out: OutTensor, new) -> None:
    """A produced tensor must be what the shard's header declares: dtype and shape, or for a numpy bit
    array its element width, count and little-endian byte order (bits carry no dtype name)."""
    if hasattr(new, "numpy"):  # a torch tensor (torch is imported, since one exists)
        from .safetensors_stream import ST_DTYPES

        ok, got = ST_DTYPES.get(new.dtype) == out.dtype and tuple(new.shape) == info.shape, f"{new.dtype} {tuple(new.shape)}"
    else:
        ok = (new.dtype.itemsize == ITEMSIZE[out.dtype] and new.size == math.prod(info.shape)
              and new.dtype.byteorder in "<=|" and new.nbytes == out.nbytes)
        got = f"{new.dtype} {new.shape}"
    if not ok:
        raise RuntimeError(f"{info.name}: produced {got}, declared {out.dtype} {info.shape} ({out.nbytes} bytes)")


CONVERT_JOBS = 2  # tensors converted to the new dtype at once (merge --dtype)


def _out_dtype(info: TensorInfo, dtype: str | None) -> str:
    return dtype if dtype is not None and info.dtype in FLOAT_DTYPES else info.dtype


def _convert(model: ModelDir, writer: ShardWriter, name: str, src: str, dst: str) -> None:
    from ..patch.merge_math import convert_bits

    writer.write_at(name, convert_bits(model.read_array(name), src, dst))


def write_checkpoint(model: ModelDir, tmp: Path, produce: Callable[[str], object], changed: set[str], *,
                     dtype: str | None = None, link_unchanged: bool = False, durable: bool = False,
                     progress: Progress | None = None) -> None:
    """Write `model` into `tmp` with the same sharding and index; `produce(name)` gives new values for `changed`.

    dtype: store every float tensor as this safetensors dtype ("F32", "F16", "BF16"; None keeps each
    one's). produce(name) returns a torch tensor, or a flat numpy array of the stored bits (then only
    its size is checked), or None to keep the tensor.

    durable=True fsyncs every new file: in-place updates need it, so that even a power loss after the
    directory swap cannot leave the user's only copy with unwritten data. New output directories skip
    it (like cp or save_pretrained); a kill still leaves them absent or whole, thanks to the rename.
    link_unchanged=True (in-place updates) also gives every new file the permission bits of the one it replaces.
    """
    copy_side_files(model, tmp, TORCH_NAMES[dtype] if dtype is not None else None, link=link_unchanged)
    # Unchanged bytes are copied by one background thread (kernel copies, GIL released), and tensors
    # that only change dtype are converted by CONVERT_JOBS threads (numpy releases the GIL), while this
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
                    _check_produced(i, o, new)
                    writer.write_at(i.name, new)
                    del new
                elif o.dtype != i.dtype:
                    flush_run()
                    # Bounded: at most CONVERT_JOBS tensors, and one alone when large, so memory stays a few tensors.
                    while converting and (len(converting) >= CONVERT_JOBS
                                          or sum(n for _, n in converting) + i.nbytes > OVERLAP_BYTES):
                        converting.popleft()[0].result()
                    fut = convert_pool.submit(_convert, model, writer, i.name, i.dtype, o.dtype)
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
    if link_unchanged:  # an in-place update: every file keeps the permission bits of the one it replaces
        for src in [h.path for h in model.shards] + ([model.path / INDEX_NAME] if model.index is not None else []):
            os.chmod(tmp / src.name, stat.S_IMODE(src.stat().st_mode))
    if durable:
        fsync_files(tmp)  # the index, and side files or shards copied where they could not be hard-linked
