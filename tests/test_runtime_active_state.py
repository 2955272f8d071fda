"""`PatchRuntime.active` moves with the weights (under the write lock), and `blocking` names what stops a revert."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from roselora_export.runtime import PatchRuntime
from test_runtime_helpers import random_patch
from tiny_models import tiny_llama

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"


def _record_active_at_write_release(runtime: PatchRuntime) -> list[list[int]]:
    """Wrap the serving lock's write(): what `active` says at the moment each write releases the lock."""
    seen: list[list[int]] = []
    write = runtime.lock.write

    @contextmanager
    def recording_write():
        with write():
            yield
            seen.append([h.id for h in runtime.active])

    runtime.lock.write = recording_write
    return seen


def test_active_names_a_patch_before_readers_can_see_its_weights():
    model = tiny_llama()
    runtime = PatchRuntime(model)
    seen = _record_active_at_write_release(runtime)
    handle = runtime.apply(random_patch(model, [Q0], np.random.default_rng(0)))
    # The lock is released with the patch already listed: a reader that enters next sees both or neither.
    assert seen == [[handle.id]]
    runtime.revert(handle)
    assert seen == [[handle.id], []]


def test_blocking_names_the_later_overlapping_patch_and_none_for_disjoint_ones():
    model = tiny_llama()
    runtime = PatchRuntime(model)
    rng = np.random.default_rng(1)
    first = runtime.apply(random_patch(model, [Q0], rng))
    disjoint = runtime.apply(random_patch(model, [V1], rng))
    on_top = runtime.apply(random_patch(model, [Q0], rng, frac=0.5))  # built on the live (patched) values
    assert runtime.blocking(first) is on_top
    assert runtime.blocking(disjoint) is None
    assert runtime.blocking(on_top) is None
    runtime.revert(on_top)
    assert runtime.blocking(first) is None
