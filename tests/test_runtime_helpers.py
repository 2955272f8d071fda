"""Helpers shared by the runtime tests: devices, whole-model fingerprints, random patches on live models."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from roselora_export.patch.model import Patch, sha256_tensor, tensor_patch_from_pair

# "cpu-torch": the CPU with the accelerator code path (torch ops instead of numpy), so CI covers it.
DEVICES = ["cpu", "cpu-torch"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tied in the tiny Llama: both names are one tensor.
TIED = ("model.embed_tokens.weight", "lm_head.weight")


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over every state-dict entry's bytes (tied entries included under each name)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(sha256_tensor(t).encode())
    return h.hexdigest()


def live(model: torch.nn.Module, name: str) -> torch.Tensor:
    return dict(model.named_parameters(remove_duplicate=False))[name]


def random_patch(model: torch.nn.Module, names: list[str], rng: np.random.Generator, *, frac: float = 0.05,
                 scale: float = 0.5, provenance: dict | None = None) -> Patch:
    """A patch built on the model's current values: a random fraction of each tensor's elements perturbed."""
    tensors = {}
    for name in names:
        base = live(model, name).detach().cpu()
        flat = base.reshape(-1)
        k = max(1, int(frac * flat.numel()))
        idx = torch.from_numpy(np.sort(rng.choice(flat.numel(), size=k, replace=False)))
        patched = base.clone()
        noise = torch.from_numpy(rng.standard_normal(k).astype(np.float32)) * scale
        patched.view(-1)[idx] = (flat[idx].float() * (1 + noise) + noise).to(base.dtype)
        tp = tensor_patch_from_pair(name, base, patched)
        if tp is not None:
            tensors[name] = tp
    return Patch(tensors=tensors, provenance=dict(provenance or {}))


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    from roselora_export.runtime import staging

    if request.param == "cpu-torch":
        monkeypatch.setattr(staging, "NUMPY_ON_CPU", False)
        return "cpu"
    return request.param


def test_random_patch_changes_only_the_chosen_elements():
    from tiny_models import tiny_llama

    model = tiny_llama()
    patch = random_patch(model, ["model.layers.0.mlp.up_proj.weight"], np.random.default_rng(0), frac=0.1)
    tp = patch.tensors["model.layers.0.mlp.up_proj.weight"]
    assert 0 < tp.nnz <= 0.1 * tp.numel
