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
import resource
import shutil
import tempfile
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
from .names import (
    DATA_FILE, MODEL_FILE, NAMES_FILE, NAMES_FORMAT, ONNX_DTYPES, ONNX_TYPE_OF, aligned_offset, artifact_locations,
)

TASKS = ("auto", "causal-lm", "sequence-classification")
EXPORT_PHASES = ("load", "trace", "map", "write", "check")
# Files copied beside the graph so the artifact can be served on its own (no weights: those are in the graph).
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
               "tokenizer.model", "added_tokens.json")
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


def _names_json(names: dict) -> str:
    """names.json with one line per state-dict key: readable and diffable."""
    head = json.dumps({k: v for k, v in names.items() if k != "tensors"}, indent=1)[:-2]
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in names["tensors"].items())
    return f"{head},\n \"tensors\": {{\n{body}\n }}\n}}\n"


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


def _verify_from_files(out: Path, names: dict, state: dict[str, torch.Tensor]) -> int:
    """Read every mapped initializer back from the data file and compare it bit for bit with the state dict."""
    locs = artifact_locations(out, MODEL_FILE, inline=False)
    data = np.memmap(out / DATA_FILE, dtype=np.uint8, mode="r")
    checked = 0
    for key, entry in names["tensors"].items():
        if entry["initializer"] is None:
            continue
        loc, expected = locs[entry["initializer"]], state[key]
        bits = np.frombuffer(data[loc.offset: loc.offset + loc.length], dtype=BITS_DTYPE[expected.dtype])
        if entry["transposed"]:
            bits = bits.reshape(loc.shape).T
        if not np.array_equal(bits.reshape(-1), tensor_bits(expected)):
            raise RuntimeError(f"export check failed: initializer {loc.initializer!r} differs from {key!r}")
        checked += 1
    return checked


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
    if task not in TASKS:
        raise InputError(f"--task {task}: choose one of {', '.join(TASKS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: exists and is not an empty directory; choose a new path")
    task = detect_task(model_dir) if task == "auto" else task
    if kv_cache and task != "causal-lm":
        raise InputError(f"--kv-cache needs a causal LM; {model_dir} is exported as {task}")
    dtype = _checkpoint_dtype(model_dir)
    if stream is None:
        stream = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) >= STREAM_ABOVE_BYTES
    if stream:
        from .export_large import export_streaming

        return export_streaming(model_dir, out, task=task, opset=opset, kv_cache=kv_cache, check_runtime=check_runtime,
                                seed=seed, dtype=dtype, progress=done)
    model = load_model(model_dir, task=task, dtype=dtype)
    phases = {"load_s": time.perf_counter() - t0}
    done("load")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # plain ops: exports everywhere, runs on every provider
    model.config.use_cache = False
    wrapper = _LogitsOnly(model).eval()
    traced = _WithCache(model).eval() if kv_cache else wrapper
    input_names, output_names, dynamic_axes = _graph_io(model.config, kv_cache)

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Keys sharing storage are one tensor (tied weights): the first key in state-dict order is canonical,
    # which is the one a safetensors checkpoint keeps.
    by_ptr: dict[tuple, str] = {}
    canonical: dict[str, str] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        canonical[key] = by_ptr.setdefault(ident, key)
    params = {name: p for name, p in model.named_parameters()}  # deduplicated: one entry per storage
    param_key = {}
    for name, p in params.items():
        ident = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.dtype)
        param_key[name] = by_ptr.get(ident, name)

    # Reference logits on another shape than the traced one: checks dynamic axes at the end.
    check_inputs = _example_inputs(model.config, 3, 5, seed + 1)
    with torch.no_grad():
        expected = wrapper(*check_inputs)
        gen = torch.Generator().manual_seed(seed)
        tags: dict[str, list[tuple[str, bool]]] = {}  # key -> fingerprints of its tag, as is and transposed
        for name, p in params.items():
            if p.dtype in BITS_DTYPE:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
                tags[param_key[name]] = _fingerprints(p.detach())
        buf = io.BytesIO()
        t_trace = time.perf_counter()
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
    phases["trace_s"] = time.perf_counter() - t_trace
    done("trace")
    t_map = time.perf_counter()
    # The model now holds tags, not weights, and is not needed again: free it before parsing the graph
    # (and parse from the buffer without copying it) to keep the peak RSS down.
    config = model.config
    del model, wrapper, traced, params, past
    onnx_model = onnx.ModelProto()
    onnx_model.ParseFromString(buf.getbuffer())
    del buf

    # Find each tag by value among the initializers: as stored, or transposed.
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

    names = {
        "format": NAMES_FORMAT, "model_file": MODEL_FILE, "data_file": DATA_FILE, "task": task,
        "inputs": input_names, "outputs": output_names, "opset": opset,
        "kv_cache": _cache_geometry(config) if kv_cache else None,
        "exporter": f"torch {torch.__version__} legacy, do_constant_folding=False",
        "source": str(model_dir), "dtype": DTYPE_NAMES.get(dtype), "tensors": tensors,
    }
    phases["map_s"] = time.perf_counter() - t_map
    done("map")
    t_write = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_artifact(onnx_model, tmp)
        del onnx_model
        (tmp / NAMES_FILE).write_text(_names_json(names))
        for name in _SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        onnx.checker.check_model(str(tmp / MODEL_FILE))  # by path: the checker then reads external data too
        verified = _verify_from_files(tmp, names, state)
        phases["write_verify_s"] = time.perf_counter() - t_write
        done("write")
        t_check = time.perf_counter()
        # onnxruntime's CPU provider has no bf16 kernels for several ops (Where, ...): such graphs are
        # written and verified by value, but not run here.
        ran = check_runtime and dtype != torch.bfloat16
        past_names = input_names[2:]
        empty = _empty_past(config, check_inputs[0].shape[0], 0, dtype) if kv_cache else []
        diff = _runtime_check(tmp, check_inputs, expected, empty, past_names) if ran else None
        if diff is not None and dtype == torch.float32 and diff > 1e-3:
            raise RuntimeError(f"export check failed: onnxruntime logits differ from PyTorch by {diff:.3g}")
        phases["ort_check_s"] = time.perf_counter() - t_check
        done("check")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": str(out), "task": task, "kv_cache": kv_cache, "dtype": DTYPE_NAMES.get(dtype), "opset": opset,
        "initializers": len(found), "state_dict_keys": len(tensors), "verified_by_value": verified,
        "tied": sorted(k for k, e in tensors.items() if "tied_to" in e),
        "unmapped": sorted(k for k, e in tensors.items() if e["initializer"] is None),
        "data_bytes": (out / DATA_FILE).stat().st_size, "max_abs_logit_diff": diff,
        "runtime_check": "ran" if ran else ("off" if not check_runtime else "skipped: no bf16 kernels on onnxruntime CPU"),
        "total_s": round(time.perf_counter() - t0, 3), **{k: round(v, 3) for k, v in phases.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
