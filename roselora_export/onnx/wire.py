"""The initializers of a serialized .onnx file, read from its protobuf wire format (no onnx import).

    read_initializers(path) -> Graph: every top-level initializer's name, data type, dims, external
                               data fields or inline byte range, and whether the graph has nodes

An inline initializer's `raw_data` (field 9) or packed `float_data` (field 4) is one contiguous run of
little-endian bytes in the file, so `apply` can XOR its touched elements there exactly as in external
data, leaving every other byte as it was (docs/design.md). Only the top-level graph's initializers are
walked; other fields are skipped by their length: milliseconds, and no import of onnx (about a second).
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INITIALIZER = 7, 1, 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_FLOAT_DATA, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 2, 4, 8, 9
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


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
            nxt = _varint(buf, pos, end)[1]
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            nxt = pos + length
        elif wire in (1, 5):  # fixed 64 / 32 bits
            nxt = pos + (8 if wire == 1 else 4)
        else:
            raise WireError(f"unsupported wire type {wire}")
        if nxt > end:
            raise WireError("field runs past the end of its message")
        yield field, wire, pos, nxt
        pos = nxt


@dataclass
class Initializer:
    """One TensorProto of the graph's initializer list, as far as locating its bytes needs."""

    name: str = ""
    data_type: int = 0
    dims: list[int] = field(default_factory=list)
    external: dict[str, str] | None = None  # external_data key -> value, when data_location is EXTERNAL
    inline: tuple[int, int] | None = None   # (offset, length) of raw_data / packed float_data in the file


@dataclass
class Graph:
    """The top-level graph: its initializers, and how many nodes it has (an empty graph is no model)."""

    initializers: list[Initializer]
    nodes: int


def _text(buf, p0: int, p1: int) -> str:
    return bytes(buf[p0:p1]).decode("utf-8", "replace")


def _tensor(buf, t0: int, t1: int) -> Initializer:
    init, external, location = Initializer(), {}, 0
    for tfield, twire, p0, p1 in _fields(buf, t0, t1):
        if tfield == _TENSOR_DIMS:
            if twire == 0:
                init.dims.append(_varint(buf, p0, p1)[0])
            elif twire == 2:  # packed
                pos = p0
                while pos < p1:
                    value, pos = _varint(buf, pos, p1)
                    init.dims.append(value)
        elif tfield == _TENSOR_DATA_TYPE and twire == 0:
            init.data_type = _varint(buf, p0, p1)[0]
        elif tfield == _TENSOR_DATA_LOCATION and twire == 0:
            location = _varint(buf, p0, p1)[0]
        elif twire != 2:
            continue
        elif tfield == _TENSOR_NAME:
            init.name = _text(buf, p0, p1)
        elif tfield in (_TENSOR_RAW_DATA, _TENSOR_FLOAT_DATA) and p1 > p0:
            init.inline = (p0, p1 - p0)
        elif tfield == _TENSOR_EXTERNAL_DATA:
            key = value = ""
            for efield, ewire, e0, e1 in _fields(buf, p0, p1):
                if ewire == 2 and efield in (1, 2):
                    key, value = (_text(buf, e0, e1), value) if efield == 1 else (key, _text(buf, e0, e1))
            external[key] = value
    if location == EXTERNAL:
        init.external, init.inline = external, None
    init.dims = [d - (1 << 64) if d >= 1 << 63 else d for d in init.dims]  # int64 varints
    return init


def read_initializers(model_path: str | os.PathLike) -> Graph:
    """The top-level graph's initializers (and its node count) from the .onnx file at model_path.

    Raises WireError if the file is not a ModelProto as far as the walk needs."""
    path = Path(model_path)
    size = path.stat().st_size
    if size == 0:
        return Graph([], 0)
    inits, nodes = [], 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field_no, wire, g0, g1 in _fields(buf, 0, size):
            if field_no != _MODEL_GRAPH or wire != 2:
                continue
            for gfield, gwire, t0, t1 in _fields(buf, g0, g1):
                if gwire != 2:
                    continue
                if gfield == _GRAPH_NODE:
                    nodes += 1
                elif gfield == _GRAPH_INITIALIZER:
                    inits.append(_tensor(buf, t0, t1))
    return Graph(inits, nodes)


def inline_data_ranges(model_path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Initializer name -> (offset, length) of its inline raw_data / packed float_data in the file (others are
    absent). Raises WireError if the file is not a ModelProto as far as the walk needs."""
    return {t.name: t.inline for t in read_initializers(model_path).initializers if t.inline is not None}
