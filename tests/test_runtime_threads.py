"""A thread running forward passes while another applies and reverts sees only whole states."""
from __future__ import annotations

import threading
import time

import numpy as np
import torch

from roselora_export.runtime import PatchRuntime
from test_runtime_helpers import device, random_patch  # noqa: F401
from tiny_models import tiny_llama


def test_a_serving_thread_sees_only_base_or_fully_patched_logits(device):
    model = tiny_llama(seed=5, num_hidden_layers=4).to(device)
    names = [n for n, p in model.named_parameters() if p.dim() == 2]  # every matrix of every layer
    patch = random_patch(model, names, np.random.default_rng(0), frac=0.2, scale=1.0)
    ids = torch.arange(1, 17, device=device).unsqueeze(0)
    rt = PatchRuntime(model)
    with torch.no_grad():
        base = model(ids).logits.clone()
        with rt.applied(patch):
            patched = model(ids).logits.clone()
    assert not torch.allclose(base, patched, atol=1e-3)

    seen = {"base": 0, "patched": 0, "mix": 0}
    stop = threading.Event()

    def serve():
        with torch.no_grad():
            while not stop.is_set():
                with rt.serving():
                    logits = model(ids).logits
                if torch.allclose(logits, base, atol=1e-5, rtol=0):
                    seen["base"] += 1
                elif torch.allclose(logits, patched, atol=1e-5, rtol=0):
                    seen["patched"] += 1
                else:
                    seen["mix"] += 1

    server = threading.Thread(target=serve)
    server.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (min(seen["base"], seen["patched"]) < 5 or seen["base"] + seen["patched"] < 40):
            handle = rt.apply(patch)
            time.sleep(0.003)
            rt.revert(handle)
            time.sleep(0.003)
    finally:
        stop.set()
        server.join()
    assert seen["mix"] == 0, seen
    assert seen["base"] >= 5 and seen["patched"] >= 5, seen
