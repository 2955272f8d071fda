"""onnxruntime sessions on a base ONNX artifact plus patches, without rewriting the base files.

The patched initializers (XOR applied in memory) are handed to onnxruntime with
`SessionOptions.add_external_initializers`, which replaces them *before* graph optimisation
(`add_initializer` does not: docs/design.md). Every override is checked against the graph (never
trusted), and a canary model consuming weights the ways exported transformers do (Transpose->MatMul,
Gather, Mul, Gemm+bias), run with the same build, options, providers and call, must show every
override in its outputs: ignoring one is a property of the load pipeline, not of the values. The
canary's verdict is cached per configuration and process.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import InputError
from ..patch.model import Patch
from .journal import recover
from .names import MODEL_FILE, ONNX_TYPE_OF, open_artifact
from .patching import plan_patches

OVERRIDE_APIS = ("external", "initializer")
_canary_ok: dict[tuple, bool] = {}


class OverrideIgnoredError(RuntimeError):
    """onnxruntime would run the base weights instead of the patched ones."""


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it and a GPU is present, else CPU."""
    import onnxruntime as ort

    # A CPU-only torch cannot see the GPU, so then look for the NVIDIA driver's device node instead.
    gpu = torch.cuda.is_available() or (torch.version.cuda is None and Path("/dev/nvidiactl").exists())
    if "CUDAExecutionProvider" in ort.get_available_providers() and gpu:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _ort_value(bits: np.ndarray, dtype: str, shape: tuple[int, ...]):
    """An OrtValue of the bits of dtype `dtype` ("F32", "F16", "BF16")."""
    import onnxruntime as ort

    if dtype == "BF16":  # numpy has no bfloat16: hand the bits over with their ONNX type
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits.reshape(shape), ONNX_TYPE_OF[dtype])
    return ort.OrtValue.ortvalue_from_numpy(bits.view({"F32": np.float32, "F16": np.float16}[dtype]).reshape(shape))


