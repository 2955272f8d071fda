"""The ONNX artifact directory: its files, `names.json`, and where each weight's bytes live.

An artifact directory written by `export_onnx` holds

    model.onnx        the graph; every initializer's data is external
    model.onnx.data   the weights, each tensor starting at an aligned offset (mmap-friendly)
    names.json        state-dict key -> initializer (and whether it is stored transposed)

plus the model's config and tokenizer files. Patches name state-dict keys; this module turns a
key into (initializer, offset, length, transposed) and checks the directory is whole, raising
InputError with a one-line fix otherwise.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError

from ..errors import InputError
from ..patch.model import DTYPE_NAMES, DTYPES_BY_NAME

NAMES_FILE = "names.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
NAMES_FORMAT = 1

# Alignment of tensor starts in the data file, as onnx-ir does it: tensors of 1 MiB and more start
# on a 64 KiB boundary (the largest mmap allocation granularity in use, Windows'), smaller ones
# on a 4 KiB page. The padding costs well under 1% of a real model.
ALIGN_LARGE, ALIGN_SMALL, LARGE_TENSOR = 65536, 4096, 1 << 20

ONNX_TO_TORCH: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
}
TORCH_TO_ONNX = {v: k for k, v in ONNX_TO_TORCH.items()}


def aligned_offset(offset: int, nbytes: int) -> int:
    """The first offset at or after `offset` where a tensor of `nbytes` may start."""
    align = ALIGN_LARGE if nbytes >= LARGE_TENSOR else ALIGN_SMALL
    return -(-offset // align) * align


@dataclass(frozen=True)
class Location:
    """Where one initializer's bytes are: file (relative to the artifact dir), offset, length."""

    initializer: str
    file: str
    offset: int
    length: int
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None for dtypes a patch cannot carry (int64 buffers, ...)


@dataclass(frozen=True)
class Target:
    """Where a state-dict key lives in the artifact; transposed means stored as key.T (2-D only)."""

    key: str
    location: Location
    transposed: bool

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.location.shape)) if self.transposed else self.location.shape


@dataclass
class OnnxArtifact:
    """An artifact directory, opened and checked: names.json read, graph parsed (without weights)."""

    root: Path
    names: dict
    model: onnx.ModelProto
    locations: dict[str, Location]

    @property
    def model_path(self) -> Path:
        return self.root / self.names.get("model_file", MODEL_FILE)

    def target(self, key: str) -> Target:
        """The initializer holding state-dict key `key`; InputError if the ONNX model lacks it."""
        entry = self.names["tensors"].get(key)
        if entry is None or entry.get("initializer") is None:
            why = "no such state-dict key" if entry is None else entry.get("reason", "not in the graph")
            raise InputError(f"the patch names tensor {key!r}, which the ONNX model in {self.root} lacks ({why}); "
                             "was the patch built for another model?")
        loc = self.locations.get(entry["initializer"])
        if loc is None:
            raise InputError(f"{self.root / NAMES_FILE}: {key!r} maps to initializer {entry['initializer']!r}, which "
                             f"{self.model_path.name} lacks or keeps inline; re-run export-onnx")
        return Target(key, loc, bool(entry.get("transposed", False)))


def read_names(root: Path) -> dict:
    path = root / NAMES_FILE
    if not path.is_file():
        raise InputError(f"{root}: no {NAMES_FILE}, so state-dict names cannot be mapped to ONNX initializers; "
                         "make the directory with `roselora-export export-onnx`")
    try:
        names = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(names, dict) or not isinstance(names.get("tensors"), dict):
        raise InputError(f"{path}: no 'tensors' map; re-run export-onnx")
    if not isinstance(names.get("format", NAMES_FORMAT), int):
        raise InputError(f"{path}: 'format' must be an integer; re-run export-onnx")
    if names.get("format", NAMES_FORMAT) > NAMES_FORMAT:
        raise InputError(f"{path}: names format {names['format']} is newer than this tool reads ({NAMES_FORMAT}); upgrade")
    return names


def load_graph(model_path: Path) -> onnx.ModelProto:
    """The ModelProto without its external weights; InputError if the file is not ONNX."""
    if not model_path.is_file():
        raise InputError(f"{model_path}: no such ONNX model file; re-run export-onnx")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as err:
        raise InputError(f"{model_path}: not an ONNX model ({type(err).__name__}); point at an export-onnx directory") from None
    if not model.graph.node:
        raise InputError(f"{model_path}: not an ONNX model (it parses to an empty graph); point at an export-onnx directory")
    return model


def external_locations(model: onnx.ModelProto, root: Path, *, check_files: bool = True) -> dict[str, Location]:
    """Initializer name -> Location for every externally stored initializer, checking each lies inside its file."""
    sizes: dict[str, int] = {}
    out: dict[str, Location] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        file = info.get("location", "")
        if not file or os.path.isabs(file) or ".." in Path(file).parts:
            raise InputError(f"{root}: initializer {t.name!r} points outside the directory ({file!r}); re-run export-onnx")
        offset, itemsize = int(info.get("offset", 0)), onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        length = int(info.get("length", int(np.prod(t.dims, dtype=np.int64)) * itemsize))
        if check_files:
            if file not in sizes:
                path = root / file
                if not path.is_file():
                    raise InputError(f"{path}: external data file missing; copy the whole ONNX directory or re-run export-onnx")
                sizes[file] = path.stat().st_size
            if offset + length > sizes[file]:
                raise InputError(f"{root / file}: external data truncated ({sizes[file]} bytes, initializer {t.name!r} "
                                 f"needs {offset + length}); copy the file again or re-run export-onnx")
        out[t.name] = Location(t.name, file, offset, length, tuple(int(d) for d in t.dims), ONNX_TO_TORCH.get(t.data_type))
    return out


def open_artifact(root: str | os.PathLike) -> OnnxArtifact:
    """Open and check an ONNX artifact directory (names.json, graph, external data bounds)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory; expected an export-onnx directory")
    names = read_names(root)
    model = load_graph(root / names.get("model_file", MODEL_FILE))
    return OnnxArtifact(root, names, model, external_locations(model, root))


def is_onnx_dir(path: str | os.PathLike) -> bool:
    """True when `path` looks like an ONNX artifact (names.json or a *.onnx file): what `apply` dispatches on."""
    p = Path(path)
    return p.is_dir() and ((p / NAMES_FILE).is_file() or any(p.glob("*.onnx")))


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return DTYPE_NAMES.get(dtype) if dtype is not None else None


def dtype_from_name(name: str) -> torch.dtype:
    return DTYPES_BY_NAME[name]
