"""Safetensors checkpoint directories: streaming merge / diff / apply / revert, atomic writes.

    merge_checkpoint(base_dir, adapter_dir, out_dir, dtype=torch.bfloat16)  # merged model + patch beside it
    diff_checkpoints(base_dir, target_dir, "edit.patch.safetensors")
    apply_to_checkpoint(base_dir, [patch], out_dir)             # or in_place=True; revert=True
"""
from .model_dir import LazyStateDict, ModelDir, open_model_dir
from .ops import (
    MergeResult,
    apply_to_checkpoint,
    default_patch_path,
    diff_checkpoints,
    fingerprints,
    load_state_dict,
    merge_checkpoint,
    verify_patches,
)

__all__ = [
    "LazyStateDict",
    "MergeResult",
    "ModelDir",
    "apply_to_checkpoint",
    "default_patch_path",
    "diff_checkpoints",
    "fingerprints",
    "load_state_dict",
    "merge_checkpoint",
    "open_model_dir",
    "verify_patches",
]
