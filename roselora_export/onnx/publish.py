"""The last steps of both export paths (in memory, export.py; streamed, export_large.py), written once.

    verify_initializers(root, names, expected)   every mapped initializer read back from the data file and
                                                 compared bit for bit with the weights it must hold
    publish(out, model_dir, names, write, check)  the artifact built in a temp directory beside `out`
                                                 (weights, names.json, side files), checked, renamed in
    names_document(...), export_report(...)       names.json's header and the export's report

Nothing appears at `out` unless every check passed.
"""
from __future__ import annotations

import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .names import DATA_FILE, MODEL_FILE, NAMES_FILE, NAMES_FORMAT, artifact_locations

# Files copied beside the graph so the artifact can be served on its own (no weights: those are in the graph).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
              "tokenizer.model", "added_tokens.json")
_ROWS = 1 << 22  # elements compared at a time: the check holds a few MB beyond the two mapped tensors


def verify_initializers(root: Path, names: dict, expected: Callable[[str], np.ndarray]) -> int:
    """Compare each key's initializer in root's data file with `expected(key)`: the key's flat bits in
    state-dict order (a numpy array, memory-mapped or not). RuntimeError on the first difference;
    returns how many keys were checked (tied keys too). Each tensor's pages are let go before the next one."""
    locs = artifact_locations(root, MODEL_FILE, inline=False)
    checked = 0
    for key, entry in names["tensors"].items():
        if entry.get("initializer") is None:
            continue
        # A tied key shares its canonical key's initializer (and storage): it holds the canonical's weights.
        loc, want = locs[entry["initializer"]], expected(entry.get("tied_to") or key)
        data = np.memmap(root / loc.file, dtype=want.dtype, mode="r", offset=loc.offset,
                         shape=(loc.length // want.dtype.itemsize,))
        got = data.reshape(loc.shape).T.reshape(-1) if entry.get("transposed") else data
        same = got.size == want.size and all(np.array_equal(got[i: i + _ROWS], want[i: i + _ROWS])
                                             for i in range(0, want.size, _ROWS))
        del data, got
        if not same:
            raise RuntimeError(f"export check failed: initializer {loc.initializer!r} differs from {key!r}")
        checked += 1
    return checked


def names_document(config, kv_cache: bool, *, task: str, opset: int, exporter: str, source: Path, dtype: str | None,
                   tensors: dict) -> dict:
    """names.json (format 1) of an export-onnx artifact of a model with this config."""
    from .trace import cache_geometry, graph_io

    inputs, outputs, _ = graph_io(config, kv_cache)
    return {"format": NAMES_FORMAT, "model_file": MODEL_FILE, "data_file": DATA_FILE, "task": task,
            "inputs": inputs, "outputs": outputs, "opset": opset, "kv_cache": cache_geometry(config) if kv_cache else None,
            "exporter": exporter, "source": str(source), "dtype": dtype, "tensors": tensors}


def publish(out: Path, model_dir: Path, names: dict, write_weights: Callable[[Path], None],
            verify: Callable[[Path], int], runtime_check: Callable[[Path], float | None] | None,
            progress: Callable[[str], None], phases: dict) -> tuple[int, float | None]:
    """Build the artifact in a temp directory beside `out` (core.atomic) and rename it in once every check passed.

    write_weights(tmp) writes model.onnx and its data; then names.json and the side files; then the
    onnx checker, verify(tmp) (the number of initializers checked) and runtime_check(tmp) (the max
    abs logit difference from PyTorch, or None when not run). Times go into `phases`; `progress` is
    told "write" and "check" as they finish. Returns (initializers verified, logit difference)."""
    import onnx

    from ..core.atomic import atomic_dir
    from .mapping import names_json_text

    t_write = time.perf_counter()
    with atomic_dir(out) as tmp:
        write_weights(tmp)
        (tmp / NAMES_FILE).write_text(names_json_text(names))
        for name in SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        onnx.checker.check_model(str(tmp / MODEL_FILE))  # by path: the checker then reads external data too
        verified = verify(tmp)
        phases["write_verify_s"] = time.perf_counter() - t_write
        progress("write")
        t_check = time.perf_counter()
        diff = runtime_check(tmp) if runtime_check else None
        phases["ort_check_s"] = time.perf_counter() - t_check
        progress("check")
    return verified, diff


def export_report(out: Path, names: dict, *, kv_cache: bool, initializers: int, verified: int, diff: float | None,
                  ran: bool, check_runtime: bool, t0: float, phases: dict, **extra) -> dict:
    """The report both export paths return (see export.export_onnx)."""
    tensors = names["tensors"]
    return {
        "out": str(out), "task": names["task"], "kv_cache": kv_cache, "dtype": names["dtype"], "opset": names["opset"],
        "initializers": initializers, "state_dict_keys": len(tensors), "verified_by_value": verified,
        "tied": sorted(k for k, e in tensors.items() if "tied_to" in e),
        "unmapped": sorted(k for k, e in tensors.items() if e["initializer"] is None),
        "data_bytes": (out / DATA_FILE).stat().st_size, "max_abs_logit_diff": diff, **extra,
        "runtime_check": "ran" if ran else ("off" if not check_runtime else "skipped: no bf16 kernels on onnxruntime CPU"),
        "total_s": round(time.perf_counter() - t0, 3), **{k: round(v, 3) for k, v in phases.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
