"""PatchRuntime's staging cache: re-applying the same Patch object reuses its staging, never its checks' verdicts blindly."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from roselora_export.errors import InputError
from roselora_export.patch.model import sha256_tensor
from roselora_export.runtime import PatchRuntime, live as runtime_live
from test_runtime_helpers import TIED, device, live, random_patch, state_hash  # noqa: F401
from tiny_models import tiny_llama

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"


@pytest.fixture
def stage_calls(monkeypatch) -> list:
    calls = []
    real = runtime_live.stage

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime_live, "stage", counting)
    return calls


def _patched(model, patch) -> bool:
    return all(sha256_tensor(live(model, name)) == tp.patched_sha256 for name, tp in patch.tensors.items())


def test_reapplying_the_same_patch_object_stages_it_once_and_stays_exact(device, stage_calls):
    model = tiny_llama().to(device)
    base = state_hash(model)
    patch = random_patch(model, [Q0, V1, TIED[1]], np.random.default_rng(0))
    rt = PatchRuntime(model)
    for _ in range(3):
        rt.apply(patch)
        assert _patched(model, patch)
        rt.revert()
        assert state_hash(model) == base
    assert len(stage_calls) == 1


def test_a_cached_patch_is_refused_when_a_touched_base_value_changed(device, stage_calls):
    model = tiny_llama().to(device)
    patch = random_patch(model, [Q0, V1], np.random.default_rng(1))
    rt = PatchRuntime(model)
    rt.revert(rt.apply(patch))
    with torch.no_grad():  # a change outside the runtime, at one element the patch touches
        live(model, V1).view(-1)[int(patch.tensors[V1].flat_index[-1])] += 1.0
    changed = state_hash(model)
    with pytest.raises(InputError, match=f"{V1}: the live values .* do not match the patch's base fingerprint"):
        rt.apply(patch)
    assert state_hash(model) == changed and rt.active == []


def test_a_cached_patch_is_restaged_when_its_tensor_was_reallocated(device, stage_calls):
    model = tiny_llama().to(device)
    patch = random_patch(model, [Q0], np.random.default_rng(2))
    rt = PatchRuntime(model)
    rt.revert(rt.apply(patch))
    param = live(model, Q0)
    param.data = param.data.clone()  # same Parameter object, new storage
    rt.apply(patch)
    assert _patched(model, patch) and len(stage_calls) == 2


def test_replacing_a_tensor_patch_in_a_cached_patch_is_noticed(device, stage_calls):
    model = tiny_llama().to(device)
    base = state_hash(model)
    patch = random_patch(model, [Q0], np.random.default_rng(3))
    rt = PatchRuntime(model)
    rt.revert(rt.apply(patch))
    tp = patch.tensors[Q0]
    xor = tp.xor_bits.copy()
    bits = live(model, Q0).detach().cpu().view(torch.int32).view(-1).numpy().view(np.uint32)
    xor[0] = bits[tp.flat_index[0]] ^ np.uint32(0x7FC00000)  # patched value: NaN
    patch.tensors[Q0] = dataclasses.replace(tp, xor_bits=xor)
    with pytest.raises(InputError, match="NaN or Inf"):
        rt.apply(patch)
    assert state_hash(model) == base and len(stage_calls) == 2


def test_an_unverified_apply_of_a_cached_patch_still_refuses_nan(device):
    model = tiny_llama().to(device)
    patch = random_patch(model, [Q0], np.random.default_rng(4))
    rt = PatchRuntime(model)
    rt.revert(rt.apply(patch))
    idx = int(patch.tensors[Q0].flat_index[0])
    with torch.no_grad():  # a base that, XORed with the patch, gives NaN
        flat = live(model, Q0).view(-1).view(torch.int32)
        flat[idx] = int(np.int32(np.uint32(0x7FC00000) ^ patch.tensors[Q0].xor_bits[0]))
    changed = state_hash(model)
    with pytest.raises(InputError, match="NaN or Inf"):
        rt.apply(patch, verify=False)
    assert state_hash(model) == changed


def test_the_staging_of_a_garbage_collected_patch_is_dropped(device):
    import gc
    import weakref

    model = tiny_llama().to(device)
    patch = random_patch(model, [Q0], np.random.default_rng(5))
    rt = PatchRuntime(model)
    rt.revert(rt.apply(patch))
    staged = weakref.ref(rt._stage_cache[id(patch)].staged)
    del patch
    gc.collect()
    assert rt._stage_cache == {} and staged() is None


def test_a_patch_over_the_cache_budget_is_staged_at_every_apply(device, stage_calls, monkeypatch):
    monkeypatch.setattr(runtime_live, "STAGE_CACHE_BYTES", 0)
    model = tiny_llama().to(device)
    base = state_hash(model)
    patch = random_patch(model, [Q0], np.random.default_rng(6))
    rt = PatchRuntime(model)
    for _ in range(2):
        rt.revert(rt.apply(patch))
    assert len(stage_calls) == 2 and state_hash(model) == base
