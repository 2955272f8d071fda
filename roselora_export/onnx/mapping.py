"""Map a Hugging Face checkpoint's weights to where they live in any ONNX artifact, by exact bit equality.

    map_onnx(hf_dir, onnx_dir) -> (names, report)    names: a names.json format-2 dict (see names.py)
    write_names(onnx_dir, names)                      atomically, one line per key

A key's tensor W is looked for in every floating initializer (inline or external data) as W, W.T, or a
slice of a fused initializer (qkv, gate/up), in the checkpoint's dtype or cast to another. No pair of
tensors is compared unless sampled elements agree, and every hit is confirmed bit for bit. Keys whose
value one initializer holds for several are marked shared; a key found nowhere keeps a reason. How
and why: docs/design.md "ONNX artifacts of other exporters".
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core import dtypes
from ..core.atomic import atomic_write
from ..errors import InputError
from ..patch.merge_math import convert_bits
from .journal import recover
from .names import NAMES_FILE, NAMES_FORMAT_MAPPED, artifact_locations, dtype_name, load_graph

if TYPE_CHECKING:
    import onnx

_MAX_CANDIDATES = 4096  # a window key seen more often than this is low-entropy data (constants): not searched
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized", "DequantizeLinear", "QLinearMatMul", "MatMulInteger",
                 "DynamicQuantizeMatMul", "QMoE")


def model_file_of(onnx_dir: Path, model_file: str | None = None) -> str:
    """The graph file to map: given, genai_config.json's decoder, or the directory's only *.onnx."""
    if model_file:
        if not (onnx_dir / model_file).is_file():
            raise InputError(f"--onnx {onnx_dir}: no {model_file} there")
        return model_file
    cfg = onnx_dir / "genai_config.json"
    if cfg.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError, UnicodeDecodeError):
            name = json.loads(cfg.read_text())["model"]["decoder"]["filename"]
            if isinstance(name, str) and (onnx_dir / name).is_file():
                return name
    found = sorted(p.name for p in onnx_dir.glob("*.onnx"))
    if not found:
        raise InputError(f"--onnx {onnx_dir}: no *.onnx file there")
    if len(found) > 1:
        raise InputError(f"--onnx {onnx_dir}: several graphs ({', '.join(found[:4])}); pass --model-file NAME")
    return found[0]


def _exporter(onnx_dir: Path, model: onnx.ModelProto) -> str:
    if (onnx_dir / "genai_config.json").is_file():
        return "onnxruntime-genai model builder"
    if any(t.name.startswith("onnx::") for t in model.graph.initializer):
        return f"{model.producer_name or 'unknown'} {model.producer_version} (constant-folded)".strip()
    return f"{model.producer_name or 'unknown'} {model.producer_version}".strip()


class _Initializers:
    """The artifact's floating initializers as read-only numpy views of their bits (files memory-mapped)."""

    def __init__(self, root: Path, locations: dict):
        self.maps: dict[str, np.memmap] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, str] = {}
        for name, loc in locations.items():
            dtype = dtype_name(loc.dtype)
            if dtype not in dtypes.PATCHABLE or loc.length == 0:
                continue
            if loc.file not in self.maps:
                self.maps[loc.file] = np.memmap(root / loc.file, dtype=np.uint8, mode="r")
            raw = self.maps[loc.file][loc.offset: loc.offset + loc.length]
            self.arrays[name] = raw.view(dtypes.BITS[dtype]).reshape(loc.shape)
            self.dtypes[name] = dtype
        self.whole: dict[tuple, list[str]] = {}
        for name, a in self.arrays.items():
            self.whole.setdefault((self.dtypes[name], a.shape, _sample(a)), []).append(name)


def _sample(view: np.ndarray) -> bytes:
    """A cheap fingerprint of a tensor (strided or not): the bits of up to 64 elements spread over it.
    Equal tensors have equal samples; a hit is always confirmed by comparing every element."""
    n = view.size
    idx = np.unique(np.linspace(0, n - 1, min(n, 64)).astype(np.int64))
    return np.ascontiguousarray(view[np.unravel_index(idx, view.shape)]).tobytes()


def _codes(u: np.ndarray) -> np.ndarray:
    """uint64 code of the 8 bytes starting at every element of the 1-D bits array u (one code per start)."""
    per = 8 // u.itemsize
    if u.size < per:
        return np.zeros(0, np.uint64)
    b = np.ascontiguousarray(u).view(np.uint8)
    win = np.lib.stride_tricks.sliding_window_view(b, 8)[:: u.itemsize]
    return np.ascontiguousarray(win).view(np.uint64).reshape(-1)


