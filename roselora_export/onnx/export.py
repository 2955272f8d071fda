"""Export a Hugging Face model to an ONNX artifact directory whose initializers are the state dict.

The legacy TorchScript exporter with do_constant_folding=False keeps every weight as its own
initializer (no transposed copies). Two things still blur names and values, and both are undone here:
- it deduplicates initializers by *value* (two all-ones LayerNorm weights become one), so before
  tracing every distinct parameter is filled with unique random "tags", each tag is found again in
  the exported graph by value (as is, or transposed), and only then are the real weights written;
- the wrapper module's attribute prefix: initializers are renamed to the exact state-dict keys.
Tied weights (SmolLM2's lm_head = embed_tokens) share storage, so they are one initializer that
names.json lists under both keys. The map is then verified by value, from the written files.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import external_data_helper

from ..errors import InputError
from ..models import check_model_dir, load_model
from ..patch.model import BITS_DTYPE, DTYPE_NAMES, tensor_bits
from .names import DATA_FILE, MODEL_FILE, ONNX_DTYPES, ONNX_TYPE_OF, aligned_offset
from .publish import export_report, names_document, publish, verify_initializers

TASKS = ("auto", "causal-lm", "sequence-classification")
EXPORT_PHASES = ("load", "trace", "map", "write", "check")
_PREFIX = "m"  # the wrapper's attribute holding the model; stripped from initializer names


class _LogitsOnly(torch.nn.Module):
    """(input_ids, attention_mask) -> logits, with the cache off: the graph's whole interface."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        setattr(self, _PREFIX, model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = getattr(self, _PREFIX)
        kwargs = {"use_cache": False} if _is_causal(model) else {}
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


class _WithCache(torch.nn.Module):
    """(input_ids, attention_mask over past+new, past key/value per layer) -> logits, present key/values.

    The cache travels as plain tensors, [batch, kv_heads, past, head_dim] each, so the legacy exporter
    can trace it; inside, a DynamicCache is rebuilt from them (an empty past works: length 0).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        setattr(self, _PREFIX, model)
        self.layers = int(model.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        model = getattr(self, _PREFIX)
        cache = DynamicCache(config=model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _cache_geometry(config) -> dict:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return {"layers": int(config.num_hidden_layers), "kv_heads": kv_heads, "head_dim": head_dim}


def _graph_io(config, kv_cache: bool) -> tuple[list[str], list[str], dict]:
    """Input names, output names and dynamic axes of the exported graph."""
    inputs, outputs = ["input_ids", "attention_mask"], ["logits"]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    if kv_cache:
        axes["attention_mask"] = {0: "batch", 1: "total_sequence"}
        for i in range(int(config.num_hidden_layers)):
            for kind in ("key", "value"):
                inputs.append(f"past_key_values.{i}.{kind}")
                outputs.append(f"present.{i}.{kind}")
                axes[inputs[-1]] = {0: "batch", 2: "past_sequence"}
                axes[outputs[-1]] = {0: "batch", 2: "total_sequence"}
    return inputs, outputs, axes


def _empty_past(config, batch: int, past: int, dtype: torch.dtype, gen: torch.Generator | None = None) -> list[torch.Tensor]:
    g = _cache_geometry(config)
    shape = (batch, g["kv_heads"], past, g["head_dim"])
    return [torch.randn(shape, generator=gen).to(dtype) if gen is not None else torch.zeros(shape, dtype=dtype)
            for _ in range(2 * g["layers"])]


def _is_causal(model) -> bool:
    return not type(model).__name__.endswith("ForSequenceClassification")


def detect_task(model_dir: Path) -> str:
    """'causal-lm' or 'sequence-classification', from config.json's architectures."""
    archs = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence-classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    raise InputError(f"--model {model_dir}: cannot tell the task from architectures {archs}; pass --task")


