"""The ONNX artifact directory: its files, `names.json`, and where each weight's bytes live.

An artifact directory written by `export_onnx` holds

    model.onnx        the graph; every initializer's data is external
    model.onnx.data   the weights, each tensor starting at an aligned offset (mmap-friendly)
    names.json        state-dict key -> initializer (and whether it is stored transposed)

plus the model's config and tokenizer files. Patches name state-dict keys; this module turns a key
into (initializer, offset, length, layout) and checks the directory is whole (InputError with a one-line
fix otherwise). names.json format 2 (map-onnx's) lists every place of a key under "at": an initializer,
as is or transposed, whole or a slice [axis, start, stop], inline or in external data; format 1
(export-onnx's: one initializer and a transposed flag per key) is read too.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.dtypes import PATCHABLE, SHORT_NAMES, dtype_name as _dtype_name
from ..errors import InputError

if TYPE_CHECKING:
    import onnx

NAMES_FILE = "names.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
NAMES_FORMAT = 1  # what export-onnx writes
NAMES_FORMAT_MAPPED = 2  # what map-onnx writes (layouts with slices, copies, stored dtypes)

# Alignment of tensor starts in the data file, as onnx-ir does it: tensors of 1 MiB and more start
# on a 64 KiB boundary (the largest mmap allocation granularity in use, Windows'), smaller ones
# on a 4 KiB page. The padding costs well under 1% of a real model.
ALIGN_LARGE, ALIGN_SMALL, LARGE_TENSOR = 65536, 4096, 1 << 20

# TensorProto.DataType numbers of the floating types a patch can carry, by their safetensors names
# (the onnx package is not imported for them: its import alone costs about a second).
ONNX_DTYPES: dict[int, str] = {1: "F32", 10: "F16", 16: "BF16"}
ONNX_TYPE_OF: dict[str, int] = {v: k for k, v in ONNX_DTYPES.items()}
# Bytes per element of every TensorProto.DataType with a fixed width (4-bit types: see _nbytes).
_ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
                  17: 1, 18: 1, 19: 1, 20: 1}
_ONNX_HALF_BYTE = (21, 22, 23)  # uint4, int4, float4e2m1: two elements per byte


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
    dtype: str | None  # "F32", "F16", "BF16"; None for dtypes a patch cannot carry (int64 buffers, ...)


@dataclass(frozen=True)
class Target:
    """Where a state-dict key lives in the artifact: `view.T` if transposed else `view`, where view is the whole
    initializer or, with a region (axis, start, stop), its slice start:stop along axis (2-D; 1-D: elements)."""

    key: str
    location: Location
    transposed: bool
    region: tuple[int, int, int] | None = None

    @property
    def view_shape(self) -> tuple[int, ...]:
        shape = self.location.shape
        if self.region is None:
            return shape
        axis, start, stop = self.region
        return tuple(stop - start if i == axis else d for i, d in enumerate(shape))

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.view_shape)) if self.transposed else self.view_shape

    def storage_positions(self, flat_index: np.ndarray) -> np.ndarray:
        """Flat state-dict indices -> flat element indices in the whole initializer."""
        flat_index = np.asarray(flat_index, dtype=np.int64)
        if len(self.location.shape) == 1:
            return flat_index + (self.region[1] if self.region else 0)
        if len(self.location.shape) != 2:
            return flat_index
        rows, cols = self.view_shape
        if self.transposed:  # state[i, j] = view[j, i]; the state has `rows` columns
            vi, vj = flat_index % rows, flat_index // rows
        else:
            vi, vj = flat_index // cols, flat_index % cols
        if self.region is not None:  # (axis, start, stop): shift along the sliced axis
            vi, vj = (vi + self.region[1], vj) if self.region[0] == 0 else (vi, vj + self.region[1])
        return vi * self.location.shape[1] + vj

    def covers(self, positions: np.ndarray) -> bool:
        """Whether any of the flat element indices of the whole initializer lies in this key's region."""
        if positions.size == 0:
            return False
        if self.region is None:
            return True
        axis, start, stop = self.region
        if len(self.location.shape) == 1:
            at = positions
        else:
            width = self.location.shape[1]
            at = positions // width if axis == 0 else positions % width
        return bool(np.any((at >= start) & (at < stop)))

    def state_order(self, bits: np.ndarray) -> np.ndarray:
        """The key's tensor, flat in state-dict order, from the whole initializer's flat bits."""
        view = bits.reshape(self.location.shape)
        if self.region is not None:
            axis, start, stop = self.region
            view = view[start:stop] if axis == 0 or view.ndim == 1 else view[:, start:stop]
        if self.transposed:
            view = view.T
        return np.ascontiguousarray(view).reshape(-1)