def _session_options(level, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


def _add_overrides(so, names: list[str], values: list, api: str) -> None:
    if api == "external":
        so.add_external_initializers(names, values)
    else:
        for name, value in zip(names, values):
            so.add_initializer(name, value)


def _canary_model():
    """Weights consumed the ways exported transformers consume them: Transpose->MatMul (torch Linear),
    Gather (embeddings), Mul (norm scales), Gemm with transB and a bias (GPT-2 Conv1D, BERT, heads)."""
    from onnx import helper

    rng = np.random.default_rng(0)
    weights = {"w_linear": rng.standard_normal((3, 4)), "w_embed": rng.standard_normal((5, 4)),
               "w_scale": rng.standard_normal(4), "w_gemm": rng.standard_normal((3, 4)), "b_gemm": rng.standard_normal(3)}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    nodes = [
        helper.make_node("Transpose", ["w_linear"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["linear"]),
        helper.make_node("Gather", ["w_embed", "idx"], ["embed"], axis=0),
        helper.make_node("Mul", ["x", "w_scale"], ["scale"]),
        helper.make_node("Gemm", ["x", "w_gemm", "b_gemm"], ["gemm"], transB=1),
    ]
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "canary",
        [helper.make_tensor_value_info("x", f, [1, 4]), helper.make_tensor_value_info("idx", onnx.TensorProto.INT64, [1])],
        [helper.make_tensor_value_info(n, f, None) for n in ("linear", "embed", "scale", "gemm")],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, weights


def check_overrides_take_effect(providers: Sequence[str], level, disabled_optimizers: Sequence[str],
                                api: str = "external") -> None:
    """Raise OverrideIgnoredError unless overrides show in every output of the canary model (cached per setup)."""
    import onnxruntime as ort

    key = (ort.__version__, repr(list(providers)), int(level), tuple(disabled_optimizers), api)
    if _canary_ok.get(key):
        return
    model, weights = _canary_model()
    new = {k: v + 100.0 for k, v in weights.items()}
    x, idx = np.array([[0.5, 1.0, 1.5, 2.0]], dtype=np.float32), np.array([2], dtype=np.int64)  # sum(x) != 0
    expected = {"linear": x @ new["w_linear"].T, "embed": new["w_embed"][idx], "scale": x * new["w_scale"],
                "gemm": x @ new["w_gemm"].T + new["b_gemm"]}
    with tempfile.TemporaryDirectory(prefix="roselora-canary-") as tmp:
        path = os.path.join(tmp, "canary.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="canary.data", size_threshold=0)
        so = _session_options(level, 1)
        values = [ort.OrtValue.ortvalue_from_numpy(v) for v in new.values()]
        _add_overrides(so, list(new), values, api)
        sess = ort.InferenceSession(path, so, providers=list(providers), disabled_optimizers=list(disabled_optimizers))
        got = dict(zip(expected, sess.run(list(expected), {"x": x, "idx": idx})))
    ignored = [name for name in expected if not np.allclose(got[name], expected[name], rtol=1e-4, atol=1e-3)]
    if ignored:
        raise OverrideIgnoredError(
            f"onnxruntime {ort.__version__} ignored initializer overrides feeding {', '.join(ignored)} (providers "
            f"{list(providers)}, optimization level {level}, disabled {list(disabled_optimizers) or 'none'}, "
            f"api {api!r}); use the default api 'external', or disable ConstantFolding / lower the optimization level")
    _canary_ok[key] = True


def create_session(onnx_dir: str | os.PathLike, patches: Sequence[Patch | str | os.PathLike] = (), *, providers: Sequence[str] | None = None,
                   optimization_level=None, disabled_optimizers: Sequence[str] = (), threads: int | None = None,
                   override_api: str = "external", verify: bool = True):
    """An onnxruntime.InferenceSession on the base artifact with `patches` (Patch objects or files) applied as
    initializer overrides; the base files are only read. Checked as for `apply`; InputError on bad input,
    OverrideIgnoredError if onnxruntime would not use the overrides."""
    import onnxruntime as ort

    from ..patch import load_patch

    if override_api not in OVERRIDE_APIS:
        raise ValueError(f"override_api must be one of {OVERRIDE_APIS}")
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimization_level is None else optimization_level
    providers = list(providers) if providers else default_providers()
    recover(onnx_dir)  # an interrupted in-place apply is rolled back before anything is read
    artifact = open_artifact(onnx_dir)
    touched = plan_patches(artifact, [p if isinstance(p, Patch) else load_patch(p) for p in patches])
    names = list(touched)  # initializers of the graph (artifact.locations), each checked by plan_patches
    values = [_ort_value(t.bits, t.location.dtype, t.location.shape) for t in touched.values()]
    if verify and names:
        check_overrides_take_effect(providers, level, disabled_optimizers, override_api)
    so = _session_options(level, threads)
    if names:
        _add_overrides(so, names, values, override_api)
    session = ort.InferenceSession(str(Path(onnx_dir) / artifact.names.get("model_file", MODEL_FILE)), so,
                                   providers=providers, disabled_optimizers=list(disabled_optimizers))
    session.roselora_overrides = dict(zip(names, values))  # onnxruntime reads these buffers for the session's life
    session.roselora_names = artifact.names
    return session


def generate_greedy(session, input_ids: Sequence[int], max_new_tokens: int = 8, eos_token_id: int | None = None
                    ) -> list[int]:
    """Greedy continuation of one sequence with a causal-LM session (plain or --kv-cache graph); new token ids."""
    names = getattr(session, "roselora_names", {}) or {}
    if names.get("task", "causal-lm") != "causal-lm":
        raise InputError("generation needs a causal-LM export; this ONNX model is " + str(names.get("task")))
    geo = names.get("kv_cache")
    past_names = [n for n in names.get("inputs", []) if n.startswith("past_key_values.")]
    float_type = np.float16 if names.get("dtype") == "F16" else np.float32
    ids = np.asarray([list(input_ids)], dtype=np.int64)
    past = {n: np.zeros((1, geo["kv_heads"], 0, geo["head_dim"]), float_type) for n in past_names} if geo else {}
    new: list[int] = []
    step_ids = ids
    for _ in range(max_new_tokens):
        feeds = {"input_ids": step_ids, "attention_mask": np.ones((1, ids.shape[1]), np.int64), **past}
        outputs = session.run(None, feeds)
        token = int(outputs[0][0, -1].argmax())
        new.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        ids = np.concatenate([ids, [[token]]], axis=1)
        if geo:  # feed only the new token; the cache carries the rest
            past = dict(zip(past_names, outputs[1:]))
            step_ids = ids[:, -1:]
        else:
            step_ids = ids
    return new
