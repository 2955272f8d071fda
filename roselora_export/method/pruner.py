"""The RoseLoRA step: sensitivity importance with an EMA, then row-wise (A) and column-wise (B) top-k pruning.

One implementation, used by the plain PyTorch loops in `edit/` and by the `transformers` callback.
Call `step()` after every optimizer step, before the gradients are zeroed, and `finalize()` once after
the last one, so that the saved adapter meets the constraint exactly. Everything is vectorised over
rows and columns (one topk per matrix); the only Python loop is over the adapted modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RoseLoraConfig
from .schedule import kept_fraction

ADAPTER = "default"


@dataclass
class LoraPair:
    """One adapted module: its PEFT name, its base state-dict key and its A (r x d2) and B (d1 x r) weights."""

    name: str
    base_key: str
    A: torch.nn.Parameter
    B: torch.nn.Parameter
    scaling: float
    fan_in_fan_out: bool


def lora_pairs(model: torch.nn.Module, adapter: str = ADAPTER) -> list[LoraPair]:
    """The LoRA (A, B) pairs of a PEFT model, in module order."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            pairs.append(LoraPair(
                name=name,
                base_key=base_key_of(name),
                A=module.lora_A[adapter].weight,
                B=module.lora_B[adapter].weight,
                scaling=float(module.scaling[adapter]),
                fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
            ))
    return pairs


def base_key_of(peft_module_name: str) -> str:
    """PEFT module name -> the base model's weight key (drops PEFT's wrapper prefixes, adds .weight)."""
    name = peft_module_name
    for prefix in ("module.", "base_model.model."):  # DDP wrapper, then PeftModel wrapper
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name + ".weight"


@torch.no_grad()
def prune_(p: torch.Tensor, score: torch.Tensor, k: int, dim: int) -> None:
    """Zero all but the k highest-score entries of every slice along `dim` (dim=1: rows, dim=0: columns)."""
    if k >= p.shape[dim]:
        return
    keep = torch.zeros_like(p, dtype=torch.bool).scatter_(dim, score.topk(k, dim=dim, sorted=False).indices, True)
    p.masked_fill_(~keep, 0.0)


class RoseLoraPruner:
    """Keeps the importance EMA of every A and B entry and prunes them on the cubic schedule."""

    def __init__(self, model: torch.nn.Module, config: RoseLoraConfig, total_steps: int | None = None):
        self.config = config
        self.pairs = lora_pairs(model)
        if not self.pairs:
            raise ValueError("the model has no LoRA layers to prune (wrap it with peft.get_peft_model first)")
        self.t_init, self.t_final = config.schedule_steps(total_steps)
        self.t = 0
        self.ema: dict[int, torch.Tensor] = {}

    def fraction(self, t: int | None = None) -> float:
        """tau(t) for step t (default: the current step)."""
        return kept_fraction(self.t if t is None else t, self.config.tau, self.t_init, self.t_final)

    @torch.no_grad()
    def _importance(self, p: torch.Tensor) -> torch.Tensor:
        """Smoothed sensitivity: EMA_beta of |p * grad|; the first step takes |p * grad| as is."""
        imp = (p * p.grad).abs_() if p.grad is not None else torch.zeros_like(p)
        prev = self.ema.get(id(p))
        if prev is None:
            self.ema[id(p)] = imp
        else:
            prev.mul_(self.config.beta).add_(imp, alpha=1.0 - self.config.beta)
        return self.ema[id(p)]

    @torch.no_grad()
    def _prune_all(self, fraction: float) -> None:
        cfg = self.config
        for pair in self.pairs:
            A, B = pair.A, pair.B
            if fraction < 1.0:
                prune_(A, self.ema.get(id(A), A.abs()), cfg.kept_count(A.shape[1], fraction), dim=1)
                prune_(B, self.ema.get(id(B), B.abs()), cfg.kept_count(B.shape[0], fraction), dim=0)
            if cfg.clamp is not None:
                A.clamp_(-cfg.clamp, cfg.clamp)
                B.clamp_(-cfg.clamp, cfg.clamp)

    @torch.no_grad()
    def step(self) -> float:
        """After optimizer step t: update the importance EMA, prune to tau(t), clamp. Returns tau(t)."""
        self.t += 1
        for pair in self.pairs:
            self._importance(pair.A)
            self._importance(pair.B)
        fraction = self.fraction()
        self._prune_all(fraction)
        return fraction

    @torch.no_grad()
    def finalize(self) -> None:
        """The last prune, at the final kept fraction tau, whatever step training stopped at."""
        self._prune_all(self.config.tau)

    def masks(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Nonzero masks of (A, B) by base key, e.g. to compare ranks in distributed training."""
        return {p.base_key: (p.A != 0, p.B != 0) for p in self.pairs}
