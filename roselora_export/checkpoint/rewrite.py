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
from dataclasses import dataclass, field
from pathlib import Path

from ..core.atomic import fsync_files, link_or_copy
from ..core.dtypes import PATCHABLE, TORCH_NAMES, dtype_name
from .copier import copy_side_files
from .model_dir import INDEX_NAME, ModelDir
from .safetensors_stream import ITEMSIZE, OutTensor, ShardWriter, TensorInfo

OVERLAP_BYTES = 256 << 20  # tensors converted at once hold at most this many bytes (one alone when larger)
Progress = Callable[[int], None]


def _check_produced(info: TensorInfo, out: OutTensor, new) -> None:
    """A produced tensor must be what the shard's header declares: dtype and shape, or for a numpy bit
    array its element width, count and little-endian byte order (bits carry no dtype name)."""
    if hasattr(new, "numpy"):  # a torch tensor (torch is imported, since one exists)
        ok, got = dtype_name(new.dtype) == out.dtype and tuple(new.shape) == info.shape, f"{new.dtype} {tuple(new.shape)}"
    else:
        ok = (new.dtype.itemsize == ITEMSIZE[out.dtype] and new.size == math.prod(info.shape)
              and new.dtype.byteorder in "<=|" and new.nbytes == out.nbytes)
        got = f"{new.dtype} {new.shape}"
    if not ok:
        raise RuntimeError(f"{info.name}: produced {got}, declared {out.dtype} {info.shape} ({out.nbytes} bytes)")


CONVERT_JOBS = 2  # tensors converted to the new dtype at once (merge --dtype)


def _out_dtype(info: TensorInfo, dtype: str | None) -> str:
    return dtype if dtype is not None and info.dtype in PATCHABLE else info.dtype


def _convert(model: ModelDir, writer: ShardWriter, name: str, src: str, dst: str) -> None:
    from ..patch.merge_math import convert_bits

    writer.write_at(name, convert_bits(model.read_array(name), src, dst))


def write_checkpoint(model: ModelDir, tmp: Path, produce: Callable[[str], object], changed: set[str], *,
                     dtype: str | None = None, link_unchanged: bool = False, durable: bool = False,
                     progress: Progress | None = None) -> None:
    """Write `model` into `tmp` with the same sharding and index; `produce(name)` gives new values for `changed`:
    a torch tensor, a flat numpy array of the stored bits, or None to keep the tensor.

    dtype: store every float tensor as this safetensors dtype (None keeps each one's). durable=True
    fsyncs every new file (in-place updates: the user's only copy). link_unchanged=True (in place)
    hard-links unchanged shards and gives every new file the permission bits of the one it replaces."""
    copy_side_files(model, tmp, TORCH_NAMES[dtype] if dtype is not None else None, link=link_unchanged)
    with _Rewrite(model, produce, changed, dtype, durable, progress) as rewrite:
        for header in model.shards:
            rewrite.shard(header, tmp / header.path.name, link_unchanged)
        rewrite.finish()
    _write_index(model, tmp, dtype)
    if link_unchanged:  # an in-place update: every file keeps the permission bits of the one it replaces
        for src in [h.path for h in model.shards] + ([model.path / INDEX_NAME] if model.index is not None else []):
            os.chmod(tmp / src.name, stat.S_IMODE(src.stat().st_mode))
    if durable:
        fsync_files(tmp)  # the index, and side files or shards copied where they could not be hard-linked


def _write_index(model: ModelDir, tmp: Path, dtype: str | None) -> None:
    """The shard index, with total_size recomputed when the dtype (so the size) changed."""
    if model.index is None:
        return
    index = json.loads(json.dumps(model.index))
    meta = index.setdefault("metadata", {})
    if dtype is not None or "total_size" not in meta:
        meta["total_size"] = sum(os.path.getsize(tmp / h.path.name) for h in model.shards)
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


@dataclass
class _Shard:
    """One output shard being written: its writer, the source's fd, its copy and conversion jobs, and the
    current run of unchanged tensors (contiguous in the source, copied as one range)."""

    writer: ShardWriter
    src_fd: int
    futs: list[Future] = field(default_factory=list)
    run: list[TensorInfo] = field(default_factory=list)


