"""PatchRuntime on a live model: apply/revert exactness, tied weights, the overlap rule, bad input."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from roselora_export.errors import InputError
from roselora_export.patch.model import Patch
from roselora_export.runtime import PatchRuntime, live as runtime_live
from test_runtime_helpers import DTYPES, TIED, device, live, random_patch, state_hash  # noqa: F401
from tiny_models import tiny_llama

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
NORM = "model.norm.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"


def _model(device, dtype=torch.float32, seed=0):
    return tiny_llama(seed=seed).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_apply_writes_the_patched_bits_and_revert_restores_the_base_bits(device, dtype):
    model = _model(device, dtype)
    base = state_hash(model)
    patch = random_patch(model, [Q0, V1, NORM], np.random.default_rng(1))
    rt = PatchRuntime(model)
    rt.apply(patch)
    for name, tp in patch.tensors.items():
        from roselora_export.patch.model import sha256_tensor
        assert sha256_tensor(live(model, name)) == tp.patched_sha256
    rt.revert()
    assert state_hash(model) == base
    assert rt.active == []


def test_active_lists_applied_patches_with_their_provenance(device):
    model = _model(device)
    rt = PatchRuntime(model)
    h1 = rt.apply(random_patch(model, [Q0], np.random.default_rng(2), provenance={"edit": "a"}))
    h2 = rt.apply(random_patch(model, [V1], np.random.default_rng(3), provenance={"edit": "b"}))
    assert [h.provenance["edit"] for h in rt.active] == ["a", "b"]
    assert rt.active == [h1, h2] and h1.names == (Q0,) and h1.nnz > 0


def test_applied_context_reverts_on_exit_even_after_an_error(device):
    model = _model(device)
    base = state_hash(model)
    rt = PatchRuntime(model)
    with pytest.raises(ZeroDivisionError):
        with rt.applied(random_patch(model, [Q0], np.random.default_rng(4))):
            assert state_hash(model) != base
            1 / 0
    assert state_hash(model) == base and rt.active == []


@pytest.mark.parametrize("name", TIED)
def test_a_patch_naming_either_tied_key_patches_the_shared_tensor_once(device, name):
    model = _model(device)
    base = state_hash(model)
    rt = PatchRuntime(model)
    rt.apply(random_patch(model, [name], np.random.default_rng(5)))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert state_hash(model) != base
    rt.revert()
    assert state_hash(model) == base


def test_patches_on_the_two_tied_names_overlap_like_one_tensor(device):
    model = _model(device)
    rt = PatchRuntime(model)
    first = rt.apply(random_patch(model, [TIED[0]], np.random.default_rng(6), frac=0.5))
    rt.apply(random_patch(model, [TIED[1]], np.random.default_rng(7), frac=0.5))
    with pytest.raises(InputError, match="revert #2 first"):
        rt.revert(first)


def test_a_patch_naming_both_tied_keys_is_refused(device):
    model = _model(device)
    a = random_patch(model, [TIED[0]], np.random.default_rng(8))
    b = random_patch(model, [TIED[1]], np.random.default_rng(9))
    both = Patch(tensors={**a.tensors, **b.tensors})
    with pytest.raises(InputError, match="tied"):
        PatchRuntime(model).apply(both)


def test_an_overlapping_patch_built_on_top_is_accepted_and_reverts_lifo(device):
    model = _model(device)
    base = state_hash(model)
    rt = PatchRuntime(model)
    rt.apply(random_patch(model, [Q0], np.random.default_rng(10), frac=0.5))
    after_first = state_hash(model)
    rt.apply(random_patch(model, [Q0], np.random.default_rng(11), frac=0.5))  # built on the patched values
    rt.revert()
    assert state_hash(model) == after_first
    rt.revert()
    assert state_hash(model) == base


def test_an_overlapping_patch_built_on_the_old_base_is_refused(device):
    model = _model(device)
    stale = random_patch(model, [Q0], np.random.default_rng(12), frac=0.5)
    rt = PatchRuntime(model)
    rt.apply(random_patch(model, [Q0], np.random.default_rng(13), frac=0.5))
    before = state_hash(model)
    with pytest.raises(InputError, match="overlaps active patch"):
        rt.apply(stale)
    assert state_hash(model) == before and len(rt.active) == 1


def test_reverting_a_patch_under_a_later_overlapping_one_is_refused(device):
    model = _model(device)
    rt = PatchRuntime(model)
    first = rt.apply(random_patch(model, [Q0], np.random.default_rng(14), frac=0.5))
    rt.apply(random_patch(model, [Q0], np.random.default_rng(15), frac=0.5))
    before = state_hash(model)
    with pytest.raises(InputError, match="overlaps it"):
        rt.revert(first)
    assert state_hash(model) == before and len(rt.active) == 2


def test_non_overlapping_patches_revert_in_any_order(device):
    model = _model(device)
    base = state_hash(model)
    rt = PatchRuntime(model)
    first = rt.apply(random_patch(model, [Q0], np.random.default_rng(16)))
    rt.apply(random_patch(model, [V1], np.random.default_rng(17)))
    rt.revert(first)
    rt.revert()
    assert state_hash(model) == base


def test_revert_refuses_weights_changed_outside_the_runtime(device):
    model = _model(device)
    rt = PatchRuntime(model)
    patch = random_patch(model, [Q0], np.random.default_rng(18))
    rt.apply(patch)
    first = int(patch.tensors[Q0].flat_index[0])
    with torch.no_grad():
        live(model, Q0).view(-1)[first] += 1.0
    with pytest.raises(InputError, match="changed outside"):
        rt.revert()


def test_revert_with_nothing_applied_is_refused(device):
    with pytest.raises(InputError, match="nothing to revert"):
        PatchRuntime(_model(device)).revert()


def test_a_patch_for_another_model_is_refused_and_the_model_is_untouched(device):
    model = _model(device)
    other = _model(device, seed=1)
    patch = random_patch(other, [Q0, V1], np.random.default_rng(19))
    base = state_hash(model)
    with pytest.raises(InputError, match="base fingerprint"):
        PatchRuntime(model).apply(patch)
    assert state_hash(model) == base


def test_a_patch_failing_its_check_on_the_last_tensor_writes_nothing(device):
    model = _model(device)
    base = state_hash(model)
    good = random_patch(model, [Q0, V1], np.random.default_rng(20))
    bad = random_patch(_model(device, seed=3), [DOWN1], np.random.default_rng(21))
    rt = PatchRuntime(model)
    with pytest.raises(InputError, match=DOWN1):
        rt.apply(Patch(tensors={**good.tensors, **bad.tensors}))
    assert state_hash(model) == base and rt.active == []


def _two_dtypes(model):
    """The model with its final norm in fp16: a patch on it has two dtypes, so at least two writes per pass."""
    model.model.norm.to(torch.float16)
    return model


def test_a_write_failing_halfway_restores_the_tensors_already_written(device, monkeypatch):
    model = _two_dtypes(_model(device))
    base = state_hash(model)
    patch = random_patch(model, [Q0, V1, NORM], np.random.default_rng(22))
    calls = []
    real_write = runtime_live._write

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device error")
        real_write(*args)

    monkeypatch.setattr(runtime_live, "_write", flaky)
    rt = PatchRuntime(model)
    with pytest.raises(RuntimeError, match="device error"):
        rt.apply(patch)
    assert state_hash(model) == base and rt.active == []


def _edit(patch: Patch, name: str, **changes) -> Patch:
    tensors = dict(patch.tensors)
    tensors[name] = dataclasses.replace(tensors[name], **changes)
    return Patch(tensors=tensors, provenance=patch.provenance)


def test_an_index_outside_the_tensor_is_refused(device):
    model = _model(device)
    base = state_hash(model)
    patch = random_patch(model, [Q0, V1], np.random.default_rng(23))
    idx = patch.tensors[V1].flat_index.copy()
    idx[-1] = patch.tensors[V1].numel
    with pytest.raises(InputError, match=f"{V1}: patch indices are out of range"):
        PatchRuntime(model).apply(_edit(patch, V1, flat_index=idx))
    assert state_hash(model) == base


def test_indices_not_strictly_increasing_are_refused(device):
    model = _model(device)
    patch = random_patch(model, [Q0], np.random.default_rng(24))
    idx = patch.tensors[Q0].flat_index.copy()
    idx[1] = idx[0]
    with pytest.raises(InputError, match="strictly increasing"):
        PatchRuntime(model).apply(_edit(patch, Q0, flat_index=idx))


def test_a_dtype_mismatch_is_refused(device):
    model = _model(device)
    patch = random_patch(_model(device, torch.float16), [Q0], np.random.default_rng(25))
    with pytest.raises(InputError, match="dtype F16 does not match"):
        PatchRuntime(model).apply(patch)


def test_a_shape_mismatch_is_refused(device):
    model = _model(device)
    patch = random_patch(tiny_llama(hidden_size=64).to(device), [Q0], np.random.default_rng(26))
    with pytest.raises(InputError, match="shape"):
        PatchRuntime(model).apply(patch)


def test_an_unknown_tensor_name_is_refused(device):
    model = _model(device)
    patch = random_patch(model, [Q0], np.random.default_rng(27))
    patch.tensors["model.layers.9.mlp.gate_proj.weight"] = dataclasses.replace(
        patch.tensors[Q0], name="model.layers.9.mlp.gate_proj.weight")
    with pytest.raises(InputError, match="not in the live model"):
        PatchRuntime(model).apply(patch)


def test_a_patch_that_would_write_nan_is_refused(device):
    model = _model(device)
    base = state_hash(model)
    patch = random_patch(model, [Q0], np.random.default_rng(28))
    tp = patch.tensors[Q0]
    xor = tp.xor_bits.copy()
    bits = live(model, Q0).detach().cpu().view(torch.int32).view(-1).numpy().view(np.uint32)
    xor[0] = bits[tp.flat_index[0]] ^ np.uint32(0x7FC00000)  # patched value: NaN
    with pytest.raises(InputError, match="NaN or Inf"):
        PatchRuntime(model).apply(_edit(patch, Q0, xor_bits=xor))
    assert state_hash(model) == base


def test_a_patch_for_another_config_is_refused(device):
    from roselora_export import patch as patch_pkg

    model = _model(device)
    other = tiny_llama(num_hidden_layers=3)
    patch = random_patch(model, [Q0], np.random.default_rng(29),
                         provenance={"base_config_sha256": patch_pkg.config_fingerprint(other.config.to_dict())})
    with pytest.raises(InputError, match="config"):
        PatchRuntime(model).apply(patch)


def test_apply_inside_serving_on_the_same_thread_raises_instead_of_deadlocking(device):
    model = _model(device)
    rt = PatchRuntime(model)
    patch = random_patch(model, [Q0], np.random.default_rng(30))
    with rt.serving(), pytest.raises(RuntimeError, match="deadlock"):
        rt.apply(patch)
    assert rt.active == []


def test_a_write_failing_after_writing_its_elements_is_taken_back_too(device, monkeypatch):
    model = _model(device)
    base = state_hash(model)
    patch = random_patch(model, [Q0, V1, NORM], np.random.default_rng(23))
    real_write = runtime_live._write
    calls = []

    def fails_after_writing(*args):  # the first write does its work, then reports an error
        calls.append(1)
        real_write(*args)
        if len(calls) == 1:
            raise RuntimeError("device error")

    monkeypatch.setattr(runtime_live, "_write", fails_after_writing)
    rt = PatchRuntime(model)
    with pytest.raises(RuntimeError, match="device error"):
        rt.apply(patch)
    assert state_hash(model) == base and rt.active == []


def test_a_revert_failing_halfway_leaves_the_patch_applied_whole(device, monkeypatch):
    model = _two_dtypes(_model(device))
    rt = PatchRuntime(model)
    handle = rt.apply(random_patch(model, [Q0, V1, NORM], np.random.default_rng(31)))
    patched = state_hash(model)
    calls = []
    real_write = runtime_live._write

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device error")
        real_write(*args)

    monkeypatch.setattr(runtime_live, "_write", flaky)
    with pytest.raises(RuntimeError, match="device error"):
        rt.revert(handle)
    assert state_hash(model) == patched and rt.active == [handle]


def test_revert_without_the_check_restores_the_base_bits(device):
    model = _model(device)
    base = state_hash(model)
    rt = PatchRuntime(model)
    rt.apply(random_patch(model, [Q0, TIED[1]], np.random.default_rng(32)))
    rt.revert(check=False)
    assert state_hash(model) == base


def test_large_patches_pack_and_hash_on_threads_with_the_same_result(device, monkeypatch):
    from roselora_export.runtime import staging

    monkeypatch.setattr(staging, "PARALLEL_BYTES", 0)  # every patch counts as large
    model = _model(device)
    base = state_hash(model)
    rt = PatchRuntime(model)
    rt.apply(random_patch(model, [Q0, V1, DOWN1], np.random.default_rng(33)))
    with pytest.raises(InputError, match=DOWN1):
        rt.apply(random_patch(_model(device, seed=9), [DOWN1], np.random.default_rng(34)))
    rt.revert()
    assert state_hash(model) == base


def test_a_second_runtime_on_a_model_with_applied_patches_is_refused(device):
    model = _model(device)
    rt = PatchRuntime(model)
    rt.apply(random_patch(model, [Q0], np.random.default_rng(35)))
    with pytest.raises(InputError, match="already has a PatchRuntime"):
        PatchRuntime(model)
    rt.revert()
    PatchRuntime(model)  # fine once nothing is applied


def test_reverting_the_same_handle_twice_is_refused(device):
    model = _model(device)
    rt = PatchRuntime(model)
    handle = rt.apply(random_patch(model, [Q0], np.random.default_rng(36)))
    rt.revert(handle)
    with pytest.raises(InputError, match="not applied"):
        rt.revert(handle)
