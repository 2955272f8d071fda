"""export-onnx for models of any size: the graph traced without weights, the weights streamed file to file.

The in-memory export (export.py) holds the weights about three times over and cannot pass protobuf's
2 GB. Here reference logits are taken from the real model first; each parameter is then replaced by a
stride-0 view of one distinct scalar (the exporter deduplicates by value) and the weights are freed; the
graph is traced with export_params=False (every parameter a graph input named by its state-dict key);
each such input becomes an initializer whose bytes are copied in the kernel from the shard into the
aligned data file, then checked (publish.py). Peak memory: the larger of the model and the check's
session. The artifact has export.py's layout and names.json (format 1).
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from ..checkpoint.model_dir import open_model_dir
from ..checkpoint.safetensors_stream import copy_range
from ..core.atomic import opened
from ..errors import InputError
from ..patch.model import DTYPE_NAMES
from .names import DATA_FILE, MODEL_FILE, ONNX_TYPE_OF, aligned_offset
from .publish import export_report, names_document, publish, verify_initializers
from .trace import (
    PREFIX, graph_io, load_for_export, reference_logits, rename_inputs, runtime_checker, tied_canonical, trace,
)


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


def export_streaming(model_dir: Path, out: Path, *, task: str, opset: int, kv_cache: bool, check_runtime: bool,
                     seed: int, dtype: torch.dtype, progress: Callable[[str], None]) -> dict:
    """export_onnx's work for a checked model_dir and empty out (see export.export_onnx for the contract)."""
    t0 = time.perf_counter()
    checkpoint = open_model_dir(model_dir, "--model")
    model = load_for_export(model_dir, task, dtype)
    phases = {"load_s": time.perf_counter() - t0}
    progress("load")
    config = model.config
    canonical = tied_canonical(model)
    shapes = {key: (tuple(t.shape), t.dtype) for key, t in model.state_dict().items()}
    params = {canonical.get(k, k) for k, _ in model.named_parameters()}
    missing = sorted(params - set(checkpoint.locations))
    if missing:
        raise InputError(f"--model {model_dir}: the model's parameter {missing[0]!r} is not stored under that name in "
                         "the checkpoint, so its bytes cannot be streamed; export with --no-stream (under 2 GB)")
    check_inputs, expected = reference_logits(model, seed)
    _weightless(model)  # the real weights are freed here: the graph is traced without them
    gc.collect()

    t_trace = time.perf_counter()
    graph = trace(model, kv_cache, opset, seed, dtype, torch.Generator().manual_seed(seed), export_params=False)
    del model
    gc.collect()
    phases["trace_s"] = time.perf_counter() - t_trace
    progress("trace")

    t_map = time.perf_counter()
    sources, data_bytes = _inputs_to_initializers(graph, checkpoint, shapes, model_dir, set(graph_io(config, kv_cache)[0]))
    graph_keys = {key for key, *_ in sources}
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
    names = names_document(config, kv_cache, task=task, opset=opset, source=model_dir, dtype=DTYPE_NAMES.get(dtype),
                           exporter=f"torch {torch.__version__} legacy, export_params=False, weights streamed",
                           tensors=tensors)
    phases["map_s"] = time.perf_counter() - t_map
    progress("map")

    def write(tmp: Path) -> None:
        nonlocal graph
        _copy_weights(tmp / DATA_FILE, sources, data_bytes)
        onnx.save_model(graph, str(tmp / MODEL_FILE))
        graph = None

    ran = check_runtime and dtype != torch.bfloat16
    verified, diff = publish(out, model_dir, names, write,
                             lambda tmp: verify_initializers(tmp, names, checkpoint.read_array),
                             runtime_checker(config, kv_cache, dtype, check_inputs, expected) if ran else None,
                             progress, phases)
    return export_report(out, names, kv_cache=kv_cache, initializers=len(sources), verified=verified, diff=diff,
                         ran=ran, check_runtime=check_runtime, t0=t0, phases=phases, streamed=True)


def _inputs_to_initializers(graph: onnx.ModelProto, checkpoint, shapes: dict, model_dir: Path, real_inputs: set[str]
                            ) -> tuple[list[tuple], int]:
    """Parameter inputs -> external initializers named by their state-dict keys, at aligned offsets of the data
    file. Returns (key, shard path, start in the shard, offset in the data file, bytes) per initializer, and
    the data file's size."""
    params = [i for i in graph.graph.input if i.name not in real_inputs]
    renames, sources = {}, []
    offset = 0
    for inp in params:
        key = inp.name.removeprefix(f"{PREFIX}.")
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
    rename_inputs(graph.graph, renames)
    return sources, offset


def _copy_weights(data_path: Path, sources: list[tuple], size: int) -> None:
    """Each initializer's bytes copied in the kernel from its shard into the data file, which is then fsynced."""
    fds: dict[Path, int] = {}
    with opened(data_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) as data_fd, contextlib.ExitStack() as shards:
        for key, path, src, dst, nbytes in sources:
            if path not in fds:
                fds[path] = shards.enter_context(opened(path, os.O_RDONLY))
            copy_range(fds[path], data_fd, src, dst, nbytes, key)
        os.ftruncate(data_fd, size)
        os.fsync(data_fd)