def entry_places(entry: dict) -> list[dict]:
    """The places a names.json entry lists: format 2's "at", or format 1's single initializer."""
    if "at" in entry:
        return list(entry["at"] or [])
    if entry.get("initializer") is None:
        return []
    return [{"initializer": entry["initializer"], "transposed": bool(entry.get("transposed", False))}]


@dataclass
class OnnxArtifact:
    """An artifact directory, opened and checked: names.json read, initializers located (wire.py)."""

    root: Path
    names: dict
    locations: dict[str, Location]

    @property
    def model_path(self) -> Path:
        return self.root / self.names.get("model_file", MODEL_FILE)

    def target(self, key: str) -> Target:
        """The (first) place holding state-dict key `key`; InputError if the ONNX model lacks it."""
        return self.targets(key)[0]

    def unpatchable(self, key: str) -> str | None:
        """Why `key` cannot be patched in this artifact, or None if it can."""
        entry = self.names["tensors"].get(key)
        if not isinstance(entry, dict):
            return "the ONNX model lacks it (no such state-dict key); was the patch built for another model?"
        if entry.get("shared_with"):
            return (f"one initializer holds it and {', '.join(entry['shared_with'][:3])} (equal values, deduplicated "
                    "by the exporter), so patching it would change them too")
        if not entry_places(entry):
            return "the ONNX model lacks it (" + entry.get("reason", "not in the graph") + ")"
        return None

    def targets(self, key: str) -> list[Target]:
        """Every place holding `key` (an exporter may keep copies, e.g. W for Gather and W.T for MatMul)."""
        why = self.unpatchable(key)
        if why:
            raise InputError(f"the patch names tensor {key!r}, which cannot be patched in the ONNX model in "
                             f"{self.root}: {why}")
        out = []
        for place in entry_places(self.names["tensors"][key]):
            loc = self.locations.get(place.get("initializer"))
            if loc is None:
                raise InputError(f"{self.root / NAMES_FILE}: {key!r} maps to initializer {place.get('initializer')!r}, "
                                 f"which {self.model_path.name} lacks; re-run map-onnx (or export-onnx)")
            region = tuple(int(v) for v in place["slice"]) if place.get("slice") else None
            out.append(Target(key, loc, bool(place.get("transposed", False)), region))
        return out

    def resolve(self, tensor_patches) -> list[tuple[object, Target]]:
        """(tensor patch, target) for every place every tensor patch lands on, or InputError naming every
        tensor that cannot be patched exactly (a patch is refused whole, never half-applied)."""
        tensor_patches = list(tensor_patches)
        out, refused = [], []
        for tp in tensor_patches:
            why = self.unpatchable(tp.name)
            if why:
                refused.append((tp.name, why))
                continue
            for target in self.targets(tp.name):
                why = self._dtype_refusal(tp, target)
                if why:
                    refused.append((tp.name, why))
                    break
                out.append((tp, target))
        if len(refused) == 1 and len(tensor_patches) == 1:
            key, why = refused[0]
            raise InputError(f"{self.root}: the patch names tensor {key!r}, which cannot be patched exactly here: {why}")
        if refused:
            names = "; ".join(f"{k}: {why}" for k, why in refused[:4])
            more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
            raise InputError(f"{self.root}: refusing the whole patch, {len(refused)} of {len(tensor_patches)} tensors "
                             f"cannot be patched exactly here: {names}{more}")
        return out

    def _dtype_refusal(self, tp, target: Target) -> str | None:
        stored = target.location.dtype
        if stored is None or stored == tp.dtype_name:
            return None
        entry = self.names["tensors"].get(tp.name) or {}
        have, want = stored, tp.dtype_name
        if entry.get("dtype") and entry["dtype"] != have:
            return (f"the artifact stores it as {have}, cast from the checkpoint's {entry['dtype']}, and a {want} "
                    f"patch cannot be applied exactly to {have} values; make the patch in {have} "
                    f"(merge --dtype {SHORT_NAMES.get(have, have)}, or diff against a {have} checkpoint)")
        return f"the artifact stores it as {have} but the patch is {want}"


def read_names(root: Path) -> dict:
    path = root / NAMES_FILE
    if not path.is_file():
        raise InputError(f"{root}: no {NAMES_FILE}, so state-dict names cannot be mapped to ONNX initializers; run "
                         f"`roselora-export map-onnx --base HF_DIR --onnx {root}` (or pass --base-model HF_DIR), "
                         "or make the directory with `roselora-export export-onnx`")
    try:
        names = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(names, dict) or not isinstance(names.get("tensors"), dict):
        raise InputError(f"{path}: no 'tensors' map; re-run export-onnx")
    if not isinstance(names.get("format", NAMES_FORMAT), int):
        raise InputError(f"{path}: 'format' must be an integer; re-run export-onnx")
    if names.get("format", NAMES_FORMAT) > NAMES_FORMAT_MAPPED:
        raise InputError(f"{path}: names format {names['format']} is newer than this tool reads "
                         f"({NAMES_FORMAT_MAPPED}); upgrade")
    return names


