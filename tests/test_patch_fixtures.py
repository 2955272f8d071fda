"""Helpers shared by the patch/checkpoint tests: tiny checkpoints and hand-sparsified PEFT adapters.

(No tests here; other test modules import these functions.)
"""
from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import pytest
import torch

from tiny_models import save_model_dir, tiny_gpt2, tiny_llama

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The tool computes B @ A as exact fused multiply-adds in k order (patch/merge_math.py). Tests that use
# torch's B @ A (PEFT's merge) as the reference need a BLAS that does the same: MKL on x86 does.
needs_mkl = pytest.mark.skipif(not (torch.backends.mkl.is_available() and platform.machine().lower() in ("x86_64", "amd64")),
                               reason="the reference is torch's B @ A, equal to the tool's only where MKL sums k in order")


def tiny_llama_dir(path: Path, *, seed: int = 0, shard_kb: int | None = None, **overrides) -> Path:
    """A tiny random Llama checkpoint (vocab 128, tied embeddings); sharded when shard_kb is given."""
    model = tiny_llama(seed=seed, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    if shard_kb:
        model.save_pretrained(str(path), safe_serialization=True, max_shard_size=f"{shard_kb}KB")
    else:
        save_model_dir(model, path)
    return path


def tiny_gpt2_dir(path: Path, *, seed: int = 0) -> Path:
    return save_model_dir(tiny_gpt2(seed=seed), path)


def sparsify_(t: torch.Tensor, keep: int, dim: int, gen: torch.Generator, scale: float) -> None:
    """Give every row (dim=1) or column (dim=0) of `t` exactly `keep` nonzeros, uniform in ±scale."""
    t.zero_()
    n_vec, length = (t.shape[0], t.shape[1]) if dim == 1 else (t.shape[1], t.shape[0])
    for i in range(n_vec):
        idx = torch.randperm(length, generator=gen)[:keep]
        vals = (torch.rand(keep, generator=gen) * 2 - 1) * scale
        vals[vals == 0] = scale
        if dim == 1:
            t[i, idx] = vals
        else:
            t[idx, i] = vals


def make_adapter(model_dir: Path, out: Path, *, r: int = 4, alpha: int = 8, tau: float = 0.25, scale: float = 0.02,
                 targets=("q_proj", "v_proj"), seed: int = 0, arch: str = "llama", roselora: bool = True,
                 **lora_kwargs) -> Path:
    """A PEFT LoRA adapter on the model in `model_dir`, made RoseLoRA-sparse by hand (each A row and B column
    keeps ceil(tau * d) entries), saved with roselora.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a = module.lora_A["default"].weight
                b = module.lora_B["default"].weight
                sparsify_(a, math.ceil(tau * a.shape[1]), 1, gen, scale)
                sparsify_(b, math.ceil(tau * b.shape[0]), 0, gen, scale)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    if roselora:
        (out / "roselora.json").write_text(json.dumps({"method": "roselora", "tau": tau, "r": r}))
    return out


def reference_merge(base_sd: dict, adapter_dir: Path, dtype: torch.dtype | None = None) -> dict:
    """The dense merge the patch must reproduce: (base.to(dtype).float() + scaling * B @ A).to(dtype), from PEFT files.

    B @ A is torch's (the BLAS's) product: on this machine MKL sums over k in order with fused
    multiply-adds, which is the tool's definition (test_merge_math checks that against exact arithmetic)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    ab = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {k: (v.to(dtype) if dtype and v.is_floating_point() else v) for k, v in base_sd.items()}
    for key, a in ab.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = ab[key.replace(".lora_A.", ".lora_B.")]
        delta = (b.float() @ a.float()) * (cfg["lora_alpha"] / a.shape[0])
        if cfg.get("fan_in_fan_out"):
            delta = delta.T
        name = module + ".weight"
        out[name] = (out[name].float() + delta).to(out[name].dtype)
    return out
