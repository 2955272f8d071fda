"""The paper's editing protocol, side by side for RoseLoRA, dense LoRA and FT-L.

Single edits: for each method and each request, train the edit alone from the unedited model, apply it
to the live model as a patch (PatchRuntime, the fp32 merge), measure, revert exactly, and check that
the model's bits (sha256 over every parameter and buffer) equal the unedited model's, so no edit
leaks into the next. `mass=True` trains one edit carrying all requests instead.

Every method gets the same shared settings (steps, learning rate, weight decay, early-stop loss, seed,
batch); `METHOD_DIFFERENCES` states what differs by construction.
"""
from __future__ import annotations

import random
import time
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.dtypes import torch_dtype
from ..errors import InputError
from ..method.config import RoseLoraConfig
from ..patch.model import Patch, tensor_patch_from_pair
from ..runtime import PatchRuntime
from ..runtime.tryout import state_sha256
from .evaluate import EditEvaluator, METRICS, count_base_params
from .metrics import mean, torch_forward
from .requests import EditRequest
from .settings import EditSettings, edit_settings
from .train import METHODS, EditResult, ft_l_target, pin_kl_texts, train_edit

METHOD_DIFFERENCES = {
    "roselora": "LoRA on the targets; prunes each A row / B column to the top tau by EMA sensitivity (cubic schedule "
                "t_i..t_f); clamps A and B entries to +-clamp after each prune; early stop only from t_f",
    "lora": "LoRA on the same targets, rank, alpha, dropout; no pruning, no clamp; early stop from step 1",
    "ft-l": "no LoRA: fine-tunes one MLP down-projection (ROME's layer 5) in place with |W - W0| <= clamp",
}


def edit_patch(model: torch.nn.Module, result: EditResult, deploy_dtype: str | None = None) -> Patch:
    """The patch that merging `result` into the model's weights makes, as `merge` would store it.

    Same arithmetic as `merge`: merged = (base.float() + delta).to(dtype); ft-l stores its new weights.
    deploy_dtype (fp16, bf16): the merged weights are rounded to it, then held in the model's own dtype
    (exactly: the model's weights must already be values of that dtype, as a bf16 checkpoint loaded
    in fp32 is), so the patch carries the bits the shipped checkpoint has.
    """
    stored = torch_dtype(deploy_dtype) if deploy_dtype else None
    patch = Patch(provenance={"kind": "benchmark", "method": result.method})
    changes = result.new_weights if result.method == "ft-l" else result.deltas()
    for key, value in changes.items():
        base = model.get_parameter(key).detach().cpu()
        if result.method == "ft-l":
            target = value.to(stored or base.dtype).to(base.dtype)
        else:
            target = (base.float() + value.float()).to(stored or base.dtype).to(base.dtype)
        tp = tensor_patch_from_pair(key, base, target)
        if tp is not None:
            patch.tensors[key] = tp
    return patch


def _check_methods(methods: Sequence[str]) -> None:
    """Every method shares one config (each ignores the settings it does not use); InputError for an unknown one."""
    for method in methods:
        if method not in METHODS:
            raise InputError(f"--methods {method}: choose from {', '.join(METHODS)}")


def _aggregate(rows: list[dict], train_seconds: list[float], wall: float, n_edits: int, modified: list[int],
               base_params: int, steps: list[int], losses: list[float], config: RoseLoraConfig, method: str,
               mass: bool, bits_checked: int) -> dict:
    return {**{m: mean([r[m] for r in rows]) for m in METRICS},
            "params_modified": mean(modified), "params_modified_fraction": (mean(modified) or 0) / base_params,
            "seconds_per_edit": sum(train_seconds) / max(n_edits, 1), "wall_seconds_per_edit": wall / max(n_edits, 1),
            "steps": mean(steps), "final_loss": mean(losses), "edits": n_edits, "mode": "mass" if mass else "single",
            "bits_checked": bits_checked, "config": config.to_dict(), "differs": METHOD_DIFFERENCES[method],
            "per_request": rows}