def load_graph(model_path: Path) -> onnx.ModelProto:
    """The ModelProto without its external weights (imports onnx); InputError if the file is not ONNX."""
    import onnx
    from google.protobuf.message import DecodeError

    if not model_path.is_file():
        raise InputError(f"{model_path}: no such ONNX model file; re-run export-onnx")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as err:
        raise InputError(f"{model_path}: not an ONNX model ({type(err).__name__}); point at an export-onnx directory") from None
    if not model.graph.node:
        raise InputError(f"{model_path}: not an ONNX model (it parses to an empty graph); point at an export-onnx directory")
    return model


def read_graph(model_path: Path):
    """The graph's initializers as wire.read_initializers reads them (no onnx import); InputError if not ONNX."""
    from .wire import WireError, read_initializers

    if not model_path.is_file():
        raise InputError(f"{model_path}: no such ONNX model file; re-run export-onnx")
    try:
        graph = read_initializers(model_path)
    except WireError as err:
        raise InputError(f"{model_path}: not an ONNX model ({err}); point at an export-onnx directory") from None
    if not graph.nodes:
        raise InputError(f"{model_path}: not an ONNX model (it parses to an empty graph); point at an export-onnx directory")
    return graph


def _nbytes(data_type: int, dims: list[int]) -> int | None:
    numel = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if data_type in _ONNX_HALF_BYTE:
        return (numel + 1) // 2
    size = _ONNX_ITEMSIZE.get(data_type)
    return None if size is None else numel * size


def artifact_locations(root: Path, model_file: str, *, inline: bool = True, graph=None) -> dict[str, Location]:
    """Initializer name -> Location of every initializer stored in external data (each checked to lie inside
    its file) and, with inline, of every floating one stored contiguously in the .onnx file itself."""
    graph = graph or read_graph(root / model_file)
    sizes: dict[str, int] = {}
    out: dict[str, Location] = {}
    for t in graph.initializers:
        shape = tuple(int(d) for d in t.dims)
        if t.external is None:
            if not inline or t.inline is None or ONNX_DTYPES.get(t.data_type) is None:
                continue  # values in int32_data varints etc.: not a contiguous run, so not patchable in place
            offset, length = t.inline
            if length != _nbytes(t.data_type, t.dims):
                continue
            out[t.name] = Location(t.name, model_file, offset, length, shape, ONNX_DTYPES.get(t.data_type))
            continue
        file = t.external.get("location", "")
        if not file or os.path.isabs(file) or ".." in Path(file).parts:
            raise InputError(f"{root}: initializer {t.name!r} points outside the directory ({file!r}); re-run export-onnx")
        try:
            offset = int(t.external.get("offset", 0))
            length = int(t.external["length"]) if "length" in t.external else _nbytes(t.data_type, t.dims)
        except ValueError:
            raise InputError(f"{root / model_file}: initializer {t.name!r} has a malformed external data "
                             "offset or length; re-run export-onnx") from None
        if length is None:
            continue  # a type of no fixed width (strings): never patched, so its bounds do not matter here
        if file not in sizes:
            path = root / file
            if not path.is_file():
                raise InputError(f"{path}: external data file missing; copy the whole ONNX directory or re-run export-onnx")
            sizes[file] = path.stat().st_size
        if offset < 0 or offset + length > sizes[file]:
            raise InputError(f"{root / file}: external data truncated ({sizes[file]} bytes, initializer {t.name!r} "
                             f"needs {offset + length}); copy the file again or re-run export-onnx")
        out[t.name] = Location(t.name, file, offset, length, shape, ONNX_DTYPES.get(t.data_type))
    return out


def open_artifact(root: str | os.PathLike, names: dict | None = None) -> OnnxArtifact:
    """Open and check an ONNX artifact directory (names.json, or `names` given, graph, external data bounds),
    importing neither torch nor onnx (wire.py reads the graph)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory; expected an ONNX artifact directory")
    names = read_names(root) if names is None else names
    model_file = names.get("model_file", MODEL_FILE)
    inline = names.get("format", NAMES_FORMAT) >= NAMES_FORMAT_MAPPED  # export-onnx keeps every weight external
    return OnnxArtifact(root, names, artifact_locations(root, model_file, inline=inline))


def is_onnx_dir(path: str | os.PathLike) -> bool:
    """True when `path` looks like an ONNX artifact (names.json or a *.onnx file): what `apply` dispatches on."""
    p = Path(path)
    return p.is_dir() and ((p / NAMES_FILE).is_file() or any(p.glob("*.onnx")))


def dtype_name(dtype) -> str | None:
    """The safetensors name of a Location's dtype (already one) or of a torch dtype; None if not patchable."""
    name = _dtype_name(dtype) if dtype is not None else None
    return name if name in PATCHABLE else None
