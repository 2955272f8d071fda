"""Measure edit requests on a model against its unedited self: reliability, generalization, locality, efficacy.

    ev = EditEvaluator(tokenizer, requests, torch_forward(base_model))   # scores the unedited model once
    ... edit the model (runtime patch, PEFT adapter, merged checkpoint, ONNX session) ...
    rows = ev.measure(torch_forward(model), indices=[i])                  # only request i, or all
    report = summarize(rows, params_modified=patch.total_nnz, base_params=count_base_params(base_model))

`evaluate_dir` is the library side of the `evaluate` command: a model directory, a requests file,
optionally a PEFT adapter (or ft-l dir), patch files, or an already-edited model directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError
from ..patch.model import DTYPE_NAMES
from .metrics import AnswerScore, Forward, Scorer, agreement, mean, torch_forward
from .requests import EditRequest, load_requests


@dataclass
class _Case:
    """Where one request's sequences sit in the evaluator's flat list."""

    rel: int
    gen: list[int] = field(default_factory=list)
    loc: list[int] = field(default_factory=list)
    truth: int | None = None


class EditEvaluator:
    """Encodes every request's sequences once and keeps the unedited model's predictions as the reference."""

    def __init__(self, tokenizer, requests: Sequence[EditRequest], base_forward: Forward) -> None:
        self.requests = list(requests)
        self.scorer = Scorer(tokenizer)
        self.encoded = []
        self.cases: list[_Case] = []
        for r in self.requests:  # a chat request's prompts are all asked through the chat template
            case = _Case(rel=self._add(r.prompt, r.target_new, r.chat))
            case.gen = [self._add(p, r.target_new, r.chat) for p in r.rephrase_prompts]
            case.loc = [self._add(x["prompt"], x["answer"], r.chat) for x in r.locality]
            if r.ground_truth:
                case.truth = self._add(r.prompt, r.ground_truth, r.chat)
            self.cases.append(case)
        self.base = self.scorer.score(base_forward, self.encoded)

    def _add(self, prompt: str, answer: str, chat: bool = False) -> int:
        self.encoded.append(self.scorer.encode(prompt, answer, chat))
        return len(self.encoded) - 1

    def measure(self, forward: Forward, indices: Sequence[int] | None = None) -> list[dict]:
        """Per-request metrics of the model behind `forward` (all requests, or those at `indices`)."""
        indices = list(range(len(self.requests))) if indices is None else list(indices)
        wanted = sorted({j for i in indices for j in self._seqs(self.cases[i])})
        scores = dict(zip(wanted, self.scorer.score(forward, [self.encoded[j] for j in wanted])))
        return [self._row(i, scores) for i in indices]

    @staticmethod
    def _seqs(case: _Case) -> list[int]:
        return [case.rel, *case.gen, *case.loc] + ([case.truth] if case.truth is not None else [])

    def _row(self, i: int, s: dict[int, AnswerScore]) -> dict:
        r, c = self.requests[i], self.cases[i]
        efficacy = None
        if c.truth is not None:
            efficacy = float(s[c.rel].mean_logprob > s[c.truth].mean_logprob)
        return {
            "index": i,
            "prompt": r.prompt,
            "target_new": r.target_new,
            **({"chat": True} if r.chat else {}),
            "reliability": s[c.rel].accuracy,
            "generalization": mean([s[j].accuracy for j in c.gen]),
            "locality": mean([agreement(s[j].pred, self.base[j].pred) for j in c.loc]),
            "efficacy": efficacy,
            "pre_reliability": self.base[c.rel].accuracy,
        }


def count_base_params(model: torch.nn.Module) -> int:
    """All weights of the model, a tied weight counted once (what 'fraction of the base model's weights' divides by)."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields shared tensors once


METRICS = ("reliability", "generalization", "locality", "efficacy")


def summarize(rows: list[dict], *, params_modified: int = 0, base_params: int = 1, **extra) -> dict:
    """The report object: means over the requests, params modified, and the per-request rows."""
    return {**{m: mean([r[m] for r in rows]) for m in (*METRICS, "pre_reliability")},
            "params_modified": int(params_modified),
            "params_modified_fraction": params_modified / base_params if base_params else 0.0,
            "base_params": int(base_params), "requests": len(rows), **extra, "per_request": rows}


def _stored_dtypes(model_dir: str | os.PathLike) -> dict[str, torch.dtype]:
    """The dtype each floating-point weight of a checkpoint directory is stored in, by state-dict key."""
    from ..checkpoint import open_model_dir
    from ..core.dtypes import TORCH_NAMES, torch_dtype

    out = {}
    for name, (_, info) in open_model_dir(model_dir, "--edited").locations.items():
        dtype = torch_dtype(info.dtype) if info.dtype in TORCH_NAMES else None
        if dtype is not None and dtype.is_floating_point:
            out[name] = dtype
    return out


def _edited_weights(model: torch.nn.Module, edited: torch.nn.Module, edited_dir) -> int:
    """How many weights of `edited` differ (in their bits) from `model`'s; InputError unless both have the same ones."""
    base, other = dict(model.named_parameters()), dict(edited.named_parameters())
    for name in sorted(set(base) | set(other)):
        if name not in base or name not in other or base[name].shape != other[name].shape:
            raise InputError(f"--edited {edited_dir}: not the same architecture as --model (first difference: {name}); "
                             "pass the model it was edited from")
    return sum(int((base[n].detach().view(torch.int32) != other[n].detach().view(torch.int32)).sum()) for n in base)


def evaluate_dir(model_dir: str | os.PathLike, requests_path: str | os.PathLike, *,
                 adapter: str | os.PathLike | None = None, patches: Sequence[str | os.PathLike] = (),
                 edited: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 chat: bool = False) -> dict:
    """Evaluate a model directory on a requests file, edited by a PEFT/ft-l adapter dir, by patch files, or as an
    already-edited model directory (`edited`, e.g. what `merge` wrote), against the unedited model.

    A PEFT adapter runs unmerged, as PEFT runs it; ft-l and patch files are applied through PatchRuntime. An
    fp16/bf16 edited directory is measured against the unedited model rounded to its dtype (locality then
    measures the edit, not the rounding). chat=True asks every request through the chat template."""
    from ..chat import require_chat_template
    from ..models import load_model, load_tokenizer
    from ..patch import build_patch_from_adapter, load_patch
    from ..runtime import PatchRuntime

    if sum((adapter is not None, bool(patches), edited is not None)) > 1:
        raise InputError("--adapter, --patch and --edited: give one or the other")
    for p in patches:  # each patch file read and checked before the model loads (a .jsonl: "not a patch file")
        load_patch(p)
    requests = load_requests(requests_path, chat=chat)
    tokenizer = load_tokenizer(model_dir)
    if any(r.chat for r in requests):  # before the model loads
        require_chat_template(tokenizer, "--chat" if chat else f"--requests {requests_path}: field 'chat'")
    model = load_model(model_dir).to(device)
    base_params = count_base_params(model)
    edited_model, stored = None, {}
    if edited is not None:
        edited_model = load_model(edited, option="--edited").to(device)  # upcast to fp32, exactly
        stored = _stored_dtypes(edited)
        with torch.no_grad():  # the reference: each base weight rounded to the dtype its edited copy is stored in
            for name, p in model.named_parameters():
                if stored.get(name, torch.float32) != torch.float32:
                    p.copy_(p.to(stored[name]).float())
    evaluator = EditEvaluator(tokenizer, requests, torch_forward(model))
    info: dict = {"model": str(model_dir), "requests_file": str(requests_path)}
    if any(r.chat for r in requests):
        info["chat_requests"] = sum(r.chat for r in requests)
    if edited_model is not None:
        modified = _edited_weights(model, edited_model, edited)
        rows = evaluator.measure(torch_forward(edited_model))
        info["edited"] = str(edited)
        dtypes = sorted({DTYPE_NAMES.get(d, str(d)) for d in stored.values()})
        info["applied_as"] = f"edited model directory ({'+'.join(dtypes)})"
    elif adapter is not None:
        path = Path(adapter)
        if not path.is_dir():
            raise InputError(f"--adapter {path}: not a directory")
        patch = build_patch_from_adapter(path, model.state_dict())
        modified = patch.total_nnz
        info["adapter"] = str(path)
        if (path / "adapter_config.json").is_file():  # a PEFT adapter, else ft-l
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(model, str(path)).eval()
            try:
                rows = evaluator.measure(torch_forward(peft_model))
            finally:
                peft_model.unload()
            info["applied_as"] = "peft"
        else:
            runtime = PatchRuntime(model)
            with runtime.applied(patch):
                rows = evaluator.measure(torch_forward(model))
            info["applied_as"] = "patch (fp32 merge)"
    elif patches:
        runtime = PatchRuntime(model)
        handles = []
        try:
            for p in patches:
                handles.append(runtime.apply(str(p)))
            rows = evaluator.measure(torch_forward(model))
        finally:
            for h in reversed(handles):
                runtime.revert(h)
        modified = sum(h.nnz for h in handles)  # patches stacked on one another may count an element twice
        info["patches"] = [str(p) for p in patches]
        info["applied_as"] = "patch"
    else:
        rows = evaluator.measure(torch_forward(model))
        modified = 0
        info["applied_as"] = "none (unedited model)"
    return summarize(rows, params_modified=modified, base_params=base_params, **info)
