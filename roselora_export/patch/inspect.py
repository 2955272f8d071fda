"""Describe a patch file: per-tensor nnz, density, rows/columns touched, bytes; and a sparsity plot."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .io import file_layout, load_patch, matrix_shape
from .model import Patch


def summarize(path: str | os.PathLike, patch: Patch | None = None) -> dict:
    """The `inspect --json` object (schema in docs/format.md)."""
    path = Path(path)
    patch = patch or load_patch(path)
    layout = file_layout(path, patch)
    tensors = []
    for name, tp in patch.tensors.items():
        nrows, ncols = matrix_shape(tp.shape)
        rows, cols = np.divmod(tp.flat_index, max(ncols, 1))
        tensors.append({
            "name": name,
            "shape": list(tp.shape),
            "dtype": tp.dtype_name,
            "nnz": tp.nnz,
            "density": tp.nnz / tp.numel if tp.numel else 0.0,
            "rows_touched": int(np.unique(rows).size),
            "cols_touched": int(np.unique(cols).size),
            "bytes": layout[name]["bytes"],
            "layout": layout[name]["layout"],
            "value_bytes": tp.nnz * tp.xor_bits.itemsize,
        })
    file_bytes = path.stat().st_size
    total = patch.total_nnz
    value_bytes = sum(t["value_bytes"] for t in tensors)
    base_numel = patch.provenance.get("base_numel")
    return {
        "format_version": patch.format_version,
        "file_bytes": file_bytes,
        "total_nnz": total,
        "bytes_per_nnz": file_bytes / total if total else 0.0,
        "value_bytes": value_bytes,
        "bytes_over_value_bytes": file_bytes / value_bytes if value_bytes else 0.0,
        "touched_fraction": total / base_numel if base_numel else None,
        "provenance": patch.provenance,
        "tensors": tensors,
    }


def plot_sparsity(patch: Patch, out_png: str | os.PathLike, *, limit: int = 12, bins: int = 256) -> Path:
    """One panel per touched matrix (largest nnz first, at most `limit`), touched cells shaded, so the
    row/column structure shows at a glance. Large matrices are binned to at most `bins` per axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tps = sorted(patch.tensors.values(), key=lambda t: t.nnz, reverse=True)[:limit]
    n = max(len(tps), 1)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, tp in zip(axes.ravel(), tps):
        nrows, ncols = matrix_shape(tp.shape)
        r, c = np.divmod(tp.flat_index, max(ncols, 1))
        hr, hc = min(nrows, bins), min(ncols, bins)
        img = np.zeros((hr, hc))
        np.add.at(img, (r * hr // max(nrows, 1), c * hc // max(ncols, 1)), 1)
        ax.imshow(img > 0, cmap="Greys", aspect="auto", interpolation="nearest")
        ax.set_title(f"{tp.name}\n{tuple(tp.shape)} nnz={tp.nnz} ({tp.nnz / tp.numel:.2%})", fontsize=7)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