def benchmark_edits(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    methods: Sequence[str] = METHODS,
    config: RoseLoraConfig | None = None,
    *,
    mass: bool = False,
    check_bits: bool = True,
    on_edit: Callable[[str, int], None] | None = None,
    layer: int | None = None,
    settings: EditSettings | None = None,
) -> dict:
    """Run the protocol; returns {"methods": {name: metrics...}, "base_params", "shared_config", ...}.

    on_edit(method, request_index) is called after each edit (the CLI's progress bar).
    Raises RuntimeError if an edit leaves the model's bits changed (that would be a bug, not bad input).
    """
    config, settings = edit_settings(config, settings)
    _check_methods(methods)
    requests = list(requests)
    evaluator = EditEvaluator(tokenizer, requests, torch_forward(model))
    base_params = count_base_params(model)
    runtime = PatchRuntime(model)
    reference = state_sha256(model) if check_bits else None
    out: dict = {"methods": {}, "base_params": base_params, "mode": "mass" if mass else "single",
                 "shared_config": config.to_dict(), "settings": settings.to_dict(), "requests": len(requests)}
    if "ft-l" in methods:
        out["ft_l_target"] = ft_l_target(model, layer)
    groups = [list(range(len(requests)))] if mass else [[i] for i in range(len(requests))]
    for method in methods:
        rows, seconds, modified, steps, losses, checked = [], [], [], [], [], 0
        t0 = time.perf_counter()
        for group in groups:
            result = train_edit(model, tokenizer, [requests[i] for i in group], method=method, config=config,
                                settings=settings, layer=layer)
            patch = edit_patch(model, result, settings.deploy_dtype)
            with runtime.applied(patch):
                rows.extend(evaluator.measure(torch_forward(model), indices=group))
            if check_bits:
                if state_sha256(model) != reference:
                    raise RuntimeError(f"{method}: the model's bits differ from the unedited model after the edit of "
                                       f"request(s) {group} was reverted")
                checked += 1
            seconds.append(result.seconds)
            modified.append(patch.total_nnz)
            steps.append(result.steps)
            losses.append(result.final_loss)
            if on_edit is not None:
                for i in group:
                    on_edit(method, i)
        out["methods"][method] = _aggregate(rows, seconds, time.perf_counter() - t0, len(requests) if mass else len(groups),
                                            modified, base_params, steps, losses, config, method, mass, checked)
    return out