class _Rewrite:
    """The threads of one write_checkpoint: one copies unchanged bytes, CONVERT_JOBS convert dtypes, while the
    caller's thread writes the changed tensors (every write is positional). An exception aborts every shard."""

    def __init__(self, model: ModelDir, produce, changed: set[str], dtype: str | None, durable: bool,
                 progress: Progress | None):
        self.model, self.produce, self.changed, self.dtype = model, produce, changed, dtype
        self.durable, self.progress = durable, progress
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roselora-copy")
        self.convert_pool = ThreadPoolExecutor(max_workers=CONVERT_JOBS, thread_name_prefix="roselora-convert")
        self.converting: deque[tuple[Future, int]] = deque()  # conversions in flight and the bytes each reads
        self.jobs: list[tuple[Future, int]] = []  # (copy or conversion job, bytes) not yet reported to `progress`
        self.shards: list[_Shard] = []  # open output shards, oldest first

    def __enter__(self) -> "_Rewrite":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.convert_pool.shutdown(wait=True, cancel_futures=True)
            self.pool.shutdown(wait=True, cancel_futures=True)
            for sh in self.shards:
                sh.writer.abort()
                os.close(sh.src_fd)
        self.convert_pool.shutdown(wait=True)
        self.pool.shutdown(wait=True)
        return False

    def shard(self, header, dst: Path, link_unchanged: bool) -> None:
        """Write one shard: copied whole when nothing in it changes, else tensor by tensor."""
        infos = list(header.tensors.values())
        outs = [OutTensor(i.name, _out_dtype(i, self.dtype), i.shape,
                          i.nbytes // ITEMSIZE[i.dtype] * ITEMSIZE[_out_dtype(i, self.dtype)]) for i in infos]
        if all(o.dtype == i.dtype and i.name not in self.changed for i, o in zip(infos, outs)):
            copy = link_or_copy if link_unchanged else shutil.copy2
            self.jobs.append((self.pool.submit(copy, header.path, dst), sum(i.nbytes for i in infos)))
            return
        writer = ShardWriter(dst, outs, header.metadata)
        try:
            src_fd = os.open(header.path, os.O_RDONLY)
        except BaseException:
            writer.abort()
            raise
        sh = _Shard(writer, src_fd)
        self.shards.append(sh)
        for i, o in zip(infos, outs):
            new = self._produce(sh, i) if i.name in self.changed else None
            if new is not None:
                _check_produced(i, o, new)
                writer.write_at(i.name, new)
                del new
                if self.progress:
                    self.progress(i.nbytes)
            elif o.dtype != i.dtype:
                self._convert(sh, i, o)
            else:
                if sh.run and sh.run[-1].start + sh.run[-1].nbytes != i.start:
                    self._flush_run(sh)
                sh.run.append(i)
        self._flush_run(sh)
        self._close_finished()

    def finish(self) -> None:
        """Wait for every copy and conversion, and close every shard."""
        self._report(block=True)
        self._close_finished(block=True)

    def _produce(self, sh: _Shard, i: TensorInfo):
        self._flush_run(sh)
        self._report()
        return self.produce(i.name)

    def _convert(self, sh: _Shard, i: TensorInfo, o: OutTensor) -> None:
        """Convert one tensor to the new dtype on the conversion threads."""
        self._flush_run(sh)
        # Bounded: at most CONVERT_JOBS tensors, and one alone when large, so memory stays a few tensors.
        while self.converting and (len(self.converting) >= CONVERT_JOBS
                                   or sum(n for _, n in self.converting) + i.nbytes > OVERLAP_BYTES):
            self.converting.popleft()[0].result()
        fut = self.convert_pool.submit(_convert, self.model, sh.writer, i.name, i.dtype, o.dtype)
        self.converting.append((fut, i.nbytes))
        sh.futs.append(fut)
        self.jobs.append((fut, i.nbytes))
        self._report()

    def _flush_run(self, sh: _Shard) -> None:
        """Copy the current run of unchanged tensors as one byte range, on the copy thread."""
        if sh.run:
            nbytes = sum(r.nbytes for r in sh.run)
            fut = self.pool.submit(sh.writer.copy_run, [r.name for r in sh.run], sh.src_fd, sh.run[0].start, nbytes)
            sh.futs.append(fut)
            self.jobs.append((fut, nbytes))
            sh.run = []

    def _report(self, block: bool = False) -> None:
        while self.jobs and (block or self.jobs[0][0].done()):
            fut, nbytes = self.jobs.pop(0)
            fut.result()
            if self.progress:
                self.progress(nbytes)

    def _close_finished(self, block: bool = False) -> None:
        while self.shards and (block or all(f.done() for f in self.shards[0].futs)):
            sh = self.shards[0]
            for f in sh.futs:
                f.result()
            sh.writer.close(durable=self.durable)
            os.close(sh.src_fd)
            self.shards.pop(0)
