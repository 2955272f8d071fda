"""Text generation on the live model for the server: one answer, one weight state.

`Engine.generate` holds `runtime.serving()` around the whole answer (every prompt of one request),
so a patch applied or reverted meanwhile waits for it, and the answer names the state it came from:
`state` is "base" or "patches:ID,ID" (the runtime's ids of the patches in the weights, read under
the same lock). Greedy decoding at temperature 0, sampling otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..runtime import PatchRuntime

CHAT_MAX_TOKENS = 256  # an answer's length when a chat request gives no max_tokens (OpenAI: up to the context)


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Generation:
    answers: list[Answer]
    state: str  # the weight state every answer came from


def state_label(runtime: PatchRuntime) -> str:
    """'base', or 'patches:' and the active patch ids in order of application (read it inside serving())."""
    ids = [str(h.id) for h in runtime.active]
    return "patches:" + ",".join(ids) if ids else "base"


class Engine:
    """The model, its tokenizer and its PatchRuntime; generates answers for the HTTP layer."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.runtime = PatchRuntime(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0)  # 0: no limit known
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)

    # ---- prompts ------------------------------------------------------------------------------
    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat, through the tokenizer's chat template (plain 'role: content' lines without one)."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode_text(text)

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None) -> Generation:
        """Answer each tokenized prompt in turn, all from one weight state. InputError for a request too long."""
        for ids in prompts:
            if not ids:
                raise InputError("the prompt is empty")
            if self.context and len(ids) + max_tokens > self.context:
                raise InputError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                 f"context of {self.context} tokens")
        with self.runtime.serving():
            state = state_label(self.runtime)
            answers = [self._one(ids, max_tokens, temperature, top_p, stop or []) for ids in prompts]
        return Generation(answers, state)

    def _one(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, stop: list[str]) -> Answer:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        input_ids = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=max_tokens, pad_token_id=self.pad_id, **sampling)
        new = out[0, len(ids):].tolist()
        ended = bool(new) and new[-1] in self.eos_ids
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        finish = "stop" if ended or cut >= 0 else "length"
        return Answer(text, finish, len(ids), len(new))
