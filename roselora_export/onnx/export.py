"""Export a Hugging Face model to an ONNX artifact directory whose initializers are the state dict.

The legacy TorchScript exporter with do_constant_folding=False keeps every weight as its own initializer,
but deduplicates them by *value*: so every distinct parameter is traced filled with unique random tags,
each tag is found again in the graph (as is, or transposed), renamed to its state-dict key, and only then
are the real weights written. Tied weights are one initializer listed under both keys in names.json.
The map is verified by value, from the written files.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from onnx import external_data_helper

from ..models import check_model_dir
from ..patch.model import BITS_DTYPE, DTYPE_NAMES, tensor_bits
from .export_large import export_streaming
from .names import DATA_FILE, MODEL_FILE, ONNX_DTYPES, ONNX_TYPE_OF, aligned_offset
from .publish import export_report, names_document, publish, verify_initializers
from .trace import (
    check_export_args, load_for_export, reference_logits, rename_inputs, runtime_checker, storage_key, tied_canonical,
    trace,
)

EXPORT_PHASES = ("load", "trace", "map", "write", "check")


def _fingerprints(t: torch.Tensor) -> list[tuple[str, bool]]:
    """sha256 of the tensor's bits as stored and, for a matrix, transposed: how it is found in the graph."""
    views = [(t, False)] + ([(t.T, True)] if t.dim() == 2 else [])
    return [(hashlib.sha256(tensor_bits(v).tobytes()).hexdigest(), tr) for v, tr in views]


def _write_artifact(model: onnx.ModelProto, out: Path) -> None:
    """Save `model` with every initializer in one external data file, each start aligned (see names.py)."""
    offset = 0
    for t in model.graph.initializer:
        if t.HasField("raw_data"):
            offset = aligned_offset(offset, len(t.raw_data))
            external_data_helper.set_external_data(t, DATA_FILE, offset=offset, length=len(t.raw_data))
            offset += len(t.raw_data)
    (out / DATA_FILE).touch()
    # onnx writes each tensor at the end of the file, padded up to the offset set above.
    external_data_helper.write_external_data_tensors(model, str(out))
    onnx.save_model(model, str(out / MODEL_FILE))


# Checkpoints this large are exported by export_large (graph without weights, weights streamed file to
# file): the in-memory path holds the weights about three times over and stops at protobuf's 2 GB.
STREAM_ABOVE_BYTES = 1 << 30


def export_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, task: str = "auto", opset: int = 17,
                kv_cache: bool = False, check_runtime: bool = True, seed: int = 0,
                progress: Callable[[str], None] | None = None, stream: bool | None = None) -> dict:
    """Export a local HF model to `out_dir` (model.onnx + aligned model.onnx.data + names.json); returns a report.

    Inputs input_ids and attention_mask (int64, dynamic batch and sequence), output logits; kv_cache adds
    past_key_values.{i}.key/value in and present.{i}.key/value out. Nothing is written at `out_dir` unless
    the export and its checks succeed. `progress(phase)` after each of EXPORT_PHASES. `stream` (default:
    checkpoints of STREAM_ABOVE_BYTES or more) goes through export_large: any size, memory about the model's."""
    done = progress or (lambda phase: None)
    t0 = time.perf_counter()
    model_dir, out = check_model_dir(model_dir), Path(out_dir)
    task, dtype = check_export_args(model_dir, out, task, kv_cache)
    if stream is None:
        stream = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) >= STREAM_ABOVE_BYTES
    if stream:
        return export_streaming(model_dir, out, task=task, opset=opset, kv_cache=kv_cache, check_runtime=check_runtime,
                                seed=seed, dtype=dtype, progress=done)
    model = load_for_export(model_dir, task, dtype)
    phases = {"load_s": time.perf_counter() - t0}
    done("load")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    canonical = tied_canonical(model)
    check_inputs, expected = reference_logits(model, seed)
    config = model.config
    t_trace = time.perf_counter()
    onnx_model, tags = _trace_with_tags(model, canonical, kv_cache, opset, seed, dtype)
    del model  # it holds tags, not weights, and is not needed again
    phases["trace_s"] = time.perf_counter() - t_trace
    done("trace")
    t_map = time.perf_counter()
    tensors, found = _put_weights_by_tag(onnx_model, state, canonical, tags)
    names = names_document(config, kv_cache, task=task, opset=opset, source=model_dir, dtype=DTYPE_NAMES.get(dtype),
                           exporter=f"torch {torch.__version__} legacy, do_constant_folding=False", tensors=tensors)
    phases["map_s"] = time.perf_counter() - t_map
    done("map")

    def write(tmp: Path) -> None:
        nonlocal onnx_model
        _write_artifact(onnx_model, tmp)
        onnx_model = None  # the protobuf holds every weight: free it before the checks

    ran = check_runtime and dtype != torch.bfloat16
    verified, diff = publish(out, model_dir, names, write,
                             lambda tmp: verify_initializers(tmp, names, lambda key: tensor_bits(state[key])),
                             runtime_checker(config, kv_cache, dtype, check_inputs, expected) if ran else None,
                             done, phases)
    return export_report(out, names, kv_cache=kv_cache, initializers=len(found), verified=verified, diff=diff, ran=ran,
                         check_runtime=check_runtime, t0=t0, phases=phases)


