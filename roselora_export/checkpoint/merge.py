"""merge: an adapter merged into a checkpoint directory, streaming, plus the patch that reproduces it.

When no tensor changes dtype (the usual case), the output shards are the base's shards, header
included, copied by a background thread (copier.ShardCopier) with the changed tensors written at
their offsets. The copy starts before this module imports torch: in a fresh `roselora-export merge`
process the kernel copies the shards on one core while the other imports torch, and what is left
after start-up is the merge of the changed tensors, two at a time. Importing this module imports
neither torch nor the patch package.
"""
from __future__ import annotations

import gc
import hashlib
import os
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from .atomic import atomic_dir
from .copier import ShardCopier, guess_changed
from .model_dir import ModelDir, open_model_dir
from .safetensors_stream import _pwrite_all, tensor_bytes

if TYPE_CHECKING:
    import torch

    from ..patch.build import SurvivalReport
    from ..patch.model import Patch

Progress = Callable[[int], None]
FLOAT_DTYPES = ("F32", "F16", "BF16")
ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # torch dtype name -> safetensors dtype
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", **{n: n for n in ST_NAMES}}
OVERLAP_BYTES = 256 << 20  # merge does not hash one tensor while merging the next when both hold more than this
MERGE_JOBS = 2  # changed tensors merged at once (a copy thread runs beside them)


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


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """"bfloat16" for torch.bfloat16, "bf16" or "bfloat16" (None for None), without importing torch."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = DTYPE_ALIASES.get(dtype.lower().removeprefix("torch."))
        if name is None:
            raise InputError(f"--dtype {dtype}: not one of fp32, fp16, bf16")
        return name
    return str(dtype).removeprefix("torch.")


def _converts(model: ModelDir, dtype) -> bool:
    """Whether storing the merge in `dtype` changes the dtype (so the layout) of any tensor."""
    if dtype is None:
        return False
    target = ST_NAMES.get(_dtype_name(dtype))
    return target is None or any(t.dtype in FLOAT_DTYPES and t.dtype != target
                                 for h in model.shards for t in h.tensors.values())


def merge_checkpoint(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     dtype: torch.dtype | str | None = None, patch_path: str | os.PathLike | None = None,
                     progress: Progress | None = None) -> MergeResult:
    """Merge an adapter into a checkpoint directory (streaming), writing the merged model and its patch.

    dtype: store the merged model in this dtype (torch.bfloat16, or a name: "bf16", "bfloat16", ...);
    None keeps the base's. A name lets a fresh process start copying before it imports torch.
    """
    _dtype_name(dtype)  # a bad name is an error before anything is written
    model = open_model_dir(base_dir)
    out_dir = Path(out_dir)
    patch_path = Path(patch_path) if patch_path else default_patch_path(out_dir)
    if not Path(adapter_dir).is_dir():  # checked before gigabytes are copied; read_adapter checks the rest
        raise InputError(f"--adapter {adapter_dir}: not a directory")
    with atomic_dir(out_dir) as tmp:
        copier = None if _converts(model, dtype) else ShardCopier(model, tmp, dtype_name=_dtype_name(dtype),
                                                                   expected=guess_changed(adapter_dir, model))
        try:
            patch, survival, encoded = _merge(model, adapter_dir, tmp, dtype, copier, progress)
        finally:
            if copier is not None:
                copier.close()
    from ..patch.io import save_patch

    save_patch(patch, patch_path, encoded)
    return MergeResult(out_dir=out_dir, patch_path=patch_path, patch=patch, survival=survival)


def _import_torch() -> int | None:
    """Import torch and the patch package, if this process has not yet, with the cyclic GC paused; then
    freeze what they made, and give torch one intra-op thread. Returns torch's thread count before
    (for the caller to restore), or None when torch was already imported (then nothing is changed).

    Their import creates about a million long-lived objects: collections during the import, and the
    final one at exit, walk them all (measured: ~0.1 s and ~0.35 s of a fresh `merge` process).
    gc.freeze() moves them (and whatever else exists then) to the permanent generation, where no
    collection visits them; they live until exit anyway. Merge runs its own jobs side by side, so
    torch's thread pool would only add threads spinning for the same cores.
    """
    if "torch" in sys.modules:
        return None
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch

        from ..patch import build, io  # noqa: F401
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def _merge(model: ModelDir, adapter_dir, tmp: Path, dtype, copier: ShardCopier | None,
           progress: Progress | None) -> tuple[Patch, SurvivalReport, dict]:
    # Imported here, not at the top: with a copier, the shards are being copied meanwhile.
    threads = _import_torch()
    import torch

    try:
        return _merge_with_torch(model, adapter_dir, tmp, dtype, copier, progress)
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


def _merge_with_torch(model: ModelDir, adapter_dir, tmp: Path, dtype, copier: ShardCopier | None,
                      progress: Progress | None) -> tuple[Patch, SurvivalReport, dict]:
    import numpy as np
    import torch

    from ..patch.adapter import read_adapter, resolve_keys
    from ..patch.build import SurvivalReport, adapter_provenance, fill_sha256, merge_tensor
    from ..patch.io import encode_tensor
    from ..patch.model import Patch
    from .safetensors_stream import ST_DTYPES

    if isinstance(dtype, str):
        dtype = getattr(torch, _dtype_name(dtype))
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
    encoded: dict[str, object] = {}

    def merge_one(name: str) -> tuple:
        """Merge one tensor: (merged tensor, its TensorPatch or None, survival, deferred sha256 arguments)."""
        later: list = []
        merged, tp, surv = merge_tensor(name, model.read(name), edits[name], dtype, deferred=later)
        return merged, tp, surv, (later[0] if tp is not None else None)

    def finish(tp, base_bits, new_bits, base_sha256: str | None = None):
        """The two whole-tensor sha256 (the base's given when already known), then the patch encoding."""
        if base_sha256 is None:
            fill_sha256(tp, base_bits, new_bits)
        else:
            tp.base_sha256 = base_sha256
            tp.patched_sha256 = hashlib.sha256(memoryview(new_bits.view(np.uint8))).hexdigest()
        return encode_tensor(tp)

    def keep(name: str, tp, surv, enc) -> None:
        survival.tensors.append(surv)
        if tp is not None:
            patch.tensors[name] = tp
            encoded[name] = enc

    if copier is None:
        _merge_converting(model, tmp, dtype, set(edits), merge_one, finish, keep, progress)
    else:
        _merge_into_copies(model, tmp, [n for n in model.keys() if n in edits], merge_one, finish, keep, copier,
                           progress, ST_DTYPES)
    # Keep the patch's tensor order the checkpoint's order (it is built shard by shard).
    patch.tensors = {k: patch.tensors[k] for k in model.keys() if k in patch.tensors}
    return patch, survival, encoded


def _merge_into_copies(model: ModelDir, tmp: Path, names: list[str], merge_one, finish, keep, copier: ShardCopier,
                       progress: Progress | None, st_dtypes: dict) -> None:
    """Merge the changed tensors, MERGE_JOBS at a time, each written at its offset in the copied shard.

    A job does all the work of one tensor: merge, write (once its shard is copied), the two whole-tensor
    sha256 and the patch encoding. Torch, numpy, hashlib, zlib and the writes release the GIL, so two
    jobs keep two cores busy. Jobs are bounded by OVERLAP_BYTES (two per tensor: base and merged
    bits), so a large tensor runs alone and memory stays that of a few tensors.
    """
    def job(name: str) -> tuple:
        header, info = model.locations[name]
        merged, tp, surv, later = merge_one(name)
        if st_dtypes.get(merged.dtype) != info.dtype or tuple(merged.shape) != info.shape:
            raise RuntimeError(f"{name}: produced {merged.dtype} {tuple(merged.shape)}, stored {info.dtype} {info.shape}")
        copier.wait(header)  # the shard's file exists and the copier is done with it
        fd = os.open(tmp / header.path.name, os.O_WRONLY)
        try:
            _pwrite_all(fd, tensor_bytes(merged), info.start)
        finally:
            os.close(fd)
        copier.wrote(name)
        # The copier may have hashed the base bytes already (while torch was being imported): the bits
        # merged here are those bytes (the fast path converts no dtype), so only the patched hash is left.
        return tp, surv, (finish(*later, copier.base_sha256(name)) if later is not None else None)

    def report(block: bool = False) -> None:
        done = copier.poll(block)
        if progress and done:
            progress(done)

    pool = ThreadPoolExecutor(max_workers=MERGE_JOBS, thread_name_prefix="roselora-merge")
    inflight: deque[tuple[str, Future, int]] = deque()  # in checkpoint order

    def collect() -> None:
        name, fut, _ = inflight.popleft()
        keep(name, *fut.result())

    try:
        for name in names:
            held = 2 * model.locations[name][1].nbytes
            while inflight and (len(inflight) >= MERGE_JOBS or sum(j[2] for j in inflight) + held > OVERLAP_BYTES):
                collect()
            inflight.append((name, pool.submit(job, name), held))
            report()
        while inflight:
            collect()
        copier.finish()
        report(block=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _merge_converting(model: ModelDir, tmp: Path, dtype, changed: set[str], merge_one, finish, keep,
                      progress: Progress | None) -> None:
    """Merge while converting tensors to `dtype`: every output shard is rewritten (ops.write_checkpoint).

    Each changed tensor's two whole-tensor sha256 and its file encoding run in a worker thread
    (hashlib and zlib release the GIL) while this thread merges and writes the next tensor. One job
    at a time, and none beside a large tensor's merge: the job holds one tensor's base and merged
    bits, so memory stays about that of a serial merge plus OVERLAP_BYTES.
    """
    from .ops import write_checkpoint

    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roselora-encode")
    last: list[tuple[str, Future, int, object, object]] = []  # the job in flight: name, future, bytes, tp, survival

    def wait() -> None:
        while last:
            name, fut, _, tp, surv = last.pop()
            keep(name, tp, surv, fut.result())

    def produce(name: str):
        nbytes = model.locations[name][1].nbytes
        if last and last[0][2] + nbytes > OVERLAP_BYTES:
            wait()
        merged, tp, surv, later = merge_one(name)
        wait()
        if tp is None:
            keep(name, None, surv, None)
        else:
            last.append((name, worker.submit(finish, *later), 2 * later[1].nbytes, tp, surv))
        return merged

    try:
        write_checkpoint(model, tmp, produce, changed, dtype=dtype, progress=progress)
        wait()
    finally:
        worker.shutdown(wait=True, cancel_futures=True)
