"""What both export paths (export.py in memory, export_large.py streamed) share: the model as traced.

    check_export_args, load_for_export   the task and dtype, and the model in its traced form (eager, no cache)
    tied_canonical, storage_key           state-dict key -> the key whose storage it shares
    trace(model, ...)                     the legacy TorchScript export of the wrapped model, parsed
    graph_io, cache_geometry              the graph's interface (inputs, outputs, dynamic axes, kv-cache shape)
    example_inputs, runtime_checker       the check inputs, and onnxruntime's logits checked against PyTorch's
    rename_inputs                         node inputs renamed throughout a graph and its subgraphs
"""
from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from ..core.atomic import check_empty_out
from ..core.dtypes import PATCHABLE, torch_dtype
from ..errors import InputError
from ..models import load_model
from .names import MODEL_FILE

TASKS = ("auto", "causal-lm", "sequence-classification")
PREFIX = "m"  # the wrapper's attribute holding the model; stripped from initializer names


class LogitsOnly(torch.nn.Module):
    """(input_ids, attention_mask) -> logits, with the cache off: the graph's whole interface."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        setattr(self, PREFIX, model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = getattr(self, PREFIX)
        kwargs = {"use_cache": False} if _is_causal(model) else {}
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


class WithCache(torch.nn.Module):
    """(input_ids, attention_mask over past+new, past key/value per layer) -> logits, present key/values.

    The cache travels as plain tensors, [batch, kv_heads, past, head_dim] each, so the legacy exporter
    can trace it; inside, a DynamicCache is rebuilt from them (an empty past works: length 0).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        setattr(self, PREFIX, model)
        self.layers = int(model.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        model = getattr(self, PREFIX)
        cache = DynamicCache(config=model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_geometry(config) -> dict:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return {"layers": int(config.num_hidden_layers), "kv_heads": kv_heads, "head_dim": head_dim}


def graph_io(config, kv_cache: bool) -> tuple[list[str], list[str], dict]:
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
    g = cache_geometry(config)
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
                if dtype in PATCHABLE:
                    return torch_dtype(dtype)
    return torch.float32


def example_inputs(config, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(config, "vocab_size", 128))
    ids = torch.randint(0, min(vocab, 1000), (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, seq - 2:] = 0  # right padding in one row: the mask path is exercised
    return ids, mask


def rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                rename_inputs(sub, renames)


def check_export_args(model_dir: Path, out: Path, task: str, kv_cache: bool) -> tuple[str, torch.dtype]:
    """The task (detected for "auto") and the checkpoint's dtype; InputError for bad arguments or a non-empty out."""
    if task not in TASKS:
        raise InputError(f"--task {task}: choose one of {', '.join(TASKS)}")
    check_empty_out(out)
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
    return {key: by_ptr.setdefault(storage_key(t), key) for key, t in model.state_dict().items()}


def storage_key(t: torch.Tensor) -> tuple:
    """What two tensors that are one (tied) share: storage address, offset, shape and dtype."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype


def trace(model: torch.nn.Module, kv_cache: bool, opset: int, seed: int, dtype: torch.dtype, gen: torch.Generator,
          *, export_params: bool = True) -> onnx.ModelProto:
    """The wrapped model exported by the legacy TorchScript exporter (do_constant_folding=False) on a 2x8 example
    (with kv_cache, 3 past positions drawn from `gen`), parsed. export_params=False: parameters are graph inputs."""
    input_names, output_names, dynamic_axes = graph_io(model.config, kv_cache)
    traced = WithCache(model).eval() if kv_cache else LogitsOnly(model).eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = example_inputs(model.config, 2, 8, seed)
        past = _empty_past(model.config, 2, 3, dtype, gen) if kv_cache else []
        if kv_cache:  # the mask covers the 3 past positions too
            mask = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
        torch.onnx.export(traced, (ids, mask, *past), buf, dynamo=False, do_constant_folding=False,
                          export_params=export_params, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes)
    del traced, past
    graph = onnx.ModelProto()
    graph.ParseFromString(buf.getbuffer())  # parsed from the buffer without copying it
    return graph


def reference_logits(model: torch.nn.Module, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Check inputs (3x5: another shape than traced, so the dynamic axes are checked) and PyTorch's logits on them."""
    check_inputs = example_inputs(model.config, 3, 5, seed + 1)
    with torch.no_grad():
        return check_inputs, LogitsOnly(model).eval()(*check_inputs)


def runtime_checker(config, kv_cache: bool, dtype: torch.dtype, check_inputs, expected: torch.Tensor
                    ) -> Callable[[Path], float]:
    """The check run on the written artifact: onnxruntime's logits against PyTorch's (RuntimeError past 1e-3 in fp32)."""
    past_names = graph_io(config, kv_cache)[0][2:]

    def check(root: Path) -> float:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(root / MODEL_FILE), so, providers=["CPUExecutionProvider"])
        feeds = {"input_ids": check_inputs[0].numpy(), "attention_mask": check_inputs[1].numpy()}
        if kv_cache:
            empty = _empty_past(config, check_inputs[0].shape[0], 0, dtype)
            feeds.update({name: t.numpy() for name, t in zip(past_names, empty)})
        got = sess.run(["logits"], feeds)[0]
        diff = float(np.abs(got.astype(np.float64) - expected.float().numpy()).max())
        if dtype == torch.float32 and diff > 1e-3:
            raise RuntimeError(f"export check failed: onnxruntime logits differ from PyTorch by {diff:.3g}")
        return diff
    return check
