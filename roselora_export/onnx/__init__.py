"""ONNX artifacts: export once (names.json maps state-dict keys), patch initializers in place, sessions with patches.

    export_onnx(model_dir, out_dir)                        -> report
    apply_to_onnx_dir(base_dir, patches, out_dir, ...)     -> report (rewrites only the touched bytes)
    create_session(onnx_dir, patches)                      -> onnxruntime.InferenceSession (base files untouched)
    generate_greedy(session, input_ids, max_new_tokens)    -> new token ids (plain or kv-cache graphs)

Each name is imported on first use: patching an artifact (names, patching, journal) imports neither
torch nor onnx, whose imports alone cost more than the patch; export and sessions import them.
"""
from __future__ import annotations

from ..core.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("NAMES_FILE", "is_onnx_dir", "open_artifact"), ".names"),
    "apply_to_onnx_dir": ".patching",
    **dict.fromkeys(("OverrideIgnoredError", "create_session", "generate_greedy"), ".session"),
    "export_onnx": ".export",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
__all__ = list(_EXPORTS)
