"""ONNX artifacts: export once (names.json maps state-dict keys), patch initializers in place, sessions with patches.

    export_onnx(model_dir, out_dir)                        -> report
    apply_to_onnx_dir(base_dir, patches, out_dir, ...)     -> report (rewrites only the touched bytes)
    create_session(onnx_dir, patches)                      -> onnxruntime.InferenceSession (base files untouched)
    generate_greedy(session, input_ids, max_new_tokens)    -> new token ids (plain or kv-cache graphs)
"""
from .names import NAMES_FILE, is_onnx_dir, open_artifact
from .patching import apply_to_onnx_dir
from .session import OverrideIgnoredError, create_session, generate_greedy

__all__ = ["NAMES_FILE", "is_onnx_dir", "open_artifact", "apply_to_onnx_dir", "create_session", "OverrideIgnoredError",
           "generate_greedy", "export_onnx"]


def export_onnx(*args, **kwargs):
    """See roselora_export.onnx.export.export_onnx (imported lazily: it pulls in transformers)."""
    from .export import export_onnx as _export

    return _export(*args, **kwargs)
