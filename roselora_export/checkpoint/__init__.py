"""Safetensors checkpoint directories: streaming merge / diff / apply / revert, atomic writes.

    merge_checkpoint(base_dir, adapter_dir, out_dir, dtype=torch.bfloat16)  # merged model + patch beside it
    diff_checkpoints(base_dir, target_dir, "edit.patch.safetensors")
    apply_to_checkpoint(base_dir, [patch], out_dir)             # or in_place=True; revert=True

The verbs are imported on first use, and `merge` never imports torch (patch/merge_math.py does its
arithmetic with numpy).
"""
from __future__ import annotations

from ..core.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("LazyStateDict", "ModelDir", "open_model_dir"), ".model_dir"),
    **dict.fromkeys(("MergeResult", "default_patch_path", "merge_checkpoint"), ".merge"),
    **dict.fromkeys(("apply_to_checkpoint", "diff_checkpoints", "fingerprints", "load_state_dict", "verify_patches"),
                    ".ops"),
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
__all__ = sorted(_EXPORTS)
