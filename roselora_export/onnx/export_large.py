"""export-onnx for models of any size: the graph traced without weights, the weights streamed file to file.

The in-memory export (export.py) serialises one protobuf holding every weight, which cannot pass
2 GB and holds the weights about three times over. Here:
- reference logits are taken from the real model first (for the runtime check at the end);
- each parameter is then replaced by a stride-0 view of one distinct scalar (so the TorchScript
  exporter's deduplication by value keeps them apart) and the real weights are freed;
- the graph is traced with export_params=False: every parameter is a graph input named by its
  state-dict key (tied weights are one parameter, so one input), and no weight enters the protobuf;
- each such input becomes an initializer whose bytes are copied in the kernel from the safetensors
  shard into the aligned external data file, one tensor at a time, and checked against it.
Peak memory is the larger of the loaded model and the onnxruntime session of the check, not their sum.
The artifact has the layout and names.json of export.py's (format 1), so apply/revert work unchanged.
"""
from __future__ import annotations

import gc
import io
import os
import resource
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from ..checkpoint.model_dir import open_model_dir
from ..checkpoint.safetensors_stream import copy_range
from ..errors import InputError
from ..models import load_model
from ..patch.model import DTYPE_NAMES
from .names import DATA_FILE, MODEL_FILE, NAMES_FILE, NAMES_FORMAT, ONNX_TYPE_OF, aligned_offset

_CHUNK = 16 << 20


