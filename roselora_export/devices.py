"""Where and in what dtype to run: `--device` and `--dtype` names turned into torch and onnxruntime terms.

Device names are `auto`, `cpu`, `cuda` or `cuda:N`; `auto` is CUDA when torch sees a GPU, else the
CPU. Each resolver returns what it picked and, for `auto`, a one-line note saying so (the CLI prints
it; nothing here prints). A device that is not there is an InputError, never a silent fallback.
"""
from __future__ import annotations

import re

from .core import dtypes
from .errors import InputError

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
DTYPE_NAMES = ("fp32", "bf16", "fp16")
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def _parse(name: str) -> tuple[str, int | None]:
    m = _DEVICE.match(str(name).strip().lower())
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise InputError(f"--device {name}: not a device name (use {DEVICE_NAMES})")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def torch_device(name: str = "auto"):
    """(torch.device, note): `note` is one line saying what `auto` picked, None for an explicit name."""
    import torch

    kind, index = _parse(name)
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0"), f"device: cuda:0 (auto: {torch.cuda.get_device_name(0)})"
        return torch.device("cpu"), "device: cpu (auto: torch sees no CUDA device)"
    if kind == "cpu":
        return torch.device("cpu"), None
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise InputError(f"--device {name}: no CUDA device is available here ({why}); use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise InputError(f"--device {name}: there {'is' if count == 1 else 'are'} only {count} CUDA device(s) "
                         f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index or 0), None


def torch_dtype(name: str | None):
    """The torch dtype for fp32 / bf16 / fp16 (None stays None: the caller's default)."""
    if name is None:
        return None
    short = str(name).strip().lower()
    if short not in DTYPE_NAMES:
        raise InputError(f"--dtype {name}: use one of {', '.join(DTYPE_NAMES)}")
    return dtypes.torch_dtype(short)


def ort_providers(name: str = "auto") -> tuple[list, str | None]:
    """(onnxruntime providers, note) for a device name: the CUDA execution provider for cuda[:N], the CPU
    provider for cpu; `auto` takes CUDA when this onnxruntime build has it and a GPU is present."""
    import onnxruntime as ort

    kind, index = _parse(name)
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if kind == "auto":
        from .onnx.session import default_providers

        providers = default_providers()
        picked = "cuda:0 (CUDAExecutionProvider)" if providers[0] == "CUDAExecutionProvider" else "cpu"
        why = "" if has_cuda else ", this onnxruntime has no CUDA execution provider"
        return providers, f"device: {picked} (auto{why})"
    if kind == "cpu":
        return ["CPUExecutionProvider"], None
    if not has_cuda:
        raise InputError(f"--device {name}: this onnxruntime has no CUDA execution provider "
                         "(install onnxruntime-gpu instead of onnxruntime); use --device cpu")
    cuda = ("CUDAExecutionProvider", {"device_id": str(index)}) if index else "CUDAExecutionProvider"
    return [cuda, "CPUExecutionProvider"], None
