"""The cubic kept-fraction schedule tau(t) of RoseLoRA (the same shape as AdaLoRA's budget schedule)."""
from __future__ import annotations


def kept_fraction(t: int, tau: float, t_init: int, t_final: int) -> float:
    """tau(t): 1 up to t_i, then tau + (1 - tau)(1 - (t - t_i)/(t_f - t_i))^3, and tau from t_f on."""
    if t <= t_init:
        return 1.0
    if t >= t_final:
        return float(tau)
    progress = (t - t_init) / (t_final - t_init)
    return float(tau + (1.0 - tau) * (1.0 - progress) ** 3)
