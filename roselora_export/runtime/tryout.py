"""What `roselora-export try` does: answer a prompt with the base model, with a patch applied live,
and after reverting it, timing apply and revert and checking the reverted weights bit for bit."""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import InputError
from ..patch.model import DTYPE_NAMES, DTYPES_BY_NAME, Patch, tensor_bits
from .live import PatchRuntime


@dataclass
class TryResult:
    model: str
    patch: str
    device: str
    dtype: str
    prompt: str
    base_answer: str
    patched_answer: str
    reverted_answer: str
    patch_load_ms: float
    apply_ms: float
    revert_ms: float
    tensors: int
    nnz: int
    base_sha256: str  # of the whole state dict before apply
    reverted_sha256: str  # the same after revert

    @property
    def bit_identical(self) -> bool:
        return self.base_sha256 == self.reverted_sha256

    def to_dict(self) -> dict:
        return {**asdict(self), "bit_identical": self.bit_identical}


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over every state-dict entry (name and raw bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_bits(t.detach().cpu()) if t.dtype in DTYPE_NAMES else t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a device name (cpu, cuda, cuda:1)") from None


def patch_dtype(patch: Patch, dtype: str | None) -> torch.dtype:
    """The dtype to load the model in: the one given, or the patch's (all its tensors share one)."""
    if dtype:
        key = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}.get(dtype.lower(), dtype.upper())
        if key not in DTYPES_BY_NAME:
            raise InputError(f"--dtype {dtype}: use fp32, fp16 or bf16")
        return DTYPES_BY_NAME[key]
    dtypes = {tp.dtype for tp in patch.tensors.values()}
    if len(dtypes) > 1:
        raise InputError("the patch mixes dtypes; pass --dtype to choose the one to load the model in")
    return dtypes.pop() if dtypes else torch.float32


def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def try_patch(model_dir: str | os.PathLike, patch_path: str | os.PathLike, prompt: str, *, device: str = "cpu",
              max_new_tokens: int = 20, dtype: str | None = None) -> TryResult:
    """Greedy answers to `prompt` before, with and after a live patch, with timings and the bit check."""
    from ..models import load_model, load_tokenizer
    from ..patch import load_patch

    dev = resolve_device(device)
    t0 = time.perf_counter()
    patch = load_patch(patch_path)
    load_ms = (time.perf_counter() - t0) * 1e3
    torch_dtype = patch_dtype(patch, dtype)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch_dtype).to(dev)
    runtime = PatchRuntime(model)

    with runtime.serving():
        base_answer = greedy(model, tokenizer, prompt, max_new_tokens)
    base_sha = state_sha256(model)
    handles = []
    apply_ms = _timed(lambda: handles.append(runtime.apply(patch)), dev)
    with runtime.serving():
        patched_answer = greedy(model, tokenizer, prompt, max_new_tokens)
    revert_ms = _timed(lambda: runtime.revert(handles[0]), dev)
    with runtime.serving():
        reverted_answer = greedy(model, tokenizer, prompt, max_new_tokens)
    return TryResult(
        model=str(model_dir), patch=str(patch_path), device=str(dev), dtype=DTYPE_NAMES[torch_dtype], prompt=prompt,
        base_answer=base_answer, patched_answer=patched_answer, reverted_answer=reverted_answer,
        patch_load_ms=load_ms, apply_ms=apply_ms, revert_ms=revert_ms,
        tensors=len(handles[0].names), nnz=handles[0].nnz, base_sha256=base_sha, reverted_sha256=state_sha256(model),
    )
