"""merge: an adapter merged into a checkpoint directory, streaming, plus the patch that reproduces it.

When no tensor changes dtype (the usual case), the output shards are the base's shards, header
included, copied by a background thread (copier.ShardCopier) with the changed tensors written at
their offsets. Converting tensors to another dtype (--dtype) rewrites every shard instead
(rewrite.write_checkpoint). The merge itself is numpy (patch.merge_math): torch is never imported,
so a fresh `roselora-export merge` process spends its time on the copy and the changed tensors.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..core.atomic import atomic_dir, check_disjoint, locked_dir, opened
from ..core.dtypes import PATCHABLE, TORCH_NAMES, dtype_name
from .copier import ShardCopier, guess_changed
from .model_dir import ModelDir, open_model_dir
from .rewrite import OVERLAP_BYTES, write_checkpoint
from .safetensors_stream import _pwrite_all

if TYPE_CHECKING:
    import torch

    from ..patch.merge_math import SurvivalReport
    from ..patch.model import Patch

Progress = Callable[[int], None]
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


def out_dtype(dtype: torch.dtype | str | None) -> str | None:
    """The safetensors name (core.dtypes) to store a merge in; None keeps each tensor's own. Imports no torch."""
    if dtype is None:
        return None
    name = dtype_name(dtype)
    if name not in PATCHABLE:
        raise InputError(f"--dtype {dtype}: not one of fp32, fp16, bf16")
    return name


def _converts(model: ModelDir, out: str | None) -> bool:
    """Whether storing the merge in `out` (a safetensors name) changes the dtype (so the layout) of any tensor."""
    return out is not None and any(t.dtype in PATCHABLE and t.dtype != out
                                   for h in model.shards for t in h.tensors.values())


def merge_checkpoint(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     dtype: torch.dtype | str | None = None, patch_path: str | os.PathLike | None = None,
                     progress: Progress | None = None) -> MergeResult:
    """Merge an adapter into a checkpoint directory (streaming), writing the merged model and its patch.

    dtype: store the merged model in this dtype (a torch dtype or a name: "bf16", ...); None keeps the
    base's. The patch is written first, then the model directory appears by one rename (a patch inside
    --out goes into it before): a kill never leaves a model directory without its patch."""
    out = out_dtype(dtype)  # a bad name is an error before anything is written
    out_dir = Path(out_dir)
    patch_path = Path(patch_path) if patch_path else default_patch_path(out_dir)
    check_disjoint({"--out": out_dir, "--patch": patch_path}, {"--base": base_dir, "--adapter": adapter_dir})
    if os.path.realpath(out_dir) == os.path.realpath(patch_path):
        raise InputError(f"--patch {patch_path} is --out itself; give the patch a path of its own")
    if not Path(adapter_dir).is_dir():  # checked before gigabytes are copied; read_adapter checks the rest
        raise InputError(f"--adapter {adapter_dir}: not a directory")
    from ..patch.io import save_patch
    from ..patch.ledger import record_merge

    with locked_dir(open_model_dir(base_dir).path, shared=True):  # an in-place apply on the base waits
        model = open_model_dir(base_dir)
        with atomic_dir(out_dir) as tmp:
            copier = None if _converts(model, out) else ShardCopier(model, tmp, dtype_name=TORCH_NAMES.get(out),
                                                                     expected=guess_changed(adapter_dir, model))
            try:
                patch, survival, encoded = _merge(model, adapter_dir, tmp, out, copier, progress)
            finally:
                if copier is not None:
                    copier.close()
            inside = out_dir.resolve() in patch_path.resolve().parents
            written = tmp / patch_path.resolve().relative_to(out_dir.resolve()) if inside else patch_path
            save_patch(patch, written, encoded)
            # The base's ledger (patch.ledger) plus this patch, inside the directory that is renamed into place.
            record_merge(model.path, tmp, patch, written, patch_path, converted=copier is None)
    return MergeResult(out_dir=out_dir, patch_path=patch_path, patch=patch, survival=survival)


