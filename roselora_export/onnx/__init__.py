"""ONNX artifacts: export once (names.json maps state-dict keys), patch initializers in place, sessions with patches.

    export_onnx(model_dir, out_dir)                        -> report
    apply_to_onnx_dir(base_dir, patches, out_dir, ...)     -> report (rewrites only the touched bytes)
    create_session(onnx_dir, patches)                      -> onnxruntime.InferenceSession (base files untouched)
    generate_greedy(session, input_ids, max_new_tokens)    -> new token ids (plain or kv-cache graphs)

Each name is imported on first use: patching an artifact (names, patching, journal) imports neither
torch nor onnx, whose imports alone cost more than the patch; export and sessions import them.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    **dict.fromkeys(("NAMES_FILE", "is_onnx_dir", "open_artifact"), ".names"),
    "apply_to_onnx_dir": ".patching",
    **dict.fromkeys(("OverrideIgnoredError", "create_session", "generate_greedy"), ".session"),
    "export_onnx": ".export",
}

__all__ = ["NAMES_FILE", "is_onnx_dir", "open_artifact", "apply_to_onnx_dir", "create_session", "OverrideIgnoredError",
           "generate_greedy", "export_onnx"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
