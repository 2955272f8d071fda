"""Knowledge-edit metrics, EasyEdit's definitions, computed with teacher forcing in batched forward passes.

For a prompt and an answer (the answer continues the prompt after one space, tokenized apart so the
boundary falls on a token), the model sees prompt + answer and predicts each answer token from the
tokens before it:

- reliability: the fraction of `target_new` tokens whose argmax prediction is that token, given `prompt`;
- generalization: the same on each of `rephrase_prompts` (mean over the rephrases);
- locality: on each `locality` prompt + answer, the fraction of answer positions where the edited model's
  argmax equals the unedited model's argmax (mean over the locality prompts);
- efficacy: P(target_new) > P(ground_truth), with P the per-token geometric mean probability of the
  answer given `prompt` (ROME's CounterFact comparison, which uses the mean token NLL so that answers of
  different lengths compare fairly);
- params_modified: how many stored weights the edit changes (a patch's nonzeros), and that over all
  base weights (tied weights counted once).

The pure functions on logits (`answer_predictions`, `token_accuracy`, `agreement`) carry the definitions;
`Scorer` batches the forward passes over any `forward(input_ids, attention_mask) -> logits` callable,
so a torch model, a PEFT model and an onnxruntime session are measured by the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .data import IGNORE, Encoded, collate, encode_pair, pad_id_of

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> logits [b, n, vocab]
BATCH = 16  # sequences per forward pass


@dataclass
class AnswerScore:
    """What the model predicts at the answer positions of one teacher-forced sequence."""

    target: torch.Tensor  # int64 [m], the answer tokens
    pred: torch.Tensor  # int64 [m], the argmax at the positions that predict them
    logprob: torch.Tensor  # float32 [m], log P(answer token | everything before it)

    @property
    def accuracy(self) -> float:
        return token_accuracy(self.pred, self.target)

    @property
    def mean_logprob(self) -> float:
        return float(self.logprob.mean()) if self.logprob.numel() else float("-inf")


def token_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of positions where the prediction equals the target (1.0 for an empty answer)."""
    return float((pred == target).float().mean()) if target.numel() else 1.0


def agreement(pred: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of positions where two models' argmax predictions agree (locality)."""
    return token_accuracy(pred, reference)


def answer_predictions(logits: torch.Tensor, labels: torch.Tensor) -> list[AnswerScore]:
    """Per sequence: argmax and log-probability at every labelled position (labels != IGNORE): logits [b, n,
    vocab] of input_ids [b, n]; labels [b, n] are the ids on the answer, IGNORE elsewhere; j is predicted at j-1."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    shifted = labels[:, 1:]
    out = []
    for i in range(labels.shape[0]):
        pos = (shifted[i] != IGNORE).nonzero().flatten()
        target = shifted[i, pos]
        rows = logp[i, pos]
        out.append(AnswerScore(target=target.cpu(), pred=rows.argmax(-1).cpu(),
                               logprob=rows.gather(-1, target[:, None]).flatten().cpu()))
    return out


def torch_forward(model: torch.nn.Module) -> Forward:
    """A Forward over a torch (or PEFT) causal LM on its own device."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits

    return forward


class Scorer:
    """Teacher-forced scoring of (prompt, answer) pairs in batches of BATCH sequences."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_id = pad_id_of(tokenizer)

    def encode(self, prompt: str, answer: str, chat: bool = False) -> Encoded:
        """The teacher-forced sequence: raw prompt + ' ' + answer, or the prompt as a chat turn + answer."""
        return encode_pair(self.tokenizer, prompt, answer, chat=chat)

    def score(self, forward: Forward, encoded: Sequence[Encoded]) -> list[AnswerScore]:
        # Sorting by length keeps padding small; results are put back in the caller's order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        scored: dict[int, AnswerScore] = {}
        for s in range(0, len(order), BATCH):
            chunk = order[s:s + BATCH]
            batch = collate([encoded[i] for i in chunk], self.pad_id)
            logits = forward(batch["input_ids"], batch["attention_mask"])
            scored.update(zip(chunk, answer_predictions(logits, batch["labels"])))
        return [scored[i] for i in range(len(encoded))]


def mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
