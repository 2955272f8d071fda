"""Knowledge edits on an already-loaded model: RoseLoRA, dense LoRA, or FT-L, one loop for all three.

`train_edit` leaves the base model as it found it (weights, modules, requires_grad, train/eval
mode): LoRA methods wrap it with PEFT and unload afterwards; FT-L trains one weight in place and
copies the original bits back. The edit lives in the returned `EditResult`:
  - roselora / lora: the LoRA A, B of each adapted module (`result.deltas()` gives B@A*scaling keyed
    by the base state-dict key; `save_edit` writes a standard PEFT adapter dir);
  - ft-l: `result.new_weights` {base state-dict key: new tensor} (`save_edit` writes ft_l.safetensors).
`with result.applied(model): ...` puts any of them into the model's weights and restores them exactly.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..chat import greedy_continuation  # noqa: F401 (the CLI, tests and examples import it from here)
from ..errors import InputError
from ..method.bound import density_bound, prop1_sparsity_bound
from ..method.config import RoseLoraConfig
from ..method.peft_setup import wrap_with_lora
from ..method.pruner import RoseLoraPruner, lora_pairs
from .data import (IGNORE, Encoded, collate, encode_edit_examples, encode_requests, kl_only_sequences,
                   model_max_length, pad_id_of)
from .deploy_rounding import rounded_lora_forward
from .prefixes import context_prefixes
from .requests import EditRequest
from .settings import EditSettings, edit_settings

METHODS = ("roselora", "lora", "ft-l")
ADAPTER_JSON = "roselora.json"
FT_L_FILE = "ft_l.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
ROME_LAYER = 5  # ROME's (and EasyEdit FT-L's) default layer for Llama-style models
EDIT_BATCH = 8  # requests per forward pass; larger files accumulate gradients over chunks
KL_TEXT_LENGTH = 16  # tokens of each --kl-texts text


@dataclass
class ModuleAdapter:
    """One adapted module after training: its LoRA factors, detached, on the CPU."""

    base_key: str
    A: torch.Tensor  # r x d2
    B: torch.Tensor  # d1 x r
    scaling: float
    fan_in_fan_out: bool

    def delta(self) -> torch.Tensor:
        """B @ A * scaling in the base weight's layout: the same arithmetic as PEFT's get_delta_weight."""
        d = self.B @ self.A
        return (d.T if self.fan_in_fan_out else d) * self.scaling


@dataclass
class EditResult:
    method: str
    config: RoseLoraConfig
    base_model: str  # the base model's directory name (or name_or_path)
    base_param_count: int  # all base-model weights (tied weights counted once)
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    modules: list[ModuleAdapter] = field(default_factory=list)  # roselora / lora
    adapter_state: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT adapter_model keys
    peft_config: object = None  # peft.LoraConfig
    new_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # ft-l
    old_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # ft-l, for its statistics
    requests: list[EditRequest] = field(default_factory=list)
    settings: EditSettings | None = None  # how the edit was trained (prefixes, locality term, deploy dtype)
    model: object = None  # the live PeftModel when train_edit(keep_peft=True)

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def deltas(self) -> dict[str, torch.Tensor]:
        """Base state-dict key -> the change to that weight (ft-l: new - old, in float)."""
        if self.method == "ft-l":
            return {k: self.new_weights[k] - self.old_weights[k] for k in self.new_weights}
        return {m.base_key: m.delta() for m in self.modules}

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Within the block the base model's weights carry the edit; afterwards the original bits are back."""
        changes = self.new_weights if self.method == "ft-l" else self.deltas()
        saved = {}
        try:
            with torch.no_grad():
                for key, value in changes.items():
                    param = model.get_parameter(key)
                    saved[key] = param.detach().clone()
                    if self.method == "ft-l":
                        param.copy_(value.to(param.device, param.dtype))
                    else:
                        param.add_(value.to(param.device, param.dtype))
            yield model
        finally:
            with torch.no_grad():
                for key, value in saved.items():
                    model.get_parameter(key).copy_(value)

    def summary(self) -> dict:
        """The roselora.json content: settings, per-module sparsity figures, totals."""
        modules, modified = {}, 0
        if self.method == "ft-l":
            for key, new in self.new_weights.items():
                nnz = int(torch.count_nonzero(new != self.old_weights[key]))
                modified += nnz
                modules[key] = {"shape": list(new.shape), "nnz_delta": nnz, "sparsity_delta": 1 - nnz / new.numel()}
        else:
            for m in self.modules:
                d = m.delta()
                nnz_ba = int(torch.count_nonzero(d))
                modified += nnz_ba
                modules[m.base_key] = {
                    "shape": list(d.shape),
                    "rank": int(m.A.shape[0]),
                    "nnz_A": int(torch.count_nonzero(m.A)),
                    "nnz_B": int(torch.count_nonzero(m.B)),
                    "nnz_BA": nnz_ba,
                    "max_nnz_row_A": int((m.A != 0).sum(dim=1).max()),
                    "max_nnz_col_B": int((m.B != 0).sum(dim=0).max()),
                    "kept_per_row_A": self.config.kept_count(m.A.shape[1]) if self.method == "roselora" else int(m.A.shape[1]),
                    "kept_per_col_B": self.config.kept_count(m.B.shape[0]) if self.method == "roselora" else int(m.B.shape[0]),
                    "prop1_sparsity_bound": prop1_sparsity_bound(m.A, m.B),
                    "sparsity_BA": 1 - nnz_ba / d.numel(),
                }
        return {
            "method": self.method,
            "base_model": self.base_model,
            "config": self.config.to_dict(),
            "settings": self.settings.to_dict() if self.settings is not None else None,
            "steps_run": self.steps,
            "final_loss": self.final_loss,
            "seconds": round(self.seconds, 3),
            "requests": [r.to_dict() for r in self.requests],
            "density_bound_r_tau2": density_bound(self.config.rank, self.config.tau) if self.method == "roselora" else None,
            "modules": modules,
            "weights_modified": modified,
            "base_weights": self.base_param_count,
            "fraction_modified": modified / self.base_param_count if self.base_param_count else 0.0,
        }