def _trace_with_tags(model: torch.nn.Module, canonical: dict[str, str], kv_cache: bool, opset: int, seed: int,
                     dtype: torch.dtype) -> tuple[onnx.ModelProto, dict[str, list[tuple[str, bool]]]]:
    """The traced graph, with every distinct parameter filled beforehand with unique random tags (the exporter
    deduplicates initializers by value), and each key's tag fingerprints, as is and transposed."""
    params = dict(model.named_parameters())  # deduplicated: one entry per storage
    by_ptr = {storage_key(t): canonical[key] for key, t in model.state_dict().items()}
    tags: dict[str, list[tuple[str, bool]]] = {}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params.items():
            if p.dtype in BITS_DTYPE:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
                tags[by_ptr.get(storage_key(p), name)] = _fingerprints(p.detach())
    del params
    return trace(model, kv_cache, opset, seed, dtype, gen), tags


def _put_weights_by_tag(onnx_model: onnx.ModelProto, state: dict[str, torch.Tensor], canonical: dict[str, str],
                        tags: dict[str, list[tuple[str, bool]]]) -> tuple[dict[str, dict], dict]:
    """Find each key's tag among the initializers (as stored, or transposed), rename the initializer to the key
    and put the real weights in place of the tag. Returns names.json's tensors and the initializers found."""
    by_hash: dict[tuple[int, str], list[onnx.TensorProto]] = {}
    for t in onnx_model.graph.initializer:
        if t.data_type in ONNX_DTYPES and t.HasField("raw_data"):
            by_hash.setdefault((t.data_type, hashlib.sha256(t.raw_data).hexdigest()), []).append(t)

    def find(key: str, t: torch.Tensor) -> tuple[onnx.TensorProto | None, bool]:
        onnx_type = ONNX_TYPE_OF[DTYPE_NAMES[t.dtype]]
        for digest, transposed in tags.get(key) or _fingerprints(t):
            hits = by_hash.get((onnx_type, digest), [])
            if len(hits) > 1:
                raise RuntimeError(f"the exporter stored one tensor {len(hits)} times: {[h.name for h in hits]}")
            if hits:
                return hits[0], transposed
        return None, False

    tensors: dict[str, dict] = {}
    renames: dict[str, str] = {}
    found: dict[str, tuple[onnx.TensorProto, bool]] = {}
    for key, value in state.items():
        canon = canonical[key]
        entry = {"shape": list(value.shape), "dtype": DTYPE_NAMES.get(value.dtype, str(value.dtype).removeprefix("torch.")),
                 "initializer": None, "transposed": False}
        if canon != key:
            entry["tied_to"] = canon
        if value.dtype not in BITS_DTYPE:
            entry["reason"] = "not a floating-point tensor"
        elif canon in found:
            init, transposed = found[canon]
            entry.update(initializer=canon, transposed=transposed)
        else:
            init, transposed = find(canon, value)
            if init is None:
                entry["reason"] = "not used by the exported graph"
            else:
                found[canon] = (init, transposed)
                renames[init.name] = canon
                init.name = canon
                src = state[canon].T.contiguous() if transposed else state[canon]
                init.raw_data = tensor_bits(src).tobytes()  # the real weights replace the tag
                entry.update(initializer=canon, transposed=transposed)
        tensors[key] = entry
    # A parameter with no initializer is unused by the graph (or inlined, which do_constant_folding=False
    # avoids): names.json says so, and a patch naming it is refused rather than silently dropped.
    new_names = set(renames.values())
    others = ({t.name for t in onnx_model.graph.initializer if t.name not in new_names}
              | {o for n in onnx_model.graph.node for o in n.output} | {i.name for i in onnx_model.graph.input})
    clashes = sorted(new_names & others)
    if clashes:
        raise RuntimeError(f"cannot rename initializers to state-dict keys, names taken: {clashes[:5]}")
    rename_inputs(onnx_model.graph, renames)
    return tensors, found
