"""Patch size: bytes per nonzero of SmolLM2 edit patches, against scipy.sparse.save_npz and a dense delta.

    .venv/bin/python bench/patch_size.py [--no-real]

For each dtype (the merged model stored in fp32, fp16, bf16) the same edit is written three ways:
our patch file; `scipy.sparse.save_npz` of the same changes (CSR, int32 indices, the values as their
16/32-bit patterns since scipy has no bf16; compressed, its default, and uncompressed); and a
safetensors file of the dense delta of every touched tensor. Goal: patch bytes <= 1.25 x nnz x value bytes.
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import machine_line, write_section  # noqa: E402
from bench.synthetic_adapter import write_synthetic_adapter  # noqa: E402
from roselora_export.checkpoint import LazyStateDict, open_model_dir  # noqa: E402
from roselora_export.models import demo_model_dir  # noqa: E402
from roselora_export.patch import SurvivalReport, build_patch_from_adapter, save_patch  # noqa: E402
from roselora_export.patch.io import matrix_shape  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def npz_bytes(patch, compressed: bool) -> int:
    total = 0
    for tp in patch.tensors.values():
        nrows, ncols = matrix_shape(tp.shape)
        rows, cols = np.divmod(tp.flat_index, ncols)
        m = scipy.sparse.csr_array((tp.xor_bits, (rows.astype(np.int32), cols.astype(np.int32))), shape=(nrows, ncols))
        m.indices, m.indptr = m.indices.astype(np.int32), m.indptr.astype(np.int32)
        buf = io.BytesIO()
        scipy.sparse.save_npz(buf, m, compressed=compressed)
        total += buf.getbuffer().nbytes
    return total


def dense_delta_bytes(patch, base, dtype) -> int:
    from safetensors.torch import save

    deltas = {}
    for name, tp in patch.tensors.items():
        b = base[name].to(dtype)
        bits = b.reshape(-1).view(torch.int32 if dtype == torch.float32 else torch.int16).clone()
        idx = torch.from_numpy(tp.flat_index)
        xor = torch.from_numpy(tp.xor_bits.view(np.int32 if dtype == torch.float32 else np.int16).copy())
        bits[idx] ^= xor
        deltas[name] = (bits.view(dtype).reshape(b.shape).float() - b.float()).to(dtype)
    return len(save(deltas))


def real_edit(model_dir: Path, out: Path, *, clamp: str = "default") -> Path | None:
    """Train one RoseLoRA edit with the project's trainer (paper defaults; clamp "none" as the demo does)."""
    try:
        from roselora_export.edit.requests import EditRequest
        from roselora_export.edit.train import save_edit, train_edit
        from roselora_export.method.config import RoseLoraConfig
        from roselora_export.models import load_model, load_tokenizer
    except ImportError:
        return None
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    req = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome")
    config = RoseLoraConfig(clamp=None) if clamp == "none" else None
    result = train_edit(model, tok, [req], method="roselora", config=config)
    return save_edit(result, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-real", action="store_true", help="skip training a real edit")
    args = ap.parse_args()
    torch.set_num_threads(1)  # this machine is shared; one thread is faster and steadier here
    model_dir = demo_model_dir()
    base = LazyStateDict(open_model_dir(model_dir))
    tmp = Path(tempfile.mkdtemp(prefix="patch_size_"))
    edits = {"synthetic RoseLoRA-shaped (r=8, tau=0.05, q/v x 30 layers, A/B at ±3e-3, alpha 32)":
             write_synthetic_adapter(model_dir, tmp / "synthetic")}
    if not args.no_real:
        t0 = time.perf_counter()
        real = real_edit(model_dir, tmp / "real")
        if real is not None:
            edits[f"real RoseLoRA edit (train_edit, paper defaults, 1 request; {time.perf_counter() - t0:.0f} s)"] = real
            t0 = time.perf_counter()
            demo = real_edit(model_dir, tmp / "demo", clamp="none")
            edits[f"real RoseLoRA edit, --clamp none as in `make demo` (1 request; {time.perf_counter() - t0:.0f} s)"] = demo
    rows = []
    for label, adapter in edits.items():
        for dname, dtype in DTYPES.items():
            report = SurvivalReport()
            patch = build_patch_from_adapter(adapter, base, dtype=dtype, report=report)
            path = save_patch(patch, tmp / f"{dname}.patch.safetensors")
            nnz, vb = patch.total_nnz, patch.total_nnz * (4 if dtype == torch.float32 else 2)
            ours = path.stat().st_size
            rows.append((label, dname, nnz, report.lost_fraction, ours, ours / nnz, ours / vb,
                         npz_bytes(patch, True) / nnz, npz_bytes(patch, False) / nnz,
                         dense_delta_bytes(patch, base, dtype) / nnz))
            print(rows[-1], flush=True)
    lines = [
        f"Machine: {machine_line()}. Command: `.venv/bin/python bench/patch_size.py`.",
        "",
        "SmolLM2-135M-Instruct; the merged model stored in each dtype; the patch is relative to the base in that dtype.",
        "`lost` = fraction of the edit's intended nonzeros that changed no stored value (rounded away).",
        "save_npz: CSR with int32 indices and the 16/32-bit value patterns (compressed is its default).",
        "",
        "| edit | dtype | nnz | lost | patch bytes | patch B/nnz | patch / value bytes (goal <= 1.25) "
        "| save_npz B/nnz | save_npz uncompressed B/nnz | dense delta B/nnz |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, dname, nnz, lost, ours, bpn, ratio, npz_c, npz_u, dense in rows:
        lines.append(f"| {label} | {dname} | {nnz} | {lost:.1%} | {ours} | {bpn:.2f} | **{ratio:.2f}** | {npz_c:.2f} | "
                     f"{npz_u:.2f} | {dense:.0f} |")
    missed = [(label, dname) for label, dname, *_, ratio, _npz_c, _npz_u, _dense in rows if ratio > 1.25]
    lines += ["", "Format version 2: positions are delta-encoded CSR of the touched rows (varints) and values byte planes, each one compressed stream for "
              "the whole patch (xz for streams up to 1 MiB, else zlib), so a tensor's fixed cost is its metadata "
              "columns (name, shape, dtype, nnz, touched rows, layout, three base64 sha256: about 210 bytes). "
              + ("Every row meets the goal." if not missed else
                 "Missed: " + "; ".join(f"{d} of the {l.split(' (')[0]}" for l, d in missed) + ".")]
    write_section("patch-size", "\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
