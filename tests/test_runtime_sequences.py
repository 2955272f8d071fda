"""Hundreds of random apply/revert sequences, stacked and overlapping: the live bits always match a
reference that XORs the same patches on the host, and every full revert gives the base back exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from roselora_export.errors import InputError
from roselora_export.patch.model import Patch, tensor_bits
from roselora_export.runtime import PatchRuntime
from test_runtime_helpers import DTYPES, TIED, device, live, random_patch, state_hash  # noqa: F401
from tiny_models import tiny_llama

SEQUENCES_PER_DTYPE = 100
NAMES = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.input_layernorm.weight",
    *TIED,
]


def _canonical(name: str) -> str:
    return TIED[0] if name in TIED else name


def _touched(patch: Patch) -> dict[str, set[int]]:
    return {_canonical(n): set(tp.flat_index.tolist()) for n, tp in patch.tensors.items()}


def _overlap(a: dict[str, set[int]], b: dict[str, set[int]]) -> bool:
    return any(a[n] & b.get(n, set()) for n in a)


def _live_bits(model) -> dict[str, np.ndarray]:
    return {_canonical(n): tensor_bits(live(model, n).detach().cpu()).copy() for n in NAMES}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_random_apply_revert_sequences_are_bit_exact(device, dtype):
    rng = np.random.default_rng({torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype])
    model = tiny_llama(seed=4).to(device=device, dtype=dtype)
    base_hash = state_hash(model)
    base_bits = _live_bits(model)
    rt = PatchRuntime(model)
    counts = dict.fromkeys(["stacked", "stale-refused", "stale-accepted", "revert", "revert-refused"], 0)

    for _ in range(SEQUENCES_PER_DTYPE):
        expected = {n: b.copy() for n, b in base_bits.items()}  # the reference state, XORed on the host
        applied: list[tuple[object, Patch, dict]] = []  # (handle, patch, touched), oldest first
        for _ in range(int(rng.integers(2, 9))):
            action = rng.random()
            names = list(rng.choice([n for n in NAMES if n != TIED[1]], size=int(rng.integers(1, 4)), replace=False))
            if TIED[0] in names and rng.random() < 0.5:
                names[names.index(TIED[0])] = TIED[1]  # either tied key names the one tensor
            frac = float(rng.choice([0.01, 0.1, 0.5]))
            if action < 0.45 or not applied:  # a patch built on the live state: always accepted, may overlap
                patch = random_patch(model, names, rng, frac=frac)
                handle = rt.apply(patch)
                for n, tp in patch.tensors.items():
                    expected[_canonical(n)][tp.flat_index] ^= tp.xor_bits
                applied.append((handle, patch, _touched(patch)))
                counts["stacked"] += 1
            elif action < 0.6:  # a patch built on the original base: accepted iff its elements still hold base bits
                with torch.no_grad():
                    current = {n: live(model, n).detach().clone() for n in names}
                    for n in names:
                        flat = live(model, n).detach().view(-1)
                        flat.copy_(torch.from_numpy(base_bits[_canonical(n)]).view(flat.dtype).to(flat.device))
                    patch = random_patch(model, names, rng, frac=frac)
                    for n in names:
                        live(model, n).detach().copy_(current[n])
                clean = all(np.array_equal(expected[_canonical(n)][tp.flat_index], base_bits[_canonical(n)][tp.flat_index])
                            for n, tp in patch.tensors.items())
                if clean:
                    handle = rt.apply(patch)
                    for n, tp in patch.tensors.items():
                        expected[_canonical(n)][tp.flat_index] ^= tp.xor_bits
                    applied.append((handle, patch, _touched(patch)))
                    counts["stale-accepted"] += 1
                else:
                    with pytest.raises(InputError, match="fingerprint"):
                        rt.apply(patch)
                    counts["stale-refused"] += 1
            else:  # revert a random active patch: refused iff a later active patch overlaps it
                k = int(rng.integers(len(applied)))
                handle, patch, touched = applied[k]
                if any(_overlap(touched, later) for _, _, later in applied[k + 1:]):
                    with pytest.raises(InputError, match="overlaps it"):
                        rt.revert(handle)
                    counts["revert-refused"] += 1
                else:
                    rt.revert(handle)
                    for n, tp in patch.tensors.items():
                        expected[_canonical(n)][tp.flat_index] ^= tp.xor_bits
                    del applied[k]
                    counts["revert"] += 1
            got = _live_bits(model)
            assert all(np.array_equal(got[n], expected[n]) for n in expected)
            assert [h for h, _, _ in applied] == rt.active
        while applied:  # LIFO always works
            rt.revert(applied.pop()[0])
        assert state_hash(model) == base_hash
    assert all(v > 0 for v in counts.values()), counts