def _weightless(model: torch.nn.Module) -> None:
    """Replace every parameter by an expanded distinct scalar (ties kept: one new parameter per old one)."""
    new: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                i = len(new)
                value = torch.tensor(2.0 ** (i // 128 - 40) * (1 + (i % 128) / 128), dtype=p.dtype)
                new[id(p)] = torch.nn.Parameter(value.expand(p.shape), requires_grad=False)
            module._parameters[name] = new[id(p)]


def _same_bytes(fd_a: int, pos_a: int, fd_b: int, pos_b: int, nbytes: int) -> bool:
    done = 0
    while done < nbytes:
        n = min(_CHUNK, nbytes - done)
        if os.pread(fd_a, n, pos_a + done) != os.pread(fd_b, n, pos_b + done):
            return False
        done += n
    return True


def export_streaming(model_dir: Path, out: Path, *, task: str, opset: int, kv_cache: bool, check_runtime: bool,
                     seed: int, dtype: torch.dtype, progress: Callable[[str], None]) -> dict:
    """export_onnx's work for a checked model_dir and empty out (see export.export_onnx for the contract)."""
    from .export import (
        _SIDE_FILES, _LogitsOnly, _WithCache, _cache_geometry, _empty_past, _example_inputs, _graph_io, _names_json,
        _rename_inputs, _runtime_check,
    )

    t0 = time.perf_counter()
    checkpoint = open_model_dir(model_dir, "--model")
    model = load_model(model_dir, task=task, dtype=dtype)
    phases = {"load_s": time.perf_counter() - t0}
    progress("load")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    model.config.use_cache = False
    config = model.config
    input_names, output_names, dynamic_axes = _graph_io(config, kv_cache)

    by_ptr: dict[tuple, str] = {}
    canonical: dict[str, str] = {}
    shapes: dict[str, tuple] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        canonical[key] = by_ptr.setdefault(ident, key)
        shapes[key] = (tuple(t.shape), t.dtype)
    params = {canonical.get(k, k) for k, _ in model.named_parameters()}
    missing = sorted(params - set(checkpoint.locations))
    if missing:
        raise InputError(f"--model {model_dir}: the model's parameter {missing[0]!r} is not stored under that name in "
                         "the checkpoint, so its bytes cannot be streamed; export with --no-stream (under 2 GB)")
    check_inputs = _example_inputs(config, 3, 5, seed + 1)
    wrapper = _LogitsOnly(model).eval()
    with torch.no_grad():
        expected = wrapper(*check_inputs)
    _weightless(model)  # the real weights are freed here: the graph is traced without them
    gc.collect()

    t_trace = time.perf_counter()
    traced = _WithCache(model).eval() if kv_cache else wrapper
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = _example_inputs(config, 2, 8, seed)
        past = _empty_past(config, 2, 3, dtype, torch.Generator().manual_seed(seed)) if kv_cache else []
        if kv_cache:
            mask = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
        torch.onnx.export(traced, (ids, mask, *past), buf, dynamo=False, do_constant_folding=False, export_params=False,
                          opset_version=opset, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes)
    del model, wrapper, traced, past
    gc.collect()
    graph = onnx.ModelProto()
    graph.ParseFromString(buf.getbuffer())
    del buf
    phases["trace_s"] = time.perf_counter() - t_trace
    progress("trace")

    # Parameter inputs -> initializers named by their state-dict keys, data copied from the checkpoint.
    t_map = time.perf_counter()
    real_inputs = set(input_names)
    params = [i for i in graph.graph.input if i.name not in real_inputs]
    renames, sources = {}, []
    offset = 0
    for inp in params:
        key = inp.name.split(".", 1)[1] if inp.name.startswith("m.") else inp.name
        if key not in checkpoint.locations:
            raise InputError(f"--model {model_dir}: the graph needs {key!r}, which the checkpoint does not store")
        header, info = checkpoint.locations[key]
        shape, tdtype = shapes[key]
        if tuple(info.shape) != shape or ONNX_TYPE_OF.get(DTYPE_NAMES.get(tdtype)) != inp.type.tensor_type.elem_type:
            raise RuntimeError(f"export: {key} is {info.dtype} {list(info.shape)} in the checkpoint but "
                               f"{tdtype} {list(shape)} in the model")
        offset = aligned_offset(offset, info.nbytes)
        init = onnx.TensorProto(name=key, data_type=inp.type.tensor_type.elem_type, dims=list(shape))
        for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(info.nbytes))):
            init.external_data.add(key=k, value=v)
        init.data_location = onnx.TensorProto.EXTERNAL
        graph.graph.initializer.append(init)
        renames[inp.name] = key
        sources.append((key, header.path, info.start, offset, info.nbytes))
        offset += info.nbytes
    keep = [i for i in graph.graph.input if i.name in real_inputs]
    del graph.graph.input[:]
    graph.graph.input.extend(keep)
    _rename_inputs(graph.graph, renames)
    graph_keys = set(renames.values())
    tensors = {}
    for key, (shape, tdtype) in shapes.items():
        canon = canonical[key]
        entry = {"shape": list(shape), "dtype": DTYPE_NAMES.get(tdtype, str(tdtype).removeprefix("torch.")),
                 "initializer": canon if canon in graph_keys else None, "transposed": False}
        if canon != key:
            entry["tied_to"] = canon
        if entry["initializer"] is None:
            entry["reason"] = "not a parameter of the graph (a buffer, or unused)"
        tensors[key] = entry
    names = {
        "format": NAMES_FORMAT, "model_file": MODEL_FILE, "data_file": DATA_FILE, "task": task,
        "inputs": input_names, "outputs": output_names, "opset": opset,
        "kv_cache": _cache_geometry(config) if kv_cache else None,
        "exporter": f"torch {torch.__version__} legacy, export_params=False, weights streamed",
        "source": str(model_dir), "dtype": DTYPE_NAMES.get(dtype), "tensors": tensors,
    }
    phases["map_s"] = time.perf_counter() - t_map
    progress("map")

    t_write = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fds: dict[Path, int] = {}
        data_fd = os.open(tmp / DATA_FILE, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for key, path, src, dst, nbytes in sources:
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                copy_range(fds[path], data_fd, src, dst, nbytes, key)
            os.ftruncate(data_fd, offset)
            os.fsync(data_fd)
            for key, path, src, dst, nbytes in sources:  # verified by value, from the written file
                if not _same_bytes(fds[path], src, data_fd, dst, nbytes):
                    raise RuntimeError(f"export check failed: initializer {key!r} differs from the checkpoint")
        finally:
            os.close(data_fd)
            for fd in fds.values():
                os.close(fd)
        onnx.save_model(graph, str(tmp / MODEL_FILE))
        del graph
        (tmp / NAMES_FILE).write_text(_names_json(names))
        for name in _SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        phases["write_verify_s"] = time.perf_counter() - t_write
        progress("write")
        t_check = time.perf_counter()
        ran = check_runtime and dtype != torch.bfloat16
        empty = _empty_past(config, check_inputs[0].shape[0], 0, dtype) if kv_cache else []
        diff = _runtime_check(tmp, check_inputs, expected, empty, input_names[2:]) if ran else None
        if diff is not None and dtype == torch.float32 and diff > 1e-3:
            raise RuntimeError(f"export check failed: onnxruntime logits differ from PyTorch by {diff:.3g}")
        phases["ort_check_s"] = time.perf_counter() - t_check
        progress("check")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": str(out), "task": task, "kv_cache": kv_cache, "dtype": DTYPE_NAMES.get(dtype), "opset": opset,
        "initializers": len(sources), "state_dict_keys": len(tensors), "verified_by_value": len(sources),
        "tied": sorted(k for k, e in tensors.items() if "tied_to" in e),
        "unmapped": sorted(k for k, e in tensors.items() if e["initializer"] is None),
        "data_bytes": (out / DATA_FILE).stat().st_size, "max_abs_logit_diff": diff, "streamed": True,
        "runtime_check": "ran" if ran else ("off" if not check_runtime else "skipped: no bf16 kernels on onnxruntime CPU"),
        "total_s": round(time.perf_counter() - t0, 3), **{k: round(v, 3) for k, v in phases.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
