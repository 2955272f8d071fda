"""Train an edit against the weights it will ship as: round(W0 + BA·s) in the deploy dtype.

Merged into a bf16 or fp16 checkpoint, a delta smaller than half a rounding step of its weight
vanishes, and one just past it moves the weight by a whole step. Inside `rounded_lora_forward`
every adapted module computes with exactly those shipped values, and the gradient passes through the
rounding unchanged (a straight-through estimator), so training pushes the deltas that matter past
the rounding threshold and sees the size of the step they take. LoRA dropout is off in this mode: a
dropped-out input has no merged weight to round.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F

from ..core.dtypes import torch_dtype


def round_weights_(model: torch.nn.Module, dtype_name: str) -> None:
    """Round every floating-point parameter to the values `dtype_name` can store (kept in its own dtype): an fp32
    checkpoint that will ship in half precision, as shipped."""
    dtype = torch_dtype(dtype_name)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point and p.dtype != dtype:
                p.copy_(p.to(dtype).to(p.dtype))


def _shipped_weight(layer, adapter: str, dtype: torch.dtype) -> torch.Tensor:
    """W0 + delta with the forward value of round(W0 + delta) and the gradient of W0 + delta."""
    base = layer.get_base_layer().weight
    delta = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight * layer.scaling[adapter]
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T  # GPT-2 Conv1D stores [in, out]
    merged = base.float() + delta.float()
    shipped = merged.to(dtype).float()
    return merged + (shipped - merged).detach()


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.get_base_layer()
    weight = _shipped_weight(self, self.active_adapters[0], self._deploy_dtype).to(x.dtype)
    if getattr(self, "fan_in_fan_out", False):
        out = x @ weight
        return out + base.bias if base.bias is not None else out
    return F.linear(x, weight, base.bias)


@contextlib.contextmanager
def rounded_lora_forward(peft_model: torch.nn.Module, dtype_name: str | None) -> Iterator[None]:
    """Within the block every LoRA layer computes with its shipped weight in `dtype_name` (None or fp32: no change)."""
    from peft.tuners.lora import LoraLayer

    if dtype_name in (None, "fp32"):
        yield
        return
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and m.lora_A]
    for layer in layers:
        layer._deploy_dtype = torch_dtype(dtype_name)
        layer.forward = types.MethodType(_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
            del layer._deploy_dtype