# --------------------------------------------------------------------------------------------- loop

def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled tokens, number of labelled tokens)."""
    loss, n, _ = _losses(model, batch)
    return loss, n


def _losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(cross-entropy sum, labelled tokens, KL sum or None): the KL term where the batch carries `kl_mask`/`kl_ref`.

    Logits are computed only at the positions some row needs (transformers' `logits_to_keep`, where
    the model takes it): the output layer over every position is a fifth of a small LM's step.
    """
    labels = batch["labels"][:, 1:]
    needed = torch.zeros(labels.shape[1] + 1, dtype=torch.bool, device=labels.device)
    needed[:-1] = (labels != IGNORE).any(0)
    if "kl_mask" in batch:
        needed |= batch["kl_mask"].any(0)
    keep = needed.nonzero().flatten()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits  # [b, len(keep), vocab]
    else:
        logits = model(**inputs).logits[:, keep]
    targets = torch.cat([labels, torch.full_like(labels[:, :1], IGNORE)], dim=1)[:, keep]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    kl = None
    if "kl_mask" in batch:
        logp = torch.log_softmax(logits[batch["kl_mask"][:, keep]].float(), dim=-1)
        kl = F.kl_div(logp, batch["kl_ref"], log_target=True, reduction="sum")  # KL(unedited || edited)
    return loss, int((labels != IGNORE).sum()), kl


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = model
    while hasattr(inner, "get_base_model") or hasattr(inner, "module"):  # PEFT and DDP wrappers pass kwargs on
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner.module
    return _forward_takes_logits_to_keep(type(inner))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def run_steps(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batches: Callable[[int], list[dict[str, torch.Tensor]]],
    config: RoseLoraConfig,
    *,
    total_steps: int,
    after_step: Callable[[], float | None] | None = None,
    stop_from: int = 0,
    reduce_loss: Callable[[float], float] | None = None,
    progress: bool = False,
    desc: str = "train",
    kl_weight: float = 0.0,
) -> list[float]:
    """The plain loop: for t = 1..total_steps, Adam on the token-mean loss, then `after_step` (the prune).

    batches(t) gives the micro-batches of step t (gradients accumulate over them). With kl_weight > 0,
    batches carrying `kl_mask` (positions) and `kl_ref` (the unedited model's log-probabilities there)
    add kl_weight x the mean KL per position. Training stops early once t >= stop_from and the
    cross-entropy is below config.early_stop_loss. Returns the cross-entropy losses.
    """
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    losses = []
    bar = tqdm(total=total_steps, desc=desc, file=sys.stderr, disable=not progress, leave=False)
    try:
        for t in range(1, total_steps + 1):
            opt.zero_grad(set_to_none=True)
            micro = batches(t)
            n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
            n_kl = sum(int(b["kl_mask"].sum()) for b in micro if "kl_mask" in b) if kl_weight else 0
            total = 0.0
            for b in micro:
                loss_sum, _, kl_sum = _losses(model, b if n_kl else _without_kl(b))
                objective = loss_sum / n_tokens
                if kl_sum is not None:
                    objective = objective + kl_weight * kl_sum / n_kl
                objective.backward()
                total += float(loss_sum.detach())
            opt.step()
            frac = after_step() if after_step is not None else None
            loss = total / n_tokens
            if reduce_loss is not None:
                loss = reduce_loss(loss)
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", **({"tau": f"{frac:.3f}"} if frac is not None else {}))
            if config.early_stop_loss is not None and t >= stop_from and loss < config.early_stop_loss:
                break
    finally:
        bar.close()
    opt.zero_grad(set_to_none=True)
    return losses


