"""Token-level data: edit requests and fine-tuning examples as (input_ids, labels) with prompt tokens masked.

A fine-tuning file holds one JSON object per line, {"prompt", "completion"} (loss on the completion)
or {"text"} (loss on every token).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..chat import answer_sep, chat_text, pad_id_of, prompt_ids  # noqa: F401 (others import pad_id_of from here)
from ..errors import InputError
from .jsonl import read_jsonl_objects

IGNORE = -100  # label value the loss skips (the torch / transformers convention)


@dataclass
class Encoded:
    """One training sequence: input_ids, and labels equal to them except IGNORE on prompt tokens."""

    input_ids: list[int]
    labels: list[int]
    kl_len: int = 0  # positions kl_from..kl_len-1 carry the locality (KL) term, if training uses one
    kl_from: int = 0


def model_max_length(model, tokenizer=None) -> int | None:
    """The longest sequence the model (and tokenizer) accept, or None if neither says."""
    limits = []
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    return min(limits) if limits else None


def encode_pair(tokenizer, prompt: str, completion: str, *, sep: str = " ", chat: bool = False,
                where: str = "--chat") -> Encoded:
    """prompt ids (with the tokenizer's special tokens) + ids of sep+completion; loss on the completion only.

    The two parts are tokenized separately so the boundary is exact: the target starts on a token.
    chat=True: the prompt is a user turn through the chat template and the completion starts the
    assistant's turn, with no separator (roselora_export/chat.py).
    """
    p = prompt_ids(tokenizer, prompt, chat, where)
    c = tokenizer((answer_sep(True) if chat else sep) + completion, add_special_tokens=False)["input_ids"]
    return Encoded(input_ids=list(p) + list(c), labels=[IGNORE] * len(p) + list(c))


def encode_text(tokenizer, text: str) -> Encoded:
    ids = list(tokenizer(text)["input_ids"])
    return Encoded(input_ids=ids, labels=list(ids))


def check_length(enc: Encoded, max_len: int | None, where: str, what: str = "prompt") -> None:
    if max_len is not None and len(enc.input_ids) > max_len:
        raise InputError(f"{where}: field '{what}' is too long: {len(enc.input_ids)} tokens with the target, "
                         f"the model accepts at most {max_len}")
    if not any(label != IGNORE for label in enc.labels[1:]):
        raise InputError(f"{where}: nothing to learn (the target/completion has no tokens)")


def encode_requests(requests, tokenizer, max_len: int | None, source: str = "requests") -> list[Encoded]:
    """Encode edit requests (prompt + ' ' + target_new), checking each fits the model."""
    return encode_edit_examples(requests, tokenizer, max_len, source=source)


def encode_edit_examples(requests, tokenizer, max_len: int | None, *, prefixes: list[str] = (),
                         kl_prefixes: bool = False, kl_on_locality: bool = False,
                         source: str = "requests") -> list[Encoded]:
    """The training sequences of an edit: each request's prompt -> target, then again after each context prefix.

    kl_prefixes: the prefix positions carry the locality term (they precede the prompt, so the
    unedited model's predictions there are the ones to keep). kl_on_locality: each request's own
    locality prompt + answer becomes a KL-only sequence (no target tokens). A chat request puts the
    prefix inside its user turn, before the prompt; the KL positions then run up to the prefix's end.
    """
    out = []
    for req in requests:
        where = f"{source} line {req.line}"
        for prefix in ("", *prefixes):
            enc = encode_pair(tokenizer, prefix + req.prompt, req.target_new, chat=req.chat, where=where)
            check_length(enc, max_len, where)
            if prefix and kl_prefixes:
                enc.kl_len = _shared_prefix_len(_prefix_ids(tokenizer, prefix, req.prompt, req.chat), enc.input_ids)
            out.append(enc)
        if kl_on_locality:
            for item in req.locality:
                if req.chat:
                    ids = encode_pair(tokenizer, item["prompt"], item["answer"], chat=True, where=where).input_ids
                else:
                    ids = list(tokenizer(item["prompt"] + " " + item["answer"])["input_ids"])
                out.append(_kl_only(ids[:max_len]))
    return out


def kl_only_sequences(texts: list[str], tokenizer, max_len: int | None) -> list[Encoded]:
    """Each text as a sequence with no target tokens whose every position carries the locality term."""
    return [_kl_only(list(tokenizer(text.rstrip())["input_ids"])[:max_len]) for text in texts]


def _kl_only(ids: list[int]) -> Encoded:
    """A sequence with nothing to predict: every position carries the locality term only."""
    return Encoded(input_ids=ids, labels=[IGNORE] * len(ids), kl_len=len(ids))


def _prefix_ids(tokenizer, prefix: str, prompt: str, chat: bool) -> list[int]:
    """Token ids of everything up to the end of the prefix: the prefix alone, or the chat turn's opening and it."""
    if not chat:
        return tokenizer(prefix.rstrip())["input_ids"]
    text = chat_text(tokenizer, prefix + prompt)
    head = text[:text.index(prefix + prompt) + len(prefix.rstrip())]
    return tokenizer(head, add_special_tokens=False)["input_ids"]


def _shared_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading tokens two id lists share (a prefix tokenized alone and in context may differ at the seam)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions have attention 0 and label IGNORE."""
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.kl_len for e in batch):
        kl = torch.zeros((len(batch), n), dtype=torch.bool)
        for i, e in enumerate(batch):
            kl[i, e.kl_from: e.kl_len] = True
        out["kl_mask"] = kl
    return out


def load_train_data(path: str | os.PathLike, tokenizer, max_len: int | None, *, truncate: bool = True) -> list[Encoded]:
    """Read a fine-tuning .jsonl ({"prompt","completion"} or {"text"} per line) and encode it.

    Lines longer than max_len are truncated (truncate=True) or rejected.
    """
    out = []
    for obj, where, _ in read_jsonl_objects(path, "--data"):
        if "text" in obj:
            if not isinstance(obj["text"], str) or not obj["text"].strip():
                raise InputError(f"{where}: field 'text' must be a non-empty string")
            enc = encode_text(tokenizer, obj["text"])
        elif "prompt" in obj or "completion" in obj:
            for name in ("prompt", "completion"):
                if name not in obj:
                    raise InputError(f"{where}: missing field '{name}' (use {{\"prompt\", \"completion\"}} or {{\"text\"}})")
                if not isinstance(obj[name], str):
                    raise InputError(f"{where}: field '{name}' must be a string")
            if not obj["completion"].strip():
                raise InputError(f"{where}: field 'completion' is empty")
            # One space joins them unless either side already has whitespace at the seam.
            seam = not obj["prompt"] or obj["prompt"][-1:].isspace() or obj["completion"][:1].isspace()
            enc = encode_pair(tokenizer, obj["prompt"], obj["completion"], sep="" if seam else " ")
        else:
            raise InputError(f"{where}: missing field 'text' (or 'prompt' and 'completion')")
        if max_len is not None and len(enc.input_ids) > max_len:
            if not truncate:
                raise InputError(f"{where}: {len(enc.input_ids)} tokens, the model accepts at most {max_len}")
            enc = Encoded(enc.input_ids[:max_len], enc.labels[:max_len])
        if not any(label != IGNORE for label in enc.labels[1:]):
            raise InputError(f"{where}: nothing to learn (no completion tokens within {max_len} tokens)")
        out.append(enc)
    if not out:
        raise InputError(f"--data {path}: no examples in the file")
    return out
