"""One gather and one scatter per tensor, on a view of its own storage: tensors that share memory, call counts,
autograd version counters."""
from __future__ import annotations

import numpy as np
import torch

from roselora_export.patch.model import Patch, sha256_tensor, tensor_patch_from_pair
from roselora_export.runtime import PatchRuntime, live as runtime_live
from test_runtime_helpers import state_hash
from tiny_models import tiny_llama

MATRICES = [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in ("q", "k", "v", "o")]


def _model(device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(seed=seed).to(device=device, dtype=dtype)
    if dtype == torch.float32:
        model.model.norm.to(torch.float16)  # a second dtype in the same patch
    return model


def _counting(monkeypatch) -> dict[str, int]:
    calls = {"gather": 0, "write": 0}
    real_gather, real_write = runtime_live.gather, runtime_live._write

    def gather(*args):
        calls["gather"] += 1
        real_gather(*args)

    def write(*args):
        calls["write"] += 1
        real_write(*args)

    monkeypatch.setattr(runtime_live, "gather", gather)
    monkeypatch.setattr(runtime_live, "_write", write)
    return calls


def _patch_on(model, names: list[str], rng: np.random.Generator, frac: float) -> Patch:
    """A patch built on the model's current values (so it stacks on whatever is applied)."""
    live = dict(model.named_parameters(remove_duplicate=False))
    tensors = {}
    for name in names:
        base = live[name].detach().cpu()
        k = max(1, int(frac * base.numel()))
        idx = torch.from_numpy(np.sort(rng.choice(base.numel(), size=k, replace=False)))
        patched = base.clone()
        patched.view(-1)[idx] = (base.view(-1)[idx].float() * 1.5 + 0.25).to(base.dtype)
        tp = tensor_patch_from_pair(name, base, patched)
        if tp is not None:
            tensors[name] = tp
    return Patch(tensors=tensors)


class _SharedMemory(torch.nn.Module):
    """Two parameters over one storage, overlapping in memory: `b` is a window into `a`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        w = torch.randn(64, 64)
        self.a = torch.nn.Parameter(w)
        self.b = torch.nn.Parameter(w.view(-1)[1024:1536].view(16, 32))


def test_tensors_that_share_memory_are_written_one_by_one_and_revert_exactly(monkeypatch):
    model = _SharedMemory()
    assert model.a.data_ptr() < model.b.data_ptr() < model.a.data_ptr() + model.a.numel() * 4
    base = state_hash(model)
    a2, b2 = model.a.detach().clone(), model.b.detach().clone()
    a2.view(-1)[:512] += 1.0  # elements of `a` outside `b`'s window
    b2[3] -= 1.0
    patch = Patch(tensors={"a": tensor_patch_from_pair("a", model.a.detach(), a2),
                           "b": tensor_patch_from_pair("b", model.b.detach(), b2)})
    calls = _counting(monkeypatch)
    rt = PatchRuntime(model)
    handle = rt.apply(patch)
    assert calls == {"gather": 2, "write": 2}
    assert torch.equal(model.a.detach().view(-1)[:512], a2.view(-1)[:512]) and torch.equal(model.b.detach(), b2)
    rt.revert(handle)
    assert state_hash(model) == base


def test_each_tensor_is_one_gather_and_one_write_per_pass(monkeypatch):
    model = _model("cpu", torch.float32)
    base = state_hash(model)
    patch = _patch_on(model, MATRICES, np.random.default_rng(3), 0.1)
    calls = _counting(monkeypatch)
    rt = PatchRuntime(model)
    handle = rt.apply(patch)
    assert calls == {"gather": len(MATRICES), "write": len(MATRICES)}
    live = dict(model.named_parameters())
    assert all(sha256_tensor(live[n]) == tp.patched_sha256 for n, tp in patch.tensors.items())
    rt.revert(handle)
    assert state_hash(model) == base


def test_writes_bump_each_touched_parameter_version_like_in_place_writes():
    """Autograd must see the weights as changed, as with any in-place write: a stale backward is refused."""
    import torch

    from roselora_export.patch.model import Patch, tensor_patch_from_pair
    from roselora_export.runtime import PatchRuntime

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    tensors = {}
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            target = p.detach().clone()
            target[0, 0] += 1
            tensors[name] = tensor_patch_from_pair(name, p.detach(), target)
    before = {name: p._version for name, p in model.named_parameters()}
    handle = PatchRuntime(model).apply(Patch(tensors=tensors))
    assert handle is not None
    for name, p in model.named_parameters():
        assert (p._version > before[name]) == (name in tensors), name
