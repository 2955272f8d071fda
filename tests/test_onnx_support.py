"""Helpers shared by the ONNX tests: RoseLoRA-shaped patches, PyTorch reference logits, file fingerprints."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from roselora_export.patch.model import Patch, tensor_patch_from_pair

MAX_LOGIT_DIFF = 1e-3  # fp32, the bound
# What the tiny-model tests patch: attention projections, embeddings (tied in Llama/GPT-2), norms, biases, heads.
PATCH_KEYS = {
    "llama": ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
              "model.embed_tokens.weight", "model.norm.weight"],
    "gpt2": ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.bias", "transformer.wte.weight"],
    "bert": ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.attention.self.value.weight",
             "classifier.weight"],
}
TASKS = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "sequence-classification"}


def base_state(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def rose_delta(shape: tuple[int, int], *, rank: int = 8, tau: float = 0.05, scale: float = 1e-2,
               gen: torch.Generator) -> torch.Tensor:
    """B @ A with ceil(tau*d) nonzeros per A row and per B column: the support of a RoseLoRA update."""
    d1, d2 = shape
    a, b = torch.zeros(rank, d2), torch.zeros(d1, rank)
    for i in range(rank):
        a[i, torch.randperm(d2, generator=gen)[: math.ceil(tau * d2)]] = torch.randn(math.ceil(tau * d2), generator=gen)
        b[torch.randperm(d1, generator=gen)[: math.ceil(tau * d1)], i] = torch.randn(math.ceil(tau * d1), generator=gen)
    return (b @ a) * scale


def make_patch(state: dict[str, torch.Tensor], keys: list[str], *, seed: int = 0, scale: float = 1e-2
               ) -> tuple[Patch, dict[str, torch.Tensor]]:
    """A patch changing `keys` by RoseLoRA-shaped deltas (1-D tensors: a few entries), and the patched tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors, patched = {}, {}
    for key in keys:
        base = state[key]
        if base.dim() == 2:
            new = base + rose_delta(tuple(base.shape), gen=gen, scale=scale).to(base.dtype)
        else:
            new = base.clone()
            new.view(-1)[torch.randperm(base.numel(), generator=gen)[:3]] += scale
        tp = tensor_patch_from_pair(key, base, new)
        assert tp is not None
        tensors[key], patched[key] = tp, new
    return Patch(tensors, {"test": "synthetic"}), patched


def reference_logits(model_dir: Path, patched: dict[str, torch.Tensor], inputs: dict[str, np.ndarray],
                     task: str = "causal-lm") -> np.ndarray:
    """Logits of the PyTorch model with `patched` tensors merged in (tied weights follow their storage)."""
    from roselora_export.models import load_model

    model = load_model(model_dir, task=task)
    with torch.no_grad():
        sd = model.state_dict()
        for key, value in patched.items():
            sd[key].copy_(value)
        kwargs = {"use_cache": False} if task == "causal-lm" else {}
        return model(input_ids=torch.from_numpy(inputs["input_ids"]),
                     attention_mask=torch.from_numpy(inputs["attention_mask"]), **kwargs).logits.numpy()


def example_inputs(vocab: int, batch: int = 2, seq: int = 9, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(vocab, 1000), size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(session, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return session.run(["logits"], inputs)[0]


def masked_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Max abs difference over real (unpadded) positions; per-sequence logits compare whole."""
    if a.ndim == 3:
        keep = mask.astype(bool)
        return float(np.abs(a[keep] - b[keep]).max())
    return float(np.abs(a - b).max())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dir_fingerprint(root: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(Path(root).iterdir()) if p.is_file()}
