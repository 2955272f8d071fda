"""The sparse patch: in-memory model, file format, build (adapter or diff), apply / revert on tensors.

    patch = build_patch_from_adapter(adapter_dir, base_state_dict)   # or build_patch_from_state_dicts
    save_patch(patch, "edit.patch.safetensors"); patch = load_patch("edit.patch.safetensors")
    patched = apply_to_state_dict(patch, sd); base = apply_to_state_dict(patch, patched, revert=True)

Checkpoint directories (streaming, atomic) live in `roselora_export.checkpoint` (`merge_checkpoint`,
`diff_checkpoints`, `apply_to_checkpoint`), a layer above this one.
"""
from __future__ import annotations

from ..core.lazy import lazy_exports

# Each name is imported on first use, so that the torch-free parts (model, io, adapter, merge_math) load
# without torch: a fresh `merge` process merges and writes the patch without ever importing it.
_EXPORTS = {
    **dict.fromkeys(("apply_to_state_dict", "delta_csr", "xor_tensor"), ".apply"),
    **dict.fromkeys(("build_patch_from_adapter", "build_patch_from_state_dicts", "merge_tensor"), ".build"),
    **dict.fromkeys(("Survival", "SurvivalReport"), ".merge_math"),
    **dict.fromkeys(("config_fingerprint", "shape_config"), ".fingerprint"),
    **dict.fromkeys(("load_patch", "save_patch"), ".io"),
    **dict.fromkeys(("FORMAT_VERSION", "Patch", "TensorPatch", "tensor_patch_from_pair"), ".model"),
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), submodules=True)
__all__ = sorted(_EXPORTS)
