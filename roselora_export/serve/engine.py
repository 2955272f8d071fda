"""Text generation on the live model for the server: one answer, one weight state.

`Engine.generate` holds `runtime.serving()` around the whole answer (every prompt of one request), so a
patch write waits for it, and the answer names its state: "base" or "patches:ID,ID". Greedy at
temperature 0, sampling otherwise. `concurrency` bounds the answers generated at once (the others queue
in order; None: the thread pool's). Streaming is the same call with callbacks: `on_state(state)` once the
lock is held, `on_text(index, piece)` as text becomes final (never past a stop sequence, never half a
character), `cancelled()` polled after every token. The pieces of one answer join to its `Answer.text`.
"""
from __future__ import annotations

from collections.abc import Callable
import threading
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

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


class FifoSlots:
    """A semaphore that serves its waiters in arrival order (threading.Semaphore lets a newcomer barge in):
    a freed slot is handed to the longest waiter directly."""

    def __init__(self, n: int) -> None:
        self._lock = threading.Lock()
        self._free = n
        self._waiting: deque[threading.Event] = deque()

    def __enter__(self) -> None:
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait()

    def __exit__(self, *exc) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._free += 1


def state_label(runtime: PatchRuntime) -> str:
    """'base', or 'patches:' and the active patch ids in order of application (read it inside serving())."""
    ids = [str(h.id) for h in runtime.active]
    return "patches:" + ",".join(ids) if ids else "base"


class Engine:
    """The model, its tokenizer and its PatchRuntime; generates answers for the HTTP layer."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, concurrency: int | None = None) -> None:
        if concurrency is not None and concurrency < 1:
            raise InputError(f"--concurrency must be at least 1 (got {concurrency})")
        self.model = model
        self.concurrency = concurrency
        self._slots = FifoSlots(concurrency) if concurrency else None
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

    # ---- generation ---------------------------------------------------------------------------
    def check(self, prompts: list[list[int]], max_tokens: int) -> None:
        """InputError for an empty prompt or one that does not fit the context with max_tokens."""
        for ids in prompts:
            if not ids:
                raise InputError("the prompt is empty")
            if self.context and len(ids) + max_tokens > self.context:
                raise InputError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                 f"context of {self.context} tokens")

    def generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None, on_state: Callable[[str], None] | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Generation:
        """Answer each tokenized prompt in turn, all from one weight state. InputError for a request too long."""
        self.check(prompts, max_tokens)
        with self._slots if self._slots is not None else nullcontext(), self.runtime.serving():
            state = state_label(self.runtime)
            if on_state is not None:
                on_state(state)
            answers = []
            for i, ids in enumerate(prompts):
                emit = (lambda piece, i=i: on_text(i, piece)) if on_text is not None else None
                answers.append(self._one(ids, max_tokens, temperature, top_p, stop or [], emit, cancelled))
        return Generation(answers, state)

    def _one(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, stop: list[str],
             emit: Callable[[str], None] | None = None, cancelled: Callable[[], bool] | None = None) -> Answer:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        input_ids = torch.tensor([ids], device=self.device)
        watch = _Watch(self.tokenizer, stop, emit, cancelled) if emit is not None or cancelled is not None else None
        extra = {"streamer": watch, "stopping_criteria": [watch]} if watch is not None else {}
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=max_tokens, pad_token_id=self.pad_id, **sampling, **extra)
        new = out[0, len(ids):].tolist()
        ended = bool(new) and new[-1] in self.eos_ids
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = _stop_at(text, stop)
        if cut >= 0:
            text = text[:cut]
        if watch is not None:
            watch.finish(text)
        finish = "stop" if ended or cut >= 0 else "length"
        return Answer(text, finish, len(ids), len(new))


def _stop_at(text: str, stop: list[str]) -> int:
    """Where the first stop sequence starts in text, or -1."""
    return min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)


class _Watch(BaseStreamer, StoppingCriteria):
    """generate()'s streamer and stopping criterion at once: decodes the new tokens as they come, passes on
    the text that can no longer change (held back: a partial character, a possible start of a stop
    sequence), and ends generation once a stop sequence is complete or `cancelled()` says so."""

    def __init__(self, tokenizer, stop: list[str], emit, cancelled) -> None:
        self.tokenizer, self.stop, self.emit, self.cancelled = tokenizer, [s for s in stop if s], emit, cancelled
        self.tokens: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.done = False  # a stop sequence is complete

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        self.tokens += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = _stop_at(text, self.stop)
        if cut >= 0:
            self.done = True
            safe = cut
        else:
            safe = len(text) - max((len(s) - 1 for s in self.stop), default=0)
            while safe > 0 and text[safe - 1] == "\ufffd":  # a character whose bytes are not all here yet
                safe -= 1
        self._send(text, safe)

    def end(self) -> None:
        pass

    def finish(self, text: str) -> None:
        """After generate(): send whatever of the final text is not sent yet."""
        self._send(text, len(text))

    def _send(self, text: str, upto: int) -> None:
        if self.emit is not None and upto > self.sent:
            self.emit(text[self.sent:upto])
            self.sent = upto

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:  # StoppingCriteria
        stop = self.done or (self.cancelled is not None and self.cancelled())
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