def _merge(model: ModelDir, adapter_dir, tmp: Path, out: str | None, copier: ShardCopier | None,
           progress: Progress | None) -> tuple[Patch, SurvivalReport, dict]:
    """Read the adapter, merge every tensor it changes, and return the patch, survival and file encodings."""
    from ..patch.adapter import read_adapter, resolve_keys
    from ..patch.merge_math import SurvivalReport
    from ..patch.model import Patch
    from ..patch.provenance import adapter_provenance

    adapter = read_adapter(adapter_dir)
    edits = resolve_keys(adapter.edits, model.keys(), tied=model.tied_aliases())
    for name in edits:
        info = model.locations[name][1]
        if info.dtype not in PATCHABLE:
            raise InputError(f"{name}: stored as {info.dtype}; only fp32/fp16/bf16 tensors can be edited")
    prov = adapter_provenance(adapter, model.name, model.fingerprint, out)
    prov["base_numel"] = model.numel
    patch = Patch(provenance=prov)
    survival = SurvivalReport()
    encoded: dict[str, object] = {}

    def keep(name: str, tp, surv, enc) -> None:
        survival.tensors.append(surv)
        if tp is not None:
            patch.tensors[name] = tp
            encoded[name] = enc

    if copier is None:
        _merge_converting(model, tmp, out, edits, keep, progress)
    else:
        _merge_into_copies(model, tmp, [n for n in model.keys() if n in edits], edits, out, keep, copier,
                           progress)
    # Keep the patch's tensor order the checkpoint's order (it is built shard by shard).
    patch.tensors = {k: patch.tensors[k] for k in model.keys() if k in patch.tensors}
    return patch, survival, encoded


def _merge_into_copies(model: ModelDir, tmp: Path, names: list[str], edits: dict, out_dtype: str | None, keep,
                       copier: ShardCopier, progress: Progress | None) -> None:
    """Merge the changed tensors, MERGE_JOBS at a time, each written at its offset in the copied shard.

    A job does all of one tensor (merge, the two sha256, the encoding, then the write once its shard is
    copied; all release the GIL). Jobs in flight hold at most OVERLAP_BYTES (base and merged bits)."""
    import numpy as np

    from ..patch.io import encode_tensor
    from ..patch.merge_math import merge_bits
    from ..patch.model import fill_sha256

    def job(name: str) -> tuple:
        header, info = model.locations[name]
        m = merge_bits(name, model.read_array(name), info.dtype, info.shape, edits[name], out_dtype)
        if m.bits.nbytes != info.nbytes:
            raise RuntimeError(f"{name}: produced {m.bits.nbytes} bytes, stored {info.nbytes}")
        # Everything but the write first: the shard may still be being copied meanwhile.
        encoded = encode_tensor(fill_sha256(m.patch, m.base_bits, m.bits)) if m.patch is not None else None
        copier.wait(header)  # the shard's file exists and the copier is done with it
        with opened(tmp / header.path.name, os.O_WRONLY) as fd:
            _pwrite_all(fd, memoryview(m.bits.view(np.uint8)), info.start)
        copier.wrote(name)
        return m.patch, m.survival, encoded

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


def _merge_converting(model: ModelDir, tmp: Path, out_dtype: str, edits: dict, keep, progress: Progress | None) -> None:
    """Merge while converting tensors to `out_dtype`: every output shard is rewritten (rewrite.write_checkpoint).
    One changed tensor's sha256 and encoding run in a worker thread while this one merges the next, and
    none beside a tensor whose bits would take the two past OVERLAP_BYTES."""
    from ..patch.io import encode_tensor
    from ..patch.merge_math import merge_bits
    from ..patch.model import fill_sha256

    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roselora-encode")
    last: list[tuple[str, Future, int, object, object]] = []  # the job in flight: name, future, bytes, tp, survival

    def wait() -> None:
        while last:
            name, fut, _, tp, surv = last.pop()
            keep(name, tp, surv, fut.result())

    def produce(name: str):
        info = model.locations[name][1]
        if last and last[0][2] + info.nbytes > OVERLAP_BYTES:
            wait()
        m = merge_bits(name, model.read_array(name), info.dtype, info.shape, edits[name], out_dtype)
        wait()
        if m.patch is None:
            keep(name, None, m.survival, None)
        else:
            job = worker.submit(lambda: encode_tensor(fill_sha256(m.patch, m.base_bits, m.bits)))
            last.append((name, job, 2 * m.bits.nbytes, m.patch, m.survival))
        return m.bits

    try:
        write_checkpoint(model, tmp, produce, set(edits), dtype=out_dtype, progress=progress)
        wait()
    finally:
        worker.shutdown(wait=True, cancel_futures=True)
