"""Byte ranges of inline initializer data inside a serialized .onnx file (protobuf wire format).

An initializer stored inline keeps its values in the ModelProto itself: `raw_data` (field 9) or a
packed `float_data` (field 4) of its TensorProto is one contiguous run of little-endian bytes in
the file. Knowing where that run starts lets `apply` XOR the touched elements in the file exactly
as it does in external data, leaving every other byte of the file as it was (re-serialising the
model would not promise that). Only the top-level graph's initializers are walked.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_FLOAT_DATA, _TENSOR_NAME, _TENSOR_RAW_DATA = 4, 8, 9


class WireError(ValueError):
    """The bytes are not the protobuf the walker expects."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """Yield (field number, wire type, payload start, payload end) for each field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos, end)
            yield field, wire, pos, nxt
        elif wire == 1:
            nxt = pos + 8
            yield field, wire, pos, nxt
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            nxt = pos + length
            yield field, wire, pos, nxt
        elif wire == 5:
            nxt = pos + 4
            yield field, wire, pos, nxt
        else:
            raise WireError(f"unsupported wire type {wire}")
        if nxt > end:
            raise WireError("field runs past the end of its message")
        pos = nxt


def inline_data_ranges(model_path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Initializer name -> (offset, length) of its inline raw_data / packed float_data in the file.

    Initializers whose values are elsewhere (external data, int32_data varints, ...) are absent.
    Raises WireError if the file is not a ModelProto as far as the walk needs.
    """
    path = Path(model_path)
    size = path.stat().st_size
    if size == 0:
        return {}
    out: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, wire, g0, g1 in _fields(buf, 0, size):
            if field != _MODEL_GRAPH or wire != 2:
                continue
            for gfield, gwire, t0, t1 in _fields(buf, g0, g1):
                if gfield != _GRAPH_INITIALIZER or gwire != 2:
                    continue
                name, data = None, None
                for tfield, twire, p0, p1 in _fields(buf, t0, t1):
                    if twire != 2:
                        continue
                    if tfield == _TENSOR_NAME:
                        name = bytes(buf[p0:p1]).decode("utf-8", "replace")
                    elif tfield in (_TENSOR_RAW_DATA, _TENSOR_FLOAT_DATA) and p1 > p0:
                        data = (p0, p1 - p0)
                if name is not None and data is not None:
                    out[name] = data
    return out