def sequential_edits(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    method: str = "roselora",
    config: RoseLoraConfig | None = None,
    *,
    settings: EditSettings | None = None,
    layer: int | None = None,
    seed: int = 0,
    measure_at: Sequence[int] = (),
    keep_reverts: bool = True,
    on_edit: Callable[[str, int], None] | None = None,
    on_measure: Callable[[dict], None] | None = None,
) -> dict:
    """Lifelong editing (the WISE protocol) with patches: edit the requests one after another, each on
    the model with every earlier edit applied, each merged into its own patch and applied; measure all
    of them after the last; then revert every patch, in a seeded shuffled order where the overlap rule
    allows and the latest blocking patch first where it does not, and check the bits equal the base's.

    measure_at: also measure after the T-th edit, over the first T requests (a curve of metric
    against T; the final measurement is always taken). keep_reverts=False commits each patch as it
    lands (no revert state is held: for dense edits, whose revert state for T patches outgrows
    memory) and skips the revert phase. on_measure(point) gets each curve point as it is measured.

    Returns the metrics, the curve, how many patches overlap an earlier one, the fraction of weights
    touched by their union, seconds per edit, the revert order taken, and whether the final bits matched.
    """
    config, settings = edit_settings(config, settings)
    _check_methods([method])
    requests = list(requests)
    checkpoints = sorted({t for t in measure_at if 0 < t < len(requests)})
    evaluator = EditEvaluator(tokenizer, requests, torch_forward(model))
    base_params = count_base_params(model)
    runtime = PatchRuntime(model)
    reference = state_sha256(model) if keep_reverts else None
    handles, seconds, touched, curve, overlapping = [], [], {}, [], 0
    pinned = pin_kl_texts(model, tokenizer, config, settings) if settings.pin_kl_texts else None
    t0 = time.perf_counter()
    try:
        for i, req in enumerate(requests):
            result = train_edit(model, tokenizer, [req], method=method, config=config, settings=settings, layer=layer,
                                earlier=requests[:i], pinned=pinned)
            patch = edit_patch(model, result, settings.deploy_dtype)
            handle = runtime.apply(patch)
            overlapping += any(_intersects_touched(touched, patch))
            seconds.append(result.seconds)
            for name, tp in patch.tensors.items():  # one flag per element: a dense edit touches tens of millions
                mask = touched.setdefault(name, np.zeros(int(np.prod(tp.shape)), dtype=bool))
                mask[tp.flat_index] = True
            if keep_reverts:
                handles.append(handle)
            else:
                runtime.commit(handle)
            del patch, result, handle
            if i + 1 in checkpoints:
                curve.append(_curve_point(evaluator, model, i + 1, touched, base_params))
                if on_measure is not None:
                    on_measure(curve[-1])
            if on_edit is not None:
                on_edit(method, i)
        wall = time.perf_counter() - t0
        rows = evaluator.measure(torch_forward(model))
        curve.append(_curve_point(evaluator, model, len(requests), touched, base_params, rows))
    finally:
        order = _revert_all(runtime, handles, random.Random(seed))
    identical = state_sha256(model) == reference if keep_reverts else None
    union = int(sum(int(m.sum()) for m in touched.values()))
    out = {m: mean([r[m] for r in rows]) for m in METRICS}
    out.update({
        "edits": len(requests), "mode": "sequential", "params_touched_union": union,
        "params_touched_union_fraction": union / base_params,
        "patches_overlapping_an_earlier_one": overlapping, "seconds_per_edit": sum(seconds) / max(len(seconds), 1),
        "wall_seconds_per_edit": wall / max(len(requests), 1), "curve": curve,
        "reverts": "kept" if keep_reverts else "not kept (each patch committed as it landed)",
        "revert_order": order, "bits_identical_after_reverts": identical, "config": config.to_dict(),
        "settings": settings.to_dict(), "per_request": rows,
    })
    return out


def _intersects_touched(touched: dict[str, np.ndarray], patch: Patch):
    """Per tensor: whether the patch touches an element an earlier patch touched (committed ones included)."""
    for name, tp in patch.tensors.items():
        mask = touched.get(name)
        yield mask is not None and bool(mask[tp.flat_index].any())


def _curve_point(evaluator, model, t: int, touched: dict, base_params: int, rows: list[dict] | None = None) -> dict:
    """The metrics over the first t requests with all t edits applied, and the union touched so far."""
    rows = rows if rows is not None else evaluator.measure(torch_forward(model), indices=list(range(t)))
    point = {"edits": t, **{m: mean([r[m] for r in rows]) for m in METRICS}}
    point["params_touched_union_fraction"] = sum(int(m.sum()) for m in touched.values()) / base_params
    return point


def _revert_all(runtime, handles: list, rng) -> list[int]:
    """Revert every handle: a shuffled order, each blocked one after the patches that block it (LIFO among those)."""
    pending = list(handles)
    rng.shuffle(pending)
    order = []
    while pending:
        handle = pending.pop(0)
        later = runtime.blocking(handle)
        if later is not None:  # revert what blocks it first, then come back to it
            pending = [later] + [handle] + [h for h in pending if h is not later]
            continue
        runtime.revert(handle)
        order.append(handles.index(handle))
    return order
