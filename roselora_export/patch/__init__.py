"""The sparse patch: in-memory model, file format, build (adapter or diff), apply / revert on tensors.

    patch = build_patch_from_adapter(adapter_dir, base_state_dict)   # or build_patch_from_state_dicts
    save_patch(patch, "edit.patch.safetensors"); patch = load_patch("edit.patch.safetensors")
    patched = apply_to_state_dict(patch, sd); base = apply_to_state_dict(patch, patched, revert=True)

Checkpoint directories (streaming, atomic) live in `roselora_export.checkpoint`; its verbs
(`merge_checkpoint`, `diff_checkpoints`, `apply_to_checkpoint`) are also reachable from here.
"""
from .apply import apply_patches_to_state_dict, apply_to_state_dict, delta_csr, touched_fingerprint, xor_tensor
from .build import (
    Survival,
    SurvivalReport,
    build_patch_from_adapter,
    build_patch_from_state_dicts,
    merge_tensor,
)
from .fingerprint import config_fingerprint, shape_config
from .io import load_patch, save_patch
from .model import FORMAT_VERSION, Patch, TensorPatch, tensor_patch_from_pair

_CHECKPOINT_VERBS = ("apply_to_checkpoint", "diff_checkpoints", "merge_checkpoint")


def __getattr__(name: str):
    # Lazily, so that `patch` itself depends on no other package module (checkpoint depends on patch).
    if name in _CHECKPOINT_VERBS:
        from .. import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "Patch",
    "Survival",
    "SurvivalReport",
    "TensorPatch",
    "apply_patches_to_state_dict",
    "apply_to_state_dict",
    "build_patch_from_adapter",
    "build_patch_from_state_dicts",
    "config_fingerprint",
    "delta_csr",
    "load_patch",
    "merge_tensor",
    "save_patch",
    "shape_config",
    "tensor_patch_from_pair",
    "touched_fingerprint",
    "xor_tensor",
]
