"""Importance EMA, row/column pruning, and the Proposition 1 bound, on tiny Llama, GPT-2 and BERT."""
import math

import pytest
import torch

from roselora_export.method import RoseLoraConfig, RoseLoraPruner, prop1_sparsity_bound, sparsity, wrap_with_lora
from roselora_export.method.pruner import prune_

from tiny_models import tiny_bert, tiny_gpt2, tiny_llama




def test_prune_keeps_top_k_of_every_row_at_once():
    p = torch.arange(1.0, 13.0).reshape(3, 4)
    prune_(p, p.abs(), 2, dim=1)
    assert p.tolist() == [[0, 0, 3, 4], [0, 0, 7, 8], [0, 0, 11, 12]]


def test_prune_keeps_top_k_of_every_column_at_once():
    p = torch.tensor([[1.0, 9.0], [5.0, 2.0], [3.0, 4.0]])
    prune_(p, p.abs(), 1, dim=0)
    assert p.tolist() == [[0, 9], [5, 0], [0, 0]]


def test_prune_ranks_by_score_not_by_magnitude():
    p = torch.tensor([[10.0, 1.0, 1.0]])
    prune_(p, torch.tensor([[0.0, 2.0, 1.0]]), 1, dim=1)
    assert p.tolist() == [[0, 1, 0]]


def test_prop1_bound_of_the_papers_dense_example_is_zero():
    # A = [a^T; 0], B = [b, 0]: each half zeros, yet BA = b a^T is dense.
    a, b = torch.ones(6), torch.ones(5)
    A = torch.stack([a, torch.zeros(6)])
    B = torch.stack([b, torch.zeros(5)], dim=1)
    assert prop1_sparsity_bound(A, B) == 0.0
    assert sparsity(B @ A) == 0.0


def test_prop1_bound_with_kept_fraction_tau_is_one_minus_r_tau_squared():
    r, d = 4, 100
    A = torch.zeros(r, d)
    B = torch.zeros(d, r)
    A[:, :10] = 1.0
    B[:10, :] = 1.0
    assert prop1_sparsity_bound(A, B) == pytest.approx(1 - r * 0.1 * 0.1)


def test_importance_ema_takes_the_first_step_as_is_then_smooths():
    model = wrap_with_lora(tiny_llama(), RoseLoraConfig(rank=2))
    pruner = RoseLoraPruner(model, RoseLoraConfig(rank=2, beta=0.8))
    A = pruner.pairs[0].A
    A.grad = torch.ones_like(A)
    pruner._importance(A)
    first = pruner.ema[id(A)].clone()
    assert torch.equal(first, A.detach().abs())
    A.grad = torch.zeros_like(A)
    pruner._importance(A)
    assert torch.allclose(pruner.ema[id(A)], 0.8 * first)


def _train_random(model, targets, steps=12, tau=0.1, rank=4, classify=False):
    cfg = RoseLoraConfig(rank=rank, targets=targets, tau=tau, t_init=2, t_final=8, steps=steps, lr=1e-2,
                         clamp=None, early_stop_loss=None)
    peft_model = wrap_with_lora(model, cfg)
    pruner = RoseLoraPruner(peft_model, cfg)
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    peft_model.train()
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 10), generator=g)
        out = peft_model(input_ids=ids, labels=torch.tensor([0, 1]) if classify else ids)
        out.loss.backward()
        opt.step()
        pruner.step()
        opt.zero_grad()
    pruner.finalize()
    return cfg, pruner


CASES = {
    "llama": (tiny_llama, ("q_proj", "v_proj"), False),
    "gpt2": (tiny_gpt2, ("c_attn",), False),
    "bert": (tiny_bert, ("query", "value"), True),
}


@pytest.mark.parametrize("arch", CASES)
def test_after_training_every_row_of_A_and_column_of_B_keeps_at_most_ceil_tau_d(arch):
    build, targets, classify = CASES[arch]
    cfg, pruner = _train_random(build(), targets, classify=classify)
    assert pruner.pairs
    for pair in pruner.pairs:
        assert int((pair.A != 0).sum(dim=1).max()) <= math.ceil(cfg.tau * pair.A.shape[1])
        assert int((pair.B != 0).sum(dim=0).max()) <= math.ceil(cfg.tau * pair.B.shape[0])
        assert int((pair.A != 0).sum()) > 0 and int((pair.B != 0).sum()) > 0


@pytest.mark.parametrize("arch", CASES)
def test_measured_sparsity_of_BA_is_at_least_the_prop1_bound_on_every_module(arch):
    build, targets, classify = CASES[arch]
    _, pruner = _train_random(build(), targets, classify=classify)
    for pair in pruner.pairs:
        bound = prop1_sparsity_bound(pair.A.detach(), pair.B.detach())
        assert bound > 0.5
        assert sparsity(pair.B.detach() @ pair.A.detach()) >= bound


def test_finalize_reaches_tau_even_when_training_stops_before_t_final():
    cfg, pruner = _train_random(tiny_llama(), ("q_proj",), steps=3, tau=0.1)
    for pair in pruner.pairs:
        assert int((pair.A != 0).sum(dim=1).max()) <= cfg.kept_count(pair.A.shape[1])


def test_clamp_bounds_every_A_and_B_entry():
    model = wrap_with_lora(tiny_llama(), RoseLoraConfig(rank=2))
    cfg = RoseLoraConfig(rank=2, clamp=1e-3)
    pruner = RoseLoraPruner(model, cfg)
    pruner.step()
    for pair in pruner.pairs:
        limit = torch.tensor(1e-3, dtype=pair.A.dtype)  # the clamp value as stored in fp32
        assert bool(pair.A.detach().abs().max() <= limit) and bool(pair.B.detach().abs().max() <= limit)
        assert bool(pair.A.detach().abs().max() == limit)  # kaiming-initialised A entries exceed it before