def _code(v: np.ndarray) -> int | None:
    """The code of a probe vector's first 8 bytes (None if it is shorter)."""
    per = 8 // v.itemsize
    return int(np.ascontiguousarray(v[:per]).view(np.uint64)[0]) if v.size >= per else None


def find_slices(inits: _Initializers, needles: list[tuple[str, str, np.ndarray]]) -> dict[str, list[dict]]:
    """For each (key, dtype, w) needle, the places where w (1-D or 2-D bits) is a slice of an initializer,
    transposed or not. Every initializer is scanned once per dtype, by vectorised lookups of the codes of
    its first row's column windows and of its row starts among the needles' codes."""
    # (kind, dim, code) -> [(key, view, axis, transposed)]; kind col: window along the first row of an
    # initializer with `dim` rows; row: a row start of an initializer with `dim` columns; flat: 1-D.
    probes: dict[str, dict[tuple, list]] = {}
    for key, dtype, w in needles:
        table = probes.setdefault(dtype, {})

        def add(kind, dim, vec, view, axis, transposed):
            code = _code(vec)
            if code is not None:
                table.setdefault((kind, dim, code), []).append((key, view, axis, transposed))

        if w.ndim == 1:
            add("flat", 0, w, w, 0, False)
            continue
        o, i = w.shape
        add("col", i, w[:, 0], w.T, 1, True)    # W.T = I[:, c:c+o], I is [i, *]
        add("row", o, w[:, 0], w.T, 0, True)    # W.T = I[r:r+i, :], I is [*, o]
        add("row", i, w[0, :], w, 0, False)     # W = I[r:r+o, :], I is [*, i]
        add("col", o, w[0, :], w, 1, False)     # W = I[:, c:c+i], I is [o, *]
    out: dict[str, list[dict]] = {}
    for dtype, table in probes.items():
        wanted: dict[tuple, np.ndarray] = {}
        for kind, dim, code in table:
            wanted.setdefault((kind, dim), []).append(code)
        wanted = {k: np.asarray(v, dtype=np.uint64) for k, v in wanted.items()}
        for name, a in inits.arrays.items():
            if inits.dtypes[name] != dtype or a.ndim not in (1, 2):
                continue
            scans = ([("flat", 0, _codes(a))] if a.ndim == 1 else
                     [("col", a.shape[0], _codes(a[0])),
                      ("row", a.shape[1], np.ascontiguousarray(a[:, : 8 // a.itemsize]).view(np.uint64).reshape(-1)
                       if a.shape[1] >= 8 // a.itemsize else np.zeros(0, np.uint64))])
            for kind, dim, codes in scans:
                if (kind, dim) not in wanted or not codes.size:
                    continue
                hit = np.flatnonzero(np.isin(codes, wanted[(kind, dim)]))
                if hit.size > _MAX_CANDIDATES:
                    hit = hit[:0]  # low-entropy data (constants): left to whole-tensor matching
                for start in hit.tolist():
                    for key, view, axis, transposed in table.get((kind, dim, int(codes[start])), []):
                        axis = 0 if a.ndim == 1 else axis
                        size = view.shape[axis]
                        if start + size > a.shape[axis] or (a.ndim == 2 and a.shape[1 - axis] != view.shape[1 - axis]):
                            continue
                        part = a[start: start + size] if axis == 0 else a[:, start: start + size]
                        if np.array_equal(part, view):
                            out.setdefault(key, []).append(_place(name, a, transposed, axis, start, start + size))
    return out


def _place(name: str, a: np.ndarray, transposed: bool, axis: int, start: int, stop: int) -> dict:
    place = {"initializer": name, "transposed": transposed}
    if not (start == 0 and stop == a.shape[axis]):
        place["slice"] = [axis, start, stop]
    return place


def _region(place: dict) -> tuple:
    return (place["initializer"], tuple(place.get("slice") or ()), place["transposed"])


def _tokens(name: str) -> set[str]:
    return {t for t in re.split(r"[^0-9a-zA-Z]+", name.lower()) if t}


def _name_score(key: str, init: str) -> int:
    a, b = _tokens(key), _tokens(init)
    na, nb = {t for t in a if t.isdigit()}, {t for t in b if t.isdigit()}
    if na and nb and na != nb:
        return 0
    return len(a & b)


def _assign_by_name(keys: list[str], places: list[dict]) -> dict[str, list[dict]]:
    """Equal-valued keys and the places holding that value: each key takes the place whose name fits it best
    (a unique best, shared by no other key); keys left without one map nowhere."""
    out: dict[str, list[dict]] = {}
    for key in keys:
        scores = [_name_score(key, p["initializer"]) for p in places]
        best = max(scores, default=0)
        if best > 0 and scores.count(best) == 1:
            out[key] = [places[scores.index(best)]]
    taken: dict[tuple, list[str]] = {}
    for key, ps in out.items():
        taken.setdefault(_region(ps[0]), []).append(key)
    return {k: ps for k, ps in out.items() if len(taken[_region(ps[0])]) == 1}


def map_onnx(hf_dir: str | os.PathLike, onnx_dir: str | os.PathLike, *, model_file: str | None = None) -> tuple[dict, dict]:
    """Find every floating state-dict weight of the checkpoint at hf_dir in the ONNX artifact at onnx_dir.
    Returns (names.json format 2, report); InputError if no non-constant weight is found. Writes nothing."""
    from ..checkpoint.model_dir import open_model_dir

    t0 = time.perf_counter()
    onnx_dir = Path(onnx_dir)
    if not onnx_dir.is_dir():
        raise InputError(f"--onnx {onnx_dir}: not a directory")
    recover(onnx_dir)  # an interrupted in-place apply is rolled back before anything is read
    model = open_model_dir(hf_dir, "--base")
    mf = model_file_of(onnx_dir, model_file)
    graph = load_graph(onnx_dir / mf)
    locations = artifact_locations(onnx_dir, mf)  # external data bounds checked: truncated files refused
    quantized = sorted({n.op_type for n in graph.graph.node if n.op_type in QUANTIZED_OPS})
    inits = _Initializers(onnx_dir, locations)
    artifact_dtypes = set(inits.dtypes.values())

    tensors: dict[str, dict] = {}
    found: dict[str, list[dict]] = {}
    value_of: dict[str, tuple] = {}
    constant: set[str] = set()
    needles: dict[tuple, list] = {}  # (cast?, dtype) -> (key, dtype, bits) of keys not found whole
    stats = {"whole": 0, "transposed": 0, "slice": 0, "cast": 0}

    for key in model.keys():
        header, info = model.locations[key]
        entry = {"shape": list(info.shape), "dtype": info.dtype}
        tensors[key] = entry
        if info.dtype not in dtypes.PATCHABLE or not info.shape:
            entry["reason"] = "not a floating-point tensor" if info.dtype not in dtypes.PATCHABLE else "a scalar"
            continue
        bits = model.read_array(key).reshape(info.shape)
        value_of[key] = (info.dtype, tuple(info.shape), _sample(bits))
        if bits.size and (bits == bits.reshape(-1)[0]).all():
            constant.add(key)
        places: list[dict] = []
        for dtype in [info.dtype] + sorted(artifact_dtypes - {info.dtype}):
            w = convert_bits(bits, info.dtype, dtype).reshape(bits.shape)
            for view, transposed in [(w, False)] + ([(w.T, True)] if w.ndim == 2 else []):
                for name in inits.whole.get((dtype, view.shape, _sample(view)), []):
                    if np.array_equal(inits.arrays[name], view):
                        places.append({"initializer": name, "transposed": transposed})
            if places:
                stats["cast"] += dtype != info.dtype
                break
        found[key] = list({_region(p): p for p in places}.values())
        if not places and bits.ndim <= 2:
            for dtype in [info.dtype] + sorted(artifact_dtypes - {info.dtype}):
                w = convert_bits(bits, info.dtype, dtype).reshape(bits.shape)
                needles.setdefault((dtype != info.dtype, dtype), []).append((key, dtype, w))
    # Not found whole: slices of fused initializers, in the checkpoint's dtype first, then cast.
    for (_, dtype), items in sorted(needles.items()):
        items = [(k, d, w) for k, d, w in items if not found[k]]
        for key, places in find_slices(inits, items).items():
            found[key] = list({_region(p): p for p in places}.values())
            stats["cast"] += dtype != tensors[key]["dtype"]
    del needles

    # Equal-valued keys: one value, several weights; decide which place is whose.
    by_sample: dict[tuple, list[str]] = {}
    for key, v in value_of.items():
        by_sample.setdefault(v, []).append(key)
    for v, keys in by_sample.items():  # equal samples: a class index per set of truly equal bits
        if len(keys) == 1:
            continue
        firsts: list[str] = []  # each class's first key
        for key in keys:
            bits = model.read_array(key)
            i = next((i for i, f in enumerate(firsts) if np.array_equal(model.read_array(f), bits)), len(firsts))
            if i == len(firsts):
                firsts.append(key)
            value_of[key] = (*v, i)
    groups: dict[tuple, list[str]] = {}
    for key, v in value_of.items():
        groups.setdefault(v, []).append(key)
    tied = model.tied_aliases()
    if model.config.get("tie_word_embeddings") and "lm_head.weight" in found:
        emb = [k for k in found if k.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))]
        if len(emb) == 1 and value_of.get(emb[0]) == value_of.get("lm_head.weight"):
            tied["lm_head.weight"] = emb[0]
            groups[value_of["lm_head.weight"]].remove("lm_head.weight")
    for keys in groups.values():
        places = found[keys[0]] if keys else []
        if not places:
            continue
        if len(keys) == 1 and (keys[0] not in constant or len(places) == 1):
            continue  # one weight with this value: every place holding it is a copy of it
        if len(places) == 1:  # the exporter stored one initializer for all of them
            for key in keys:  # (several keys: one key with one place continued above)
                tensors[key]["shared_with"] = [k for k in keys if k != key]
            continue
        assigned = _assign_by_name(keys, places)
        for key in keys:
            found[key] = assigned.get(key, [])
            if key not in assigned:
                tensors[key]["reason"] = (f"ambiguous: {len(keys)} weights of the checkpoint and {len(places)} "
                                          "initializers hold these same values, and the names do not tell which is which")

    reason = ("quantized by the exporter (" + ", ".join(quantized) + "): no exact copy of it in the artifact"
              if quantized else "not found by value: the exporter folded it into another tensor, or the graph does not use it")
    mapped = 0
    for key, entry in tensors.items():
        places = found.get(key, [])
        if places:
            entry["at"] = places
            stored = inits.dtypes[places[0]["initializer"]]
            if stored != entry["dtype"]:
                entry["stored_dtype"] = stored
            mapped += 1
            for p in places:
                stats["slice" if p.get("slice") else "transposed" if p["transposed"] else "whole"] += 1
        elif "reason" not in entry:
            entry["reason"] = reason
    for alias, canon in tied.items():
        tensors[alias] = {**{k: v for k, v in tensors[canon].items() if k != "shared_with"}, "tied_to": canon}

    informative = [k for k in found if found[k] and k not in constant]
    if not informative:
        if quantized:
            raise InputError(f"--onnx {onnx_dir}: none of the weights of {hf_dir} is stored exactly in the artifact: it "
                             f"quantizes them ({', '.join(quantized)}, e.g. int4), which cannot be patched exactly; "
                             "build the artifact in fp32 or fp16")
        raise InputError(f"--onnx {onnx_dir}: none of the {len(value_of)} weights of {hf_dir} is in the artifact by value "
                         "(as is, transposed, sliced or cast); was it exported from another model?")
    names = {
        "format": NAMES_FORMAT_MAPPED, "model_file": mf, "exporter": _exporter(onnx_dir, graph),
        "mapped_from": str(hf_dir), "quantized_ops": quantized, "tensors": tensors,
    }
    unmapped = sorted(k for k, e in tensors.items() if not e.get("at") or e.get("shared_with"))
    report = {
        "onnx": str(onnx_dir), "model_file": mf, "exporter": names["exporter"], "keys": len(tensors),
        "mapped": mapped + len(tied), "places": stats, "tied": sorted(tied), "unmapped": unmapped,
        "reasons": {k: tensors[k].get("reason", "shared") for k in unmapped},
        "initializers": len(inits.arrays), "seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return names, report


def names_json_text(names: dict) -> str:
    """names.json with one line per state-dict key: readable and diffable."""
    head = json.dumps({k: v for k, v in names.items() if k != "tensors"}, indent=1)[:-2]
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in names["tensors"].items())
    return f"{head},\n \"tensors\": {{\n{body}\n }}\n}}\n"


def write_names(onnx_dir: str | os.PathLike, names: dict) -> Path:
    """Write names.json into onnx_dir atomically (core.atomic: an owner-locked temp file renamed over it,
    which recovery removes if the writer is killed before the rename)."""
    return atomic_write(Path(onnx_dir) / NAMES_FILE, names_json_text(names).encode())


__all__ = ["map_onnx", "write_names", "model_file_of", "names_json_text", "QUANTIZED_OPS"]


def apply_mapped(base: Path, patches: list, out: Path | None, *, base_model: str | os.PathLike | None,
                 revert: bool = False, in_place: bool = False) -> dict:
    """`apply` on an ONNX artifact, mapping it first from base_model when it has no names.json: in place,
    into base/names.json before patching (once the patch resolves); with out, into out/names.json after."""
    from .patching import apply_to_onnx_dir

    names = None
    if base_model is not None and not (Path(base) / NAMES_FILE).is_file():
        names, _ = map_onnx(base_model, base)
        if in_place:
            from .names import open_artifact

            open_artifact(base, names).resolve(tp for p in patches for tp in p.tensors.values())
            write_names(base, names)
            names = None
    report = apply_to_onnx_dir(base, patches, out, revert=revert, in_place=in_place, names=names)
    if names is not None and out is not None:
        write_names(out, names)
        report["mapped"] = True
    return report
