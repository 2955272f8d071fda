"""The safetensors file, read: its header validated as strictly as the safetensors library does (or
stricter), and one tensor mapped as a numpy array (read_array), without torch.

The file is an 8-byte little-endian header length, a JSON object, then the tensors' data. Accepted:
each entry has a known dtype, a shape of non-negative integers (not floats, bools or strings) and
integer data offsets; sorted by offset the tensors tile the data exactly (no gap, no overlap, no
trailing byte; a misaligned tensor is read by a copy); `__metadata__`, when present, maps strings to
strings; no name appears twice. Anything else is an InputError naming the file. No tensor data is read.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from . import dtypes
from .dtypes import ITEMSIZE
from .oserrors import input_error

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


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


def _uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"{k!r} appears twice")
        out[k] = v
    return out


def read_header_bytes(path: Path, max_header: int = MAX_HEADER_BYTES, what: str = "safetensors file") -> tuple[bytes, int]:
    """The raw JSON header of `path` and the file's size, with the length checked before it is read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: truncated {what} ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > max_header:
                raise InputError(f"{path}: header claims {n} bytes (limit {max_header}); the file is corrupt or hostile")
            if n > size - 8:
                raise InputError(f"{path}: header claims {n} bytes but the file has {size}; truncated or corrupt")
            raw = f.read(n)
    except OSError as err:
        raise input_error(err, f"reading {path}") from None
    if len(raw) != n:
        raise InputError(f"{path}: truncated {what}")
    return raw, size


def parse_header(path: Path, raw: bytes, size: int) -> Header:
    """Validate a header read by read_header_bytes (see the module docstring for what is accepted)."""
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise InputError(f"{path}: safetensors header is not valid JSON ({str(err)[:80]}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise InputError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")
    data_start, data_size = 8 + len(raw), size - 8 - len(raw)
    entries = []
    for name, e in header.items():
        if not isinstance(e, dict):
            raise InputError(f"{path}: bad header entry for {name}")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise InputError(f"{path}: tensor {name} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_uint(d) for d in shape):
            raise InputError(f"{path}: tensor {name} has shape {shape!r}; dimensions must be non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_uint(o) for o in offsets)):
            raise InputError(f"{path}: tensor {name} has data_offsets {offsets!r}; two non-negative integers expected")
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    entries.sort()
    pos, infos = 0, []
    for a, b, name, dtype, shape in entries:
        if a != pos or b < a:
            raise InputError(f"{path}: tensor {name} has offsets [{a}, {b}], expected to start at {pos} "
                             "(tensors must tile the data without gaps or overlaps); the file is corrupt")
        if b - a != math.prod(shape) * ITEMSIZE[dtype]:
            raise InputError(f"{path}: tensor {name} holds {b - a} bytes, its shape {list(shape)} {dtype} needs "
                             f"{math.prod(shape) * ITEMSIZE[dtype]}; the file is corrupt")
        pos = b
        infos.append(TensorInfo(name, dtype, shape, data_start + a, b - a))
    if pos != data_size:
        raise InputError(f"{path}: the tensors cover {pos} bytes of data but the file has {data_size}"
                         f"{' (truncated)' if pos > data_size else ' (trailing bytes)'}; the file is corrupt")
    return Header(path, {t.name: t for t in infos}, metadata)


def read_header(path: str | os.PathLike, max_header: int = MAX_HEADER_BYTES) -> Header:
    """Parse and validate the header of a safetensors file without reading any tensor data."""
    path = Path(path)
    raw, size = read_header_bytes(path, max_header)
    return parse_header(path, raw, size)


def read_array(info: TensorInfo, fd: int | None = None, path: Path | None = None):
    """One tensor as a flat numpy array, mapped read-only, without torch; float tensors as their bit patterns
    (core.dtypes.NUMPY: uint32 for F32, uint16 for F16 and BF16)."""
    import numpy as np

    dtype = dtypes.NUMPY[info.dtype]
    if info.nbytes == 0:
        return np.zeros(0, dtype)
    m, offset = _map(info, fd, path, read_only=True)
    if info.start % ITEMSIZE[info.dtype] and offset:  # misaligned (no safetensors writer does this): copy
        return np.frombuffer(m, np.uint8, info.nbytes, offset).copy().view(dtype)
    return np.frombuffer(m, dtype, info.nbytes // dtype.itemsize, offset)


def _map(info: TensorInfo, fd: int | None, path: Path | None, read_only: bool = False):
    """A private mapping of the tensor's byte range (or a buffer read from it): (buffer, offset of the tensor).
    read_only: map it read-only with its pages read in at once (MAP_POPULATE), else copy-on-write."""
    own = fd is None
    if own:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise input_error(err, f"reading {path}") from None
    try:
        if os.fstat(fd).st_size < info.start + info.nbytes:
            raise InputError(f"{path or 'shard'}: truncated while reading {info.name}")
        lo = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        try:
            if read_only:
                m = mmap.mmap(fd, info.start + info.nbytes - lo, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                              prot=mmap.PROT_READ, offset=lo)
            else:
                m = mmap.mmap(fd, info.start + info.nbytes - lo, access=mmap.ACCESS_COPY, offset=lo)
        except OSError:  # a file system that cannot map files: read it into a buffer instead
            m, lo = _pread(fd, info, path), info.start
    finally:
        if own:
            os.close(fd)
    return m, info.start - lo


def _pread(fd: int, info: TensorInfo, path: Path | None) -> bytearray:
    buf = bytearray(info.nbytes)
    view, done = memoryview(buf), 0
    while done < info.nbytes:
        got = os.preadv(fd, [view[done:]], info.start + done)
        if got <= 0:
            raise InputError(f"{path or 'shard'}: truncated while reading {info.name}")
        done += got
    return buf
