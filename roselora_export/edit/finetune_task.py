"""A small fine-tuning task the repository generates: rewrite a date in ISO 8601 (text-to-format).

    Convert the date to ISO 8601.
    Date: March 12, 2021
    ISO: 2021-03-12

The base model rarely gets the format right and a few hundred examples teach it, so accuracy against
training data size is informative at CPU scale (paper §5.4). Accuracy: exact match under teacher forcing
(every completion token is the argmax). Forgetting (§5.3): the fraction of probe facts the base model
answers that are still answered the same way after fine-tuning.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..method.config import RoseLoraConfig
from .data import Encoded, collate, encode_pair, pad_id_of
from .metrics import Scorer, torch_forward

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
INSTRUCTION = "Convert the date to ISO 8601.\nDate: "


def make_example(rng: random.Random) -> dict:
    """One {"prompt", "completion"} pair; the date is written in one of three common styles."""
    year, month, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    name = MONTHS[month - 1]
    style = rng.randrange(3)
    text = [f"{name} {day}, {year}", f"{day} {name} {year}", f"{name[:3]} {day} {year}"][style]
    return {"prompt": f"{INSTRUCTION}{text}\nISO:", "completion": f"{year:04d}-{month:02d}-{day:02d}"}


def make_split(n: int, seed: int) -> list[dict]:
    """n distinct examples from a seeded generator (train and test use different seeds and never overlap)."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        ex = make_example(rng)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(ex)
    return out


def make_task(n_train: int = 512, n_test: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) with no test prompt in train."""
    test = make_split(n_test, seed + 1)
    held = {e["prompt"] for e in test}
    train = [e for e in make_split(n_train + n_test, seed) if e["prompt"] not in held][:n_train]
    return train, test


def exact_match(model: torch.nn.Module, tokenizer, rows: Sequence[dict], *, prompt_key: str = "prompt",
                answer_key: str = "completion") -> list[bool]:
    """Per row: every answer token is the argmax given the prompt and the answer tokens before it."""
    scorer = Scorer(tokenizer)
    scores = scorer.score(torch_forward(model), [scorer.encode(r[prompt_key], r[answer_key]) for r in rows])
    return [bool((s.pred == s.target).all()) for s in scores]


def finetune_config(**overrides) -> RoseLoraConfig:
    """Fine-tuning settings (not the editing ones): no clamp, no early stop, schedule as fractions of the steps."""
    base = dict(rank=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"), tau=0.1, t_init=0.1, t_final=0.6,
                steps=64, lr=2e-3, clamp=None, early_stop_loss=None, seed=0)
    base.update(overrides)
    return RoseLoraConfig(**base)


@dataclass
class FinetuneRun:
    method: str
    n_train: int
    steps: int
    seconds: float
    accuracy: float
    probes_kept: float | None
    params_modified: int
    params_modified_fraction: float
    final_loss: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def finetune(model: torch.nn.Module, tokenizer, train: Sequence[dict], test: Sequence[dict], method: str,
             config: RoseLoraConfig, *, epochs: float = 2.0, batch: int = 16, probes: Sequence[dict] = (),
             progress: bool = False) -> FinetuneRun:
    """Train `method` (roselora | lora) on `train` for `epochs`, measure test accuracy and probe retention
    (probes: {"prompt", "answer"} the base gets right). The model comes back with its original weights."""
    from .train import train_lora

    encoded: list[Encoded] = [encode_pair(tokenizer, r["prompt"], r["completion"]) for r in train]
    steps = max(1, round(epochs * len(encoded) / batch))
    rng = random.Random(config.seed)
    order: list[int] = []
    pad = pad_id_of(tokenizer)
    device = next(model.parameters()).device

    def batches(t: int) -> list[dict[str, torch.Tensor]]:
        nonlocal order
        if len(order) < batch:  # a fresh shuffle each epoch
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more
        take, order = order[:batch], order[batch:]
        b = collate([encoded[i] for i in take], pad)
        return [{k: v.to(device) for k, v in b.items()}]

    config = RoseLoraConfig.from_dict({**config.to_dict(), "steps": steps})
    t0 = time.perf_counter()
    result = train_lora(model, batches, config, method=method, total_steps=steps, progress=progress)
    seconds = time.perf_counter() - t0
    summary = result.summary()
    with result.applied(model):
        acc = exact_match(model, tokenizer, test)
        kept = exact_match(model, tokenizer, probes, answer_key="answer") if probes else None
    return FinetuneRun(method=method, n_train=len(train), steps=result.steps, seconds=seconds,
                       accuracy=sum(acc) / len(acc), probes_kept=(sum(kept) / len(kept)) if kept else None,
                       params_modified=summary["weights_modified"],
                       params_modified_fraction=summary["fraction_modified"], final_loss=result.final_loss)
