"""A RoseLoRA-shaped adapter for SmolLM2 built without training (until a real edit is at hand).

Rank 8 on q_proj and v_proj of every layer; every A row and B column keeps ceil(0.05 * d) entries,
values at the editing clamp ±3e-3 with random signs; lora_alpha 32 (scaling 4). Written as a standard
PEFT adapter directory plus roselora.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

CLAMP = 3e-3


def _sparse(rows: int, cols: int, keep: int, along_rows: bool, gen: torch.Generator) -> torch.Tensor:
    t = torch.zeros(rows, cols)
    n, length = (rows, cols) if along_rows else (cols, rows)
    for i in range(n):
        idx = torch.randperm(length, generator=gen)[:keep]
        # At the clamp with random signs: Adam at lr 5e-4 for 25 steps moves an entry ~1e-2, so trained
        # entries sit at ±3e-3 (uniform values would understate the edit).
        vals = (torch.randint(0, 2, (keep,), generator=gen) * 2 - 1).float() * CLAMP
        if along_rows:
            t[i, idx] = vals
        else:
            t[idx, i] = vals
    return t


def write_synthetic_adapter(model_dir: Path, out: Path, *, r: int = 8, tau: float = 0.05, alpha: int = 32,
                            targets=("q_proj", "v_proj"), seed: int = 0) -> Path:
    from roselora_export.checkpoint import open_model_dir

    gen = torch.Generator().manual_seed(seed)
    model = open_model_dir(model_dir)
    cfg = model.config
    shapes = {k: model.locations[k][1].shape for k in model.keys()
              if k.endswith(".weight") and any(f".{t}." in k for t in targets)}
    tensors = {}
    for key, (d_out, d_in) in sorted(shapes.items()):
        module = "base_model.model." + key[: -len(".weight")]
        tensors[module + ".lora_A.weight"] = _sparse(r, d_in, math.ceil(tau * d_in), True, gen)
        tensors[module + ".lora_B.weight"] = _sparse(d_out, r, math.ceil(tau * d_out), False, gen)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), "lora_dropout": 0.0,
        "fan_in_fan_out": False, "use_rslora": False, "bias": "none", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.get("_name_or_path", model_dir.name)}, indent=2))
    (out / "roselora.json").write_text(json.dumps({"method": "roselora", "synthetic": True, "r": r, "tau": tau,
                                                   "lora_alpha": alpha, "clamp": CLAMP}, indent=2))
    return out
