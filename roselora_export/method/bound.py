"""Proposition 1: a lower bound on the sparsity of BA from the sparsity of A's rows and B's columns."""
from __future__ import annotations

import torch


def sparsity(t: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return 1.0 - int(torch.count_nonzero(t)) / t.numel() if t.numel() else 1.0


@torch.no_grad()
def prop1_sparsity_bound(A: torch.Tensor, B: torch.Tensor) -> float:
    """max{0, 1 + sum_i (s(A_i*) + s(B_*i) - s(A_i*) s(B_*i)) - r} for A (r x d2) and B (d1 x r)."""
    s_a = (A == 0).double().mean(dim=1)  # per row of A
    s_b = (B == 0).double().mean(dim=0)  # per column of B
    r = A.shape[0]
    return max(0.0, float(1.0 + (s_a + s_b - s_a * s_b).sum() - r))


def density_bound(rank: int, tau: float) -> float:
    """With every row/column at kept fraction tau: density(BA) <= r * tau^2 (capped at 1)."""
    return min(1.0, rank * tau * tau)