def _without_kl(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if not k.startswith("kl_")}


def _micro_batches(encoded: list[Encoded], pad_id: int, size: int) -> list[dict[str, torch.Tensor]]:
    return [collate(encoded[i:i + size], pad_id) for i in range(0, len(encoded), size)]


def _base_name(model: torch.nn.Module) -> str:
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return Path(name).name if name else type(model).__name__


def _batches_on(model: torch.nn.Module, tokenizer, encoded: list[Encoded]) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of EDIT_BATCH sequences, on the model's device."""
    device = next(model.parameters()).device
    return [{k: v.to(device) for k, v in b.items()} for b in _micro_batches(encoded, pad_id_of(tokenizer), EDIT_BATCH)]


# --------------------------------------------------------------------------------------------- LoRA

def train_lora(
    model: torch.nn.Module,
    batches: Callable[[int], list[dict[str, torch.Tensor]]],
    config: RoseLoraConfig,
    *,
    method: str = "roselora",
    total_steps: int | None = None,
    keep_peft: bool = False,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    reduce_loss: Callable[[float], float] | None = None,
    progress: bool = False,
    task_type: str | None = None,
    kl_weight: float = 0.0,
    deploy_dtype: str | None = None,
) -> EditResult:
    """Train a RoseLoRA (or dense LoRA) adapter on `model`; unless keep_peft, the model is unwrapped after.

    wrap: optional extra wrapper for the forward pass (DistributedDataParallel); the pruner works on
    the PEFT model's own parameters either way. deploy_dtype (fp16, bf16): train against the merged
    weights rounded to it (edit/deploy_rounding.py); kl_weight: see run_steps.
    """
    if method not in ("roselora", "lora"):
        raise InputError(f"--method {method}: train_lora takes roselora or lora")
    total = total_steps or config.steps
    base_count = sum(p.numel() for p in model.parameters())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    had_peft_config = hasattr(model, "peft_config")
    peft_model = wrap_with_lora(model, config, task_type=task_type)
    result = EditResult(method=method, config=config, base_model=_base_name(model), base_param_count=base_count)
    start = time.perf_counter()
    try:
        pruner = RoseLoraPruner(peft_model, config, total_steps=total) if method == "roselora" else None
        params = [p for p in peft_model.parameters() if p.requires_grad]
        forward_model = wrap(peft_model) if wrap is not None else peft_model
        peft_model.train()
        # RoseLoRA stops early only once pruning has reached tau; the dense baselines whenever the loss is low.
        stop_from = pruner.t_final if pruner is not None else 0
        with rounded_lora_forward(peft_model, deploy_dtype):
            result.losses = run_steps(forward_model, params, batches, config, total_steps=total,
                                      after_step=pruner.step if pruner else None, stop_from=stop_from,
                                      reduce_loss=reduce_loss, progress=progress, desc=method, kl_weight=kl_weight)
        if pruner is not None:
            pruner.finalize()  # the last prune comes after the last optimizer step
        result.steps = len(result.losses)
        from peft import get_peft_model_state_dict

        result.adapter_state = {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
        result.peft_config = peft_model.peft_config["default"]
        result.modules = [ModuleAdapter(p.base_key, p.A.detach().cpu().clone(), p.B.detach().cpu().clone(), p.scaling, p.fan_in_fan_out)
                          for p in lora_pairs(peft_model)]
    finally:
        result.seconds = time.perf_counter() - start
        if keep_peft:
            result.model = peft_model.train(was_training)
        else:
            peft_model.unload()
            if not had_peft_config and hasattr(model, "peft_config"):
                del model.peft_config
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
            model.train(was_training)
    return result


# --------------------------------------------------------------------------------------------- FT-L

_MLP_OUT = re.compile(r"\.(\d+)\.(?:mlp\.(?:down_proj|c_proj|fc2|dense_4h_to_h)|output\.dense)$")


def ft_l_target(model: torch.nn.Module, layer: int | None = None) -> str:
    """The base state-dict key of the MLP down-projection FT-L trains: ROME's layer 5 (or the last layer, if fewer)."""
    found = {}
    for name, module in model.named_modules():
        m = _MLP_OUT.search(name)
        if m and hasattr(module, "weight"):
            found.setdefault(int(m.group(1)), name + ".weight")
    if not found:
        raise InputError("--method ft-l: no MLP down-projection (mlp.down_proj / mlp.c_proj / output.dense) in this model")
    if layer is None:
        layer = min(ROME_LAYER, max(found))
    if layer not in found:
        raise InputError(f"--layer {layer}: the model has layers {min(found)}..{max(found)}")
    return found[layer]


def train_ft_l(model, batches, config: RoseLoraConfig, *, layer: int | None = None, progress: bool = False,
               kl_weight: float = 0.0) -> EditResult:
    """Fine-tune one MLP down-projection in place (FT-L), keep |W - W0| <= clamp, then restore W0 exactly."""
    key = ft_l_target(model, layer)
    param = model.get_parameter(key)
    base_count = sum(p.numel() for p in model.parameters())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    original = param.detach().clone()
    result = EditResult(method="ft-l", config=config, base_model=_base_name(model), base_param_count=base_count)
    start = time.perf_counter()

    def norm_constraint() -> None:
        if config.clamp is not None:
            with torch.no_grad():
                param.copy_(torch.maximum(torch.minimum(param, original + config.clamp), original - config.clamp))

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        param.requires_grad_(True)
        result.losses = run_steps(model, [param], batches, config, total_steps=config.steps,
                                  after_step=norm_constraint, progress=progress, desc="ft-l", kl_weight=kl_weight)
        result.steps = len(result.losses)
        result.new_weights = {key: param.detach().to("cpu", torch.float32).clone()}
        result.old_weights = {key: original.to("cpu", torch.float32).clone()}
    finally:
        result.seconds = time.perf_counter() - start
        with torch.no_grad():
            param.copy_(original)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
    return result


# --------------------------------------------------------------------------------------------- edit API

def train_edit(
    model: torch.nn.Module,
    tokenizer,
    requests: list[EditRequest],
    method: str = "roselora",
    config: RoseLoraConfig | None = None,
    progress: bool = False,
    *,
    settings: EditSettings | None = None,
    layer: int | None = None,
    keep_peft: bool = False,
    source: str = "requests",
    earlier: Sequence[EditRequest] = (),
    carries_edits: bool = False,
    pinned: PinnedTexts | None = None,
) -> EditResult:
    """Train one edit that carries every request, on an already-loaded causal LM.

    config and settings default to the `default` preset; a config given alone trains without
    prefixes or KL (edit/settings.edit_settings). The base model comes
    back unchanged (see the module docstring); keep_peft=True instead leaves the LoRA methods'
    PeftModel in place as result.model. ft-l trains layer `layer` (default ROME's 5); it ignores
    settings.deploy_dtype (its whole new weights are rounded when stored).

    A model that carries edits (carries_edits, or `earlier`, the requests of the edits it carries) trains
    with settings.when_edited(), and up to settings.keep_edits of `earlier` each become a sequence that
    carries only the locality term, so this edit keeps them as the model answers them now. pinned: the
    KL texts and their reference predictions from another model (pin_kl_texts), not from this one.
    """
    if method not in METHODS:
        raise InputError(f"--method {method}: choose one of {', '.join(METHODS)}")
    config, settings = edit_settings(config, settings)
    if carries_edits or earlier:
        settings = settings.when_edited()
    keep = settings.kept(earlier, config.seed + len(earlier))
    prefixes = context_prefixes(model, tokenizer, settings.prefixes, settings.prefix_length, config.seed)
    use_kl, max_len = settings.kl_weight > 0, model_max_length(model, tokenizer)
    encoded = encode_edit_examples(requests, tokenizer, max_len, prefixes=prefixes, kl_prefixes=use_kl,
                                   kl_on_locality=use_kl and settings.kl_on_locality, source=source)
    micro = _batches_on(model, tokenizer, encoded)
    if use_kl and keep:  # batched apart from the request's own sequences
        kept = [_kl_only_of(e) for e in encode_requests(keep, tokenizer, max_len, "kept edits")]
        micro += _batches_on(model, tokenizer, kept)
    if use_kl:
        _attach_kl_reference(model, micro)
    if use_kl and settings.kl_texts:
        micro += _kl_text_batches(model, tokenizer, settings.kl_texts, config.seed, pinned)
    torch.manual_seed(config.seed)
    if method == "ft-l":
        result = train_ft_l(model, lambda t: micro, config, layer=layer, progress=progress, kl_weight=settings.kl_weight)
    else:
        result = train_lora(model, lambda t: micro, config, method=method, keep_peft=keep_peft, progress=progress,
                            kl_weight=settings.kl_weight, deploy_dtype=settings.deploy_dtype)
    result.requests = list(requests)
    result.settings = settings
    return result


@torch.no_grad()
def _attach_kl_reference(model: torch.nn.Module, micro: list[dict[str, torch.Tensor]], cache: dict | None = None) -> None:
    """Store the unedited model's log-probabilities at each batch's KL positions (`kl_ref`), computed once;
    with `cache`, a batch whose tokens it holds takes the log-probabilities stored there."""
    was_training = model.training
    model.eval()
    try:
        for b in micro:
            if "kl_mask" not in b:
                continue
            key = tuple(b["input_ids"].flatten().tolist())
            if cache is not None and key in cache:
                b["kl_ref"] = cache[key].to(b["input_ids"].device)
                continue
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            b["kl_ref"] = torch.log_softmax(logits[b["kl_mask"]].float(), dim=-1)
            if cache is not None:
                cache[key] = b["kl_ref"]
    finally:
        model.train(was_training)


@dataclass
class PinnedTexts:
    """KL texts (by count) and their reference log-probabilities (by batch tokens), from one model."""

    texts: dict[int, list[str]] = field(default_factory=dict)
    reference: dict[tuple, torch.Tensor] = field(default_factory=dict)


def pin_kl_texts(model: torch.nn.Module, tokenizer, config: RoseLoraConfig, settings: EditSettings) -> PinnedTexts:
    """The KL texts of `settings` (for a fresh and for an edited model), generated by `model` with its
    predictions as their reference. Passed to every edit of a sequence (train_edit's `pinned`), they hold
    each edit to the sequence's base model rather than to the model it starts from, so drift does not add up."""
    pinned = PinnedTexts()
    for s in (settings, settings.when_edited()):
        if s.kl_weight and s.kl_texts:
            _kl_text_batches(model, tokenizer, s.kl_texts, config.seed, pinned)
    return pinned


def _kl_text_batches(model, tokenizer, n: int, seed: int, pinned: PinnedTexts | None) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of n KL-only texts with their reference: pinned ones where `pinned` holds them."""
    texts = pinned.texts.get(n) if pinned is not None else None
    if texts is None:  # a seed of their own: not the context prefixes again
        texts = context_prefixes(model, tokenizer, n, KL_TEXT_LENGTH, seed + 1)
        if pinned is not None:
            pinned.texts[n] = texts
    sequences = kl_only_sequences(texts, tokenizer, model_max_length(model, tokenizer))
    micro = _batches_on(model, tokenizer, sequences)
    _attach_kl_reference(model, micro, pinned.reference if pinned is not None else None)
    return micro


def _kl_only_of(enc: Encoded) -> Encoded:
    """An encoded prompt -> target with nothing to learn: the positions that predict the target carry the
    locality term (the prompt's own positions would only dilute the KL texts' share of it)."""
    first = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    return Encoded(input_ids=enc.input_ids, labels=[IGNORE] * len(enc.input_ids), kl_from=first - 1,
                   kl_len=len(enc.input_ids) - 1)


# --------------------------------------------------------------------------------------------- saving

def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """--out as a Path, if save_edit may write it: new, or (with --overwrite) an existing directory."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"--out {out}: already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    return out


def save_edit(result: EditResult, out_dir: str | os.PathLike, *, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write the edit (layouts in docs/adapters.md): a PEFT adapter dir or ft_l.safetensors, plus roselora.json."""
    from safetensors.torch import save_file

    from ..core.atomic import atomic_dir

    out = check_out_dir(out_dir, overwrite)
    summary = {**result.summary(), **(extra or {})}
    with atomic_dir(out, replace=True) as tmp:  # an existing --out is swapped whole: a crash keeps the old one
        if result.method == "ft-l":
            save_file({k: v.contiguous() for k, v in result.new_weights.items()}, str(tmp / FT_L_FILE),
                      metadata={"format": "pt", "method": "ft-l"})
        else:
            result.peft_config.save_pretrained(str(tmp))
            save_file(result.adapter_state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    return out
