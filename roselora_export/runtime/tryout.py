"""What `roselora-export try` does: answer prompts with the base model, with a patch applied live, and
after reverting it, timing apply and revert and checking the reverted weights bit for bit."""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..chat import greedy_continuation, require_chat_template
from ..devices import torch_device, torch_dtype
from ..errors import InputError
from ..patch.model import DTYPE_NAMES, Patch, tensor_bits
from .live import PatchRuntime


@dataclass
class Answer:
    prompt: str
    base: str
    patched: str
    reverted: str
    target: str | None = None  # the request's target_new, when the prompt came from a requests file
    chat: bool = False  # asked through the model's chat template


@dataclass
class TryResult:
    model: str
    patch: str
    device: str
    dtype: str
    patch_load_ms: float
    apply_ms: float
    revert_ms: float
    tensors: int
    nnz: int
    base_sha256: str  # of the whole state dict before apply
    reverted_sha256: str  # the same after revert
    answers: list[Answer] = field(default_factory=list)  # one per prompt, in order

    @property
    def bit_identical(self) -> bool:
        return self.base_sha256 == self.reverted_sha256

    def to_dict(self) -> dict:
        return {**asdict(self), "bit_identical": self.bit_identical}


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over the names and bits of every parameter and buffer, in name order (tied tensors once)."""
    h = hashlib.sha256()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    seen = set()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            h.update(name.encode())
            h.update(tensor_bits(t.cpu()) if t.dtype in DTYPE_NAMES else t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def patch_dtype(patch: Patch, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype to load the model in: the one given (fp32, fp16, bf16), or the patch's (all its tensors share one)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        return torch_dtype(dtype)
    dtypes = {tp.dtype for tp in patch.tensors.values()}
    if len(dtypes) > 1:
        raise InputError("the patch mixes dtypes; pass --dtype to choose the one to load the model in")
    return dtypes.pop() if dtypes else torch.float32


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def try_patch(model_dir: str | os.PathLike, patch_path: str | os.PathLike, prompts: str | Sequence[str], *,
              device: str | torch.device = "cpu", max_new_tokens: int = 20, dtype: str | torch.dtype | None = None,
              targets: Sequence[str | None] | None = None, progress: bool = True,
              chat: bool | Sequence[bool] = False) -> TryResult:
    """Greedy answers to each prompt before, with and after a live patch, with timings and the bit check.

    `device` is a torch.device or a name (cpu, cuda, cuda:N, auto); `targets` (optional, one per prompt)
    are carried into the answers; `progress=False` hides the model-loading bar; `chat` (one flag, or one
    per prompt) asks prompts through the model's chat template (InputError if it has none)."""
    from ..models import load_model, load_tokenizer
    from ..patch import load_patch

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    targets = list(targets) if targets is not None else [None] * len(prompts)
    chats = [chat] * len(prompts) if isinstance(chat, bool) else list(chat)
    if not prompts or len(targets) != len(prompts) or len(chats) != len(prompts):
        raise InputError("give at least one prompt (and one target per prompt, if any)")
    dev = device if isinstance(device, torch.device) else torch_device(device)[0]
    t0 = time.perf_counter()
    patch = load_patch(patch_path)
    load_ms = (time.perf_counter() - t0) * 1e3
    dt = patch_dtype(patch, dtype)
    tokenizer = load_tokenizer(model_dir)
    if any(chats):
        require_chat_template(tokenizer)
    model = load_model(model_dir, dtype=dt, progress=progress).to(dev)
    runtime = PatchRuntime(model)

    def answer_all() -> list[str]:
        with runtime.serving():
            return [greedy_continuation(model, tokenizer, p, max_new_tokens, c).strip() for p, c in zip(prompts, chats)]

    base = answer_all()
    base_sha = state_sha256(model)
    handles = []
    apply_ms = _timed(lambda: handles.append(runtime.apply(patch)), dev)
    patched = answer_all()
    revert_ms = _timed(lambda: runtime.revert(handles[0]), dev)
    reverted = answer_all()
    return TryResult(
        model=str(model_dir), patch=str(patch_path), device=str(dev), dtype=DTYPE_NAMES[dt],
        patch_load_ms=load_ms, apply_ms=apply_ms, revert_ms=revert_ms,
        tensors=len(handles[0].names), nnz=handles[0].nnz, base_sha256=base_sha, reverted_sha256=state_sha256(model),
        answers=[Answer(p, b, a, r, t, c) for p, b, a, r, t, c in zip(prompts, base, patched, reverted, targets, chats)],
    )