def _checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The floating dtype the checkpoint stores (patches carry it), read from the safetensors headers."""
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype in ("F32", "F16", "BF16"):
                    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    return torch.float32


def _example_inputs(config, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(config, "vocab_size", 128))
    ids = torch.randint(0, min(vocab, 1000), (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, seq - 2:] = 0  # right padding in one row: the mask path is exercised
    return ids, mask


def _fingerprints(t: torch.Tensor) -> list[tuple[str, bool]]:
    """sha256 of the tensor's bits as stored and, for a matrix, transposed: how it is found in the graph."""
    views = [(t, False)] + ([(t.T, True)] if t.dim() == 2 else [])
    return [(hashlib.sha256(tensor_bits(v).tobytes()).hexdigest(), tr) for v, tr in views]


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_inputs(sub, renames)


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


def _runtime_check(out: Path, inputs: tuple[torch.Tensor, torch.Tensor], expected: torch.Tensor,
                   past: list[torch.Tensor], past_names: list[str]) -> float:
    """Max abs difference between onnxruntime's logits and PyTorch's on the same inputs (another shape than traced)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(out / MODEL_FILE), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}
    feeds.update({name: t.numpy() for name, t in zip(past_names, past)})
    got = sess.run(["logits"], feeds)[0]
    return float(np.abs(got.astype(np.float64) - expected.float().numpy()).max())


# Checkpoints this large are exported by export_large (graph without weights, weights streamed file to
# file): the in-memory path holds the weights about three times over and stops at protobuf's 2 GB.
STREAM_ABOVE_BYTES = 1 << 30


def export_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, task: str = "auto", opset: int = 17,
                kv_cache: bool = False, check_runtime: bool = True, seed: int = 0,
                progress: Callable[[str], None] | None = None, stream: bool | None = None) -> dict:
    """Export a local HF model to `out_dir` (model.onnx + aligned model.onnx.data + names.json); returns a report.

    Inputs input_ids and attention_mask (int64, dynamic batch and sequence), output logits. With
    kv_cache (causal LMs), also past_key_values.{i}.key/value in and present.{i}.key/value out, and
    attention_mask spans past + new tokens. Nothing is written at `out_dir` unless the whole export
    and its checks succeed. `progress`, if given, is called with the name of each finished phase
    (EXPORT_PHASES, in order). `stream` (default: for checkpoints of STREAM_ABOVE_BYTES or more) exports
    through export_large: any size, peak memory about the model's once.
    """
    done = progress or (lambda phase: None)
    t0 = time.perf_counter()
    model_dir, out = check_model_dir(model_dir), Path(out_dir)
    task, dtype = check_export_args(model_dir, out, task, kv_cache)
    if stream is None:
        stream = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) >= STREAM_ABOVE_BYTES
    if stream:
        from .export_large import export_streaming

        return export_streaming(model_dir, out, task=task, opset=opset, kv_cache=kv_cache, check_runtime=check_runtime,
                                seed=seed, dtype=dtype, progress=done)
    model = load_for_export(model_dir, task, dtype)
    phases = {"load_s": time.perf_counter() - t0}
    done("load")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    canonical = tied_canonical(model)
    check_inputs = _example_inputs(model.config, 3, 5, seed + 1)  # another shape than traced: checks dynamic axes
    with torch.no_grad():
        expected = _LogitsOnly(model).eval()(*check_inputs)
    config = model.config
    t_trace = time.perf_counter()
    onnx_model, tags = _trace_with_tags(model, canonical, kv_cache, opset, seed, dtype)
    del model  # it holds tags, not weights, and is not needed again
    phases["trace_s"] = time.perf_counter() - t_trace
    done("trace")
    t_map = time.perf_counter()
    tensors, found = _put_weights_by_tag(onnx_model, state, canonical, tags)
    input_names, output_names, _ = _graph_io(config, kv_cache)
    names = names_document(task=task, input_names=input_names, output_names=output_names, opset=opset,
                           kv_cache=_cache_geometry(config) if kv_cache else None,
                           exporter=f"torch {torch.__version__} legacy, do_constant_folding=False", source=model_dir,
                           dtype=DTYPE_NAMES.get(dtype), tensors=tensors)
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


def check_export_args(model_dir: Path, out: Path, task: str, kv_cache: bool) -> tuple[str, torch.dtype]:
    """The task (detected for "auto") and the checkpoint's dtype; InputError for bad arguments or a non-empty out."""
    if task not in TASKS:
        raise InputError(f"--task {task}: choose one of {', '.join(TASKS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: exists and is not an empty directory; choose a new path")
    task = detect_task(model_dir) if task == "auto" else task
    if kv_cache and task != "causal-lm":
        raise InputError(f"--kv-cache needs a causal LM; {model_dir} is exported as {task}")
    return task, _checkpoint_dtype(model_dir)


