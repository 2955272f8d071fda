"""Read and write safetensors files one tensor at a time, so peak memory is about one tensor, not one shard.

Own code, on purpose: `safetensors.save_file` needs a whole shard in memory, and `safe_open` maps the
whole file. Here a tensor is mapped alone and a shard is written header first, then tensor by tensor
(unchanged runs copied file to file in the kernel). Importing this module imports neither torch nor
numpy: `merge` starts copying shards while torch is still being imported.
"""
from __future__ import annotations

import contextlib
import json
import mmap  # noqa: F401 (tests replace safetensors_stream.mmap.mmap)
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.dtypes import ITEMSIZE, torch_dtype
from ..core.safetensors import Header, TensorInfo, _map, read_array, read_header  # noqa: F401 (re-exported)
from ..errors import InputError

if TYPE_CHECKING:
    import torch


def read_tensor(info: TensorInfo, fd: int | None = None, path: Path | None = None) -> torch.Tensor:
    """One tensor, mapped from the file: a private copy-on-write mapping of just its byte range, unmapped
    when the tensor (and every view of it) is gone; writes to it stay private to this process."""
    import torch

    dtype = torch_dtype(info.dtype)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    m, offset = _map(info, fd, path)
    if info.start % ITEMSIZE[info.dtype] and offset:  # misaligned (no safetensors writer does this): copy
        raw = torch.frombuffer(m, dtype=torch.uint8, count=info.nbytes, offset=offset).clone()
        return raw.view(dtype).reshape(info.shape)
    flat = torch.frombuffer(m, dtype=dtype, count=info.nbytes // ITEMSIZE[info.dtype], offset=offset)
    return flat.reshape(info.shape)


def tensor_bytes(t) -> memoryview:
    """The bytes of a torch tensor, or of a numpy array (which needs no torch)."""
    if not hasattr(t, "detach"):  # numpy
        return memoryview(t).cast("B") if t.flags.c_contiguous else memoryview(t.copy()).cast("B")
    import torch

    t = t.detach().contiguous().cpu()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


@dataclass
class OutTensor:
    """One tensor of a shard to write: either `data` (a CPU tensor) or a byte range of a source file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def header_bytes(tensors: list[OutTensor], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Write a safetensors file: header first, then each declared tensor at its own offset. Every write is
    positional, so tensors may be written in any order, from several threads; `close` checks that every
    declared tensor was written exactly once."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None):
        self.path, self.expected = path, list(tensors)
        head = header_bytes(self.expected, metadata)
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = len(head)
        for t in self.expected:
            self.offsets[t.name] = (pos, t.nbytes)
            pos += t.nbytes
        self.size = pos
        self.order = [t.name for t in self.expected]
        self.rank = {n: k for k, n in enumerate(self.order)}
        self.written: set[str] = set()
        self.lock = threading.Lock()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _pwrite_all(self.fd, memoryview(head), 0)
        except BaseException:
            os.close(self.fd)
            raise

    def _claim(self, names: list[str], nbytes: int) -> int:
        """Mark `names` (consecutive in the declared order) as written; their total size must be `nbytes`."""
        if not names:
            raise RuntimeError("nothing to write")
        k = self.rank.get(names[0], -1)
        if k < 0 or self.order[k:k + len(names)] != names:
            raise RuntimeError(f"writing {names[0]} ({nbytes} B), which is not declared in this order")
        total = sum(self.offsets[n][1] for n in names)
        if total != nbytes:
            raise RuntimeError(f"writing {names[0]} ({nbytes} B) where {total} B were declared")
        with self.lock:
            again = self.written.intersection(names)
            if again:
                raise RuntimeError(f"{sorted(again)[0]} written twice")
            self.written.update(names)
        return self.offsets[names[0]][0]

    def write_at(self, name: str, t: torch.Tensor) -> None:
        """Write one tensor's bytes at its declared offset (thread-safe: positional write)."""
        data = tensor_bytes(t)
        _pwrite_all(self.fd, data, self._claim([name], data.nbytes))

    def copy_run(self, names: list[str], src_fd: int, start: int, nbytes: int) -> None:
        """Copy consecutive declared tensors, stored contiguously in `src_fd` at `start`, in one kernel copy."""
        pos = self._claim(list(names), nbytes)
        copy_range(src_fd, self.fd, start, pos, nbytes, names[0])

    def close(self, *, durable: bool = True) -> None:
        """Finish the file; durable=True also fsyncs it (needed before replacing a user's existing files)."""
        missing = len(self.expected) - len(self.written)
        if missing:
            raise RuntimeError(f"{self.path}: {missing} declared tensors were not written")
        try:
            if durable:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


WRITE_CHUNK = 1 << 20


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    # 1 MiB per call: one 16 MiB pwrite, once the kernel holds many dirty pages, was measured ~8x slower
    # in CPU time (dirty-page throttling done in one large batch) than the same bytes in 1 MiB writes.
    data = data.cast("B") if data.format != "B" else data
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:done + WRITE_CHUNK], pos + done)


def copy_range(src_fd: int, dst_fd: int, src_pos: int, dst_pos: int, nbytes: int, what: str = "") -> None:
    """Copy a byte range file to file in the kernel (copy_file_range), falling back to pread/pwrite."""
    done = 0
    with contextlib.suppress(OSError):  # not supported here: the copy goes on through pread/pwrite
        while done < nbytes:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_pos + done, dst_pos + done)
            if n <= 0:
                break
            done += n
    while done < nbytes:
        chunk = os.pread(src_fd, min(64 << 20, nbytes - done), src_pos + done)
        if not chunk:
            raise InputError(f"source truncated while copying {what}")
        _pwrite_all(dst_fd, memoryview(chunk), dst_pos + done)
        done += len(chunk)
