"""Read and write safetensors files one tensor at a time.

Own code, on purpose: `safetensors.save_file` needs every tensor of a shard in memory at once, and
reading through `safe_open` maps the whole file into the process (its pages count in RSS). Here a
tensor is read with one pread and a shard is written header first, then tensor by tensor (unchanged
tensors copied file-to-file in the kernel), so peak memory is about one tensor, not one shard.
The format is the public one: 8-byte little-endian header length, JSON header, raw data.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

MAX_HEADER_BYTES = 100 << 20

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
ITEMSIZE: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                            "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class Header:
    path: Path
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str] | None


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate a safetensors header (sizes, offsets, dtypes) without reading any tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: truncated safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise InputError(f"{path}: header claims {n} bytes but the file has {size}; truncated or corrupt")
            raw = f.read(n)
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{path}: safetensors header is not valid JSON; the file is corrupt") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not an object")
    metadata = header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    infos = []
    for name, e in header.items():
        try:
            dtype, shape, (a, b) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: bad header entry for {name}") from None
        if dtype not in ITEMSIZE:
            raise InputError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= data_size) or b - a != numel * ITEMSIZE[dtype]:
            raise InputError(f"{path}: tensor {name} has offsets outside the file; truncated or corrupt")
        infos.append(TensorInfo(name, dtype, shape, data_start + a, b - a))
    infos.sort(key=lambda t: t.start)
    return Header(path, {t.name: t for t in infos}, metadata)


def read_tensor(info: TensorInfo, fd: int | None = None, path: Path | None = None) -> torch.Tensor:
    """One tensor, read with pread (no mapping of the file)."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(info.nbytes)
        view, done = memoryview(buf), 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.start + done)
            if got <= 0:
                raise InputError(f"{path or 'shard'}: truncated while reading {info.name}")
            done += got
    finally:
        if own:
            os.close(fd)
    t = torch.frombuffer(buf, dtype=torch.uint8) if info.nbytes else torch.empty(0, dtype=torch.uint8)
    return t.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
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
    """Write a safetensors file tensor by tensor, in the order given to the constructor."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None):
        self.path, self.expected = path, list(tensors)
        self.f = open(path, "wb")
        self.f.write(header_bytes(self.expected, metadata))
        self.i = 0

    def _next(self, name: str, nbytes: int) -> None:
        t = self.expected[self.i]
        if t.name != name or t.nbytes != nbytes:
            raise RuntimeError(f"writing {name} ({nbytes} B) where {t.name} ({t.nbytes} B) was declared")
        self.i += 1

    def write(self, name: str, t: torch.Tensor) -> None:
        data = tensor_bytes(t)
        self._next(name, data.nbytes)
        self.f.write(data)

    def copy_from(self, name: str, src_fd: int, start: int, nbytes: int) -> None:
        """Copy bytes from another file without passing them through user space when the kernel can."""
        self._next(name, nbytes)
        self.f.flush()
        out_fd, done = self.f.fileno(), 0
        pos = self.f.tell()
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, out_fd, nbytes - done, start + done, pos + done)
                if n <= 0:
                    raise OSError("copy_file_range made no progress")
                done += n
            self.f.seek(pos + nbytes)
        except OSError:
            self.f.seek(pos + done)
            while done < nbytes:
                chunk = os.pread(src_fd, min(64 << 20, nbytes - done), start + done)
                if not chunk:
                    raise InputError(f"source truncated while copying {name}")
                self.f.write(chunk)
                done += len(chunk)

    def close(self, *, durable: bool = True) -> None:
        """Finish the file; durable=True also fsyncs it (needed before replacing a user's existing files)."""
        if self.i != len(self.expected):
            raise RuntimeError(f"{self.path}: {len(self.expected) - self.i} declared tensors were not written")
        self.f.flush()
        if durable:
            os.fsync(self.f.fileno())
        self.f.close()

    def abort(self) -> None:
        self.f.close()
