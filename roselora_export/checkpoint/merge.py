"""merge: an adapter merged into a checkpoint directory, streaming, plus the patch that reproduces it.

When no tensor changes dtype (the usual case), the output shards are the base's shards copied whole
(header included) with the changed tensors overwritten at their offsets. The copy starts before this
module imports torch: in a fresh `roselora-export merge` process the kernel copies the shards on one
core while the other imports torch, and what is left after start-up is the merge of the changed
tensors. Importing this module imports neither torch nor the patch package.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from .atomic import atomic_dir
from .copier import ShardCopier
from .model_dir import ModelDir, open_model_dir
from .safetensors_stream import _pwrite_all, tensor_bytes

if TYPE_CHECKING:
    import torch

    from ..patch.build import SurvivalReport
    from ..patch.model import Patch

Progress = Callable[[int], None]
FLOAT_DTYPES = ("F32", "F16", "BF16")
ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # torch dtype name -> safetensors dtype
OVERLAP_BYTES = 256 << 20  # merge does not hash one tensor while merging the next when both hold more than this


def default_patch_path(out_dir: str | os.PathLike) -> Path:
    """Where `merge` writes the patch when --patch is not given: beside the output directory."""
    out = Path(out_dir)
    return out.with_name(out.name + ".patch.safetensors")


@dataclass
class MergeResult:
    out_dir: Path
    patch_path: Path
    patch: Patch
    survival: SurvivalReport
    onnx: dict | None = None
    notes: list[str] = field(default_factory=list)


def _dtype_name(dtype) -> str | None:
    """"float32" for torch.float32 (None for None), without importing torch."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _converts(model: ModelDir, dtype) -> bool:
    """Whether storing the merge in `dtype` changes the dtype (so the layout) of any tensor."""
    if dtype is None:
        return False
    target = ST_NAMES.get(_dtype_name(dtype))
    return target is None or any(t.dtype in FLOAT_DTYPES and t.dtype != target
                                 for h in model.shards for t in h.tensors.values())


def merge_checkpoint(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     dtype: torch.dtype | None = None, patch_path: str | os.PathLike | None = None,
                     progress: Progress | None = None) -> MergeResult:
    """Merge an adapter into a checkpoint directory (streaming), writing the merged model and its patch."""
    model = open_model_dir(base_dir)
    out_dir = Path(out_dir)
    patch_path = Path(patch_path) if patch_path else default_patch_path(out_dir)
    if not Path(adapter_dir).is_dir():  # checked before gigabytes are copied; read_adapter checks the rest
        raise InputError(f"--adapter {adapter_dir}: not a directory")
    with atomic_dir(out_dir) as tmp:
        copier = None if _converts(model, dtype) else ShardCopier(model, tmp, dtype_name=_dtype_name(dtype))
        try:
            patch, survival, encoded = _merge(model, adapter_dir, tmp, dtype, copier, progress)
        finally:
            if copier is not None:
                copier.close()
    from ..patch.io import save_patch

    save_patch(patch, patch_path, encoded)
    return MergeResult(out_dir=out_dir, patch_path=patch_path, patch=patch, survival=survival)


def _merge(model: ModelDir, adapter_dir, tmp: Path, dtype, copier: ShardCopier | None,
           progress: Progress | None) -> tuple[Patch, SurvivalReport, dict]:
    # Imported here, not at the top: with a copier, the shards are being copied meanwhile.
    from ..patch.adapter import read_adapter, resolve_keys
    from ..patch.build import SurvivalReport, adapter_provenance, fill_sha256, merge_tensor
    from ..patch.io import encode_tensor
    from ..patch.model import Patch
    from .safetensors_stream import ST_DTYPES

    adapter = read_adapter(adapter_dir)
    edits = resolve_keys(adapter.edits, model.keys(), tied=model.tied_aliases())
    for name in edits:
        info = model.locations[name][1]
        if info.dtype not in FLOAT_DTYPES:
            raise InputError(f"{name}: stored as {info.dtype}; only fp32/fp16/bf16 tensors can be edited")
    prov = adapter_provenance(adapter, model.name, model.fingerprint, dtype)
    prov["base_numel"] = model.numel
    patch = Patch(provenance=prov)
    survival = SurvivalReport()
    # Each changed tensor's two whole-tensor sha256 and its file encoding run in a worker thread
    # (hashlib and zlib release the GIL) while this thread merges and writes the next tensor. One job
    # at a time, and none beside a large tensor's merge: the job holds one tensor's base and merged
    # bits, so memory stays about that of a serial merge plus OVERLAP_BYTES.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roselora-encode")
    encoded: dict[str, tuple[dict, dict]] = {}
    last: list[tuple[Future, int]] = []  # the job in flight and the bytes it holds

    def finish(tp, base_bits, new_bits) -> None:
        fill_sha256(tp, base_bits, new_bits)
        encoded[tp.name] = encode_tensor(tp, "t")

    def wait() -> None:
        while last:
            last.pop()[0].result()

    def produce(name: str) -> torch.Tensor:
        nbytes = model.locations[name][1].nbytes
        if last and last[0][1] + nbytes > OVERLAP_BYTES:
            wait()
        later: list = []
        merged, tp, surv = merge_tensor(name, model.read(name), edits[name], dtype, deferred=later)
        survival.tensors.append(surv)
        wait()
        if tp is not None:
            patch.tensors[name] = tp
            last.append((worker.submit(finish, *later[0]), 2 * later[0][1].nbytes))
        return merged

    try:
        if copier is None:
            from .ops import write_checkpoint

            write_checkpoint(model, tmp, produce, set(edits), dtype=dtype, progress=progress)
        else:
            _overwrite_changed(model, tmp, produce, set(edits), copier, progress, ST_DTYPES)
        wait()
    finally:
        worker.shutdown(wait=True, cancel_futures=True)
    # Keep the patch's tensor order the checkpoint's order (it is built shard by shard).
    patch.tensors = {k: patch.tensors[k] for k in model.keys() if k in patch.tensors}
    return patch, survival, encoded


def _overwrite_changed(model: ModelDir, tmp: Path, produce: Callable[[str], torch.Tensor], changed: set[str],
                       copier: ShardCopier, progress: Progress | None, st_dtypes: dict) -> None:
    """Write each changed tensor over its bytes in the copied shard (same dtype, shape and offset)."""
    def report(block: bool = False) -> None:
        done = copier.poll(block)
        if progress and done:
            progress(done)

    for header in model.shards:
        names = [n for n in header.tensors if n in changed]
        if not names:
            continue
        fd = None
        try:
            for name in names:
                info = header.tensors[name]
                new = produce(name)
                if st_dtypes.get(new.dtype) != info.dtype or tuple(new.shape) != info.shape:
                    raise RuntimeError(f"{name}: produced {new.dtype} {tuple(new.shape)}, stored {info.dtype} {info.shape}")
                if fd is None:
                    copier.wait(header)  # the copy of this shard must be complete before its bytes are overwritten
                    fd = os.open(tmp / header.path.name, os.O_WRONLY)
                _pwrite_all(fd, tensor_bytes(new), info.start)
                del new
                report()
        finally:
            if fd is not None:
                os.close(fd)
    copier.finish()
    report(block=True)