def load_for_export(model_dir: Path, task: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model as it is traced: eager attention (plain ops: exports everywhere, runs on every provider), no cache."""
    model = load_model(model_dir, task=task, dtype=dtype)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    model.config.use_cache = False
    return model


def tied_canonical(model: torch.nn.Module) -> dict[str, str]:
    """State-dict key -> the key whose storage it shares (itself if none): tied weights are one tensor, named by
    the first key in state-dict order, which is the one a safetensors checkpoint keeps."""
    by_ptr: dict[tuple, str] = {}
    canonical: dict[str, str] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        canonical[key] = by_ptr.setdefault(ident, key)
    return canonical


def runtime_checker(config, kv_cache: bool, dtype: torch.dtype, check_inputs, expected: torch.Tensor
                    ) -> Callable[[Path], float]:
    """The check run on the written artifact: onnxruntime's logits against PyTorch's (RuntimeError past 1e-3 in fp32)."""
    input_names = _graph_io(config, kv_cache)[0]

    def check(root: Path) -> float:
        empty = _empty_past(config, check_inputs[0].shape[0], 0, dtype) if kv_cache else []
        diff = _runtime_check(root, check_inputs, expected, empty, input_names[2:])
        if dtype == torch.float32 and diff > 1e-3:
            raise RuntimeError(f"export check failed: onnxruntime logits differ from PyTorch by {diff:.3g}")
        return diff
    return check


def _trace_with_tags(model: torch.nn.Module, canonical: dict[str, str], kv_cache: bool, opset: int, seed: int,
                     dtype: torch.dtype) -> tuple[onnx.ModelProto, dict[str, list[tuple[str, bool]]]]:
    """The traced graph, with every distinct parameter filled beforehand with unique random tags (the exporter
    deduplicates initializers by value), and each key's tag fingerprints, as is and transposed."""
    params = dict(model.named_parameters())  # deduplicated: one entry per storage
    by_ptr = {}
    for key, t in model.state_dict().items():
        by_ptr.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype), canonical[key])
    traced = _WithCache(model).eval() if kv_cache else _LogitsOnly(model).eval()
    input_names, output_names, dynamic_axes = _graph_io(model.config, kv_cache)
    tags: dict[str, list[tuple[str, bool]]] = {}
    buf = io.BytesIO()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in params.items():
            if p.dtype in BITS_DTYPE:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
                ident = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.dtype)
                tags[by_ptr.get(ident, name)] = _fingerprints(p.detach())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ids, mask = _example_inputs(model.config, 2, 8, seed)
            past = _empty_past(model.config, 2, 3, dtype, gen) if kv_cache else []
            if kv_cache:  # the mask covers the 3 past positions too
                mask = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
            torch.onnx.export(
                traced, (ids, mask, *past), buf, dynamo=False, do_constant_folding=False, opset_version=opset,
                input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
            )
    del traced, params, past
    onnx_model = onnx.ModelProto()
    onnx_model.ParseFromString(buf.getbuffer())  # parsed from the buffer without copying it
    return onnx_model, tags


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
    _rename_inputs(onnx_model.graph, renames)
    return tensors, found
