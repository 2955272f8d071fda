"""Describe a patch file or an adapter directory: per-tensor nnz, density, rows/columns touched, bytes;
the provenance in words; and a picture (overview by layer and module, then per-matrix panels).

Tensors are listed in natural order (layers 2 before 10). Provenance is free-form JSON from the file, so
any JSON value renders without failing: long values are cut, control characters escaped.
"""
from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_write
from ..errors import InputError
from .adapter import read_adapter
from .io import check_patch_bytes, file_layout, load_patch, matrix_shape
from .model import Patch

MANTISSA_BITS = {"F32": 23, "F16": 10, "BF16": 7}


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value: layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(name))]


# ----------------------------------------------------------------------------- what the path is

def check_patch_file(path: str | os.PathLike) -> Path:
    """The path, if it can be a patch file (a safetensors file whose header is a JSON object); InputError
    "not a patch file" otherwise (a .jsonl, a config, a directory without an adapter ...)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        raise InputError(f"{path}: a directory, but not an adapter (no adapter_config.json + adapter_model.safetensors, "
                         "no ft_l.safetensors)")
    size = path.stat().st_size
    if size < 9:
        raise InputError(f"{path}: not a patch file ({size} bytes)")
    check_patch_bytes(path)
    return path


def is_adapter_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "adapter_config.json").is_file() or (p / "ft_l.safetensors").is_file())


# ----------------------------------------------------------------------------- summaries

def summarize(path: str | os.PathLike, patch: Patch | None = None) -> dict:
    """The `inspect --json` object (schema in docs/format.md)."""
    path = Path(path)
    patch = patch or load_patch(path)
    layout = file_layout(path, patch)
    tensors = []
    for name in sorted(patch.tensors, key=natural_key):
        tp = patch.tensors[name]
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
    base_numel = patch.provenance.get("base_numel") if isinstance(patch.provenance, dict) else None
    if isinstance(base_numel, bool) or not isinstance(base_numel, int) or base_numel <= 0:
        base_numel = None
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


def _lora_delta_f32(edit) -> np.ndarray:
    """The adapter's delta for display and counting: fp32 (B @ A) * scaling in the base weight's layout."""
    delta = (edit.b.astype(np.float32) @ edit.a.astype(np.float32)) * np.float32(edit.scaling)
    return delta.T if edit.transposed else delta


def summarize_adapter(adapter_dir: str | os.PathLike) -> dict:
    """What `inspect ADAPTER_DIR` shows: the adapter's settings and, per changed weight, the nonzeros of its
    fp32 delta (before any rounding into the base's dtype, which only `merge` can measure)."""
    adapter = read_adapter(adapter_dir)
    modules = adapter.settings.get("modules") if isinstance(adapter.settings.get("modules"), dict) else {}
    tensors = []
    for key in sorted(adapter.edits, key=natural_key):
        edit = adapter.edits[key]
        row = {"name": key, "shape": list(edit.shape), "rank": None, "nnz_A": None, "nnz_B": None}
        if edit.is_delta:
            delta = _lora_delta_f32(edit)
            nz = delta != 0
            row.update(rank=int(edit.a.shape[0]), nnz_A=int(np.count_nonzero(edit.a)),
                       nnz_B=int(np.count_nonzero(edit.b)), nnz=int(nz.sum()),
                       rows_touched=int(nz.any(axis=1).sum()), cols_touched=int(nz.any(axis=0).sum()),
                       max_abs_delta=float(np.abs(delta).max()) if delta.size else 0.0)
        else:  # ft-l / modules_to_save: new values; how many differ from the base is in roselora.json, if anywhere
            m = modules.get(key) if isinstance(modules.get(key), dict) else {}
            nnz = m.get("nnz_delta") if isinstance(m.get("nnz_delta"), int) else None
            row.update(nnz=nnz, rows_touched=None, cols_touched=None, max_abs_delta=None)
        numel = math.prod(edit.shape) or 1
        row["density"] = row["nnz"] / numel if row["nnz"] is not None else None
        tensors.append(row)
    known = [t["nnz"] for t in tensors if t["nnz"] is not None]
    return {
        "kind": "adapter-dir",
        "path": str(adapter_dir),
        "method": adapter.method,
        "settings": {k: v for k, v in adapter.settings.items() if k != "modules"},
        "lora": {k: adapter.peft_config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules",
                                                          "fan_in_fan_out") if k in adapter.peft_config},
        "total_nnz": sum(known) if len(known) == len(tensors) else None,
        "tensors": tensors,
    }


# ----------------------------------------------------------------------------- provenance in words

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def fmt_value(value: object, limit: int = 160, _depth: int = 0) -> str:
    """Any JSON value as one short line: lists comma-joined, objects as k=v, control characters escaped."""
    if value is None:
        text = "none"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (int, str)):
        text = str(value)
    elif _depth >= 3:
        text = "…"
    elif isinstance(value, (list, tuple)):
        text = ",".join(fmt_value(v, limit, _depth + 1) for v in value[:50]) + (",…" if len(value) > 50 else "")
    elif isinstance(value, dict):
        text = ", ".join(f"{fmt_value(k, 40, _depth + 1)}={fmt_value(v, limit, _depth + 1)}"
                         for k, v in list(value.items())[:50]) + (", …" if len(value) > 50 else "")
        text = "{" + text + "}" if _depth else text
    else:
        text = type(value).__name__
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_HEAD = (("kind", "kind"), ("method", "method"), ("source", "source"), ("base_model", "base model"),
         ("dtype", "dtype"), ("created", "created"), ("tool", "tool"))
# The order a reader expects (RoseLoraConfig's, the paper's); the file stores keys sorted.
_CONFIG_ORDER = ("rank", "alpha", "dropout", "targets", "tau", "beta", "t_init", "t_final", "steps", "lr",
                 "weight_decay", "clamp", "early_stop_loss", "seed", "r", "lora_alpha", "target_modules",
                 "use_rslora", "fan_in_fan_out")


def _ordered(d: object) -> object:
    if not isinstance(d, dict):
        return d
    rank = {k: i for i, k in enumerate(_CONFIG_ORDER)}
    return dict(sorted(d.items(), key=lambda kv: rank.get(kv[0], len(rank)) if isinstance(kv[0], str) else len(rank)))


_TRAINING = ("steps_run", "final_loss", "seconds", "weights_modified", "base_weights", "fraction_modified",
             "density_bound_r_tau2", "examples", "world_size", "batch_size")


def provenance_lines(provenance: object, *, max_requests: int = 5) -> list[str]:
    """The facts and settings a patch carries, as indented lines for `inspect`'s text output."""
    if not isinstance(provenance, dict):
        return [f"  provenance: {fmt_value(provenance)}"]
    prov = dict(provenance)
    lines = []
    if "dtype" in prov and prov["dtype"] is None:
        prov["dtype"] = "the base's"
    head = [f"{label}: {fmt_value(prov.pop(key))}" for key, label in _HEAD if key in prov]
    if head:
        lines.append("  " + "   ".join(head))
    sha = prov.pop("base_config_sha256", None)
    numel = prov.pop("base_numel", None)
    if sha is not None or numel is not None:
        lines.append(f"  base: config sha256 {fmt_value(sha, 16)}" + (f", {fmt_value(numel)} elements" if numel is not None else ""))
    settings = prov.pop("roselora", None)
    if isinstance(settings, dict):
        settings = dict(settings)
        config = settings.pop("config", None)
        if config is not None:
            lines.append(f"  config: {fmt_value(_ordered(config), 400)}")
        requests = settings.pop("requests", None)
        training = {k: settings.pop(k) for k in _TRAINING if k in settings}
        for k in ("method", "base_model", "base_model_path"):  # already said, or local to the trainer's machine
            settings.pop(k, None)
        if training:
            lines.append(f"  training: {fmt_value(training, 400)}")
        if isinstance(requests, list):
            lines.append(f"  requests: {len(requests)}")
            for r in requests[:max_requests]:
                if isinstance(r, dict):
                    lines.append(f"    {fmt_value(r.get('prompt'), 100)!s} -> {fmt_value(r.get('target_new'), 60)}"
                                 + (f"  (was {fmt_value(r.get('ground_truth'), 40)})" if r.get("ground_truth") is not None else ""))
                else:
                    lines.append(f"    {fmt_value(r, 160)}")
            if len(requests) > max_requests:
                lines.append(f"    ... {len(requests) - max_requests} more")
        elif requests is not None:
            lines.append(f"  requests: {fmt_value(requests)}")
        flat = {k: v for k, v in settings.items() if not isinstance(v, dict)}
        if flat:
            lines.append(f"  adapter settings: {fmt_value(_ordered(flat), 400)}")
        for key, value in settings.items():  # groups of settings (the edit's own, ...), one line each
            if isinstance(value, dict):
                lines.append(f"  {fmt_value(key, 40)}: {fmt_value(_ordered(value), 400)}")
    elif settings is not None:
        lines.append(f"  settings: {fmt_value(settings, 400)}")
    lora = prov.pop("lora", None)
    if lora is not None:
        lines.append(f"  lora: {fmt_value(_ordered(lora), 400)}")
    for key, value in prov.items():
        lines.append(f"  {fmt_value(key, 40)}: {fmt_value(value, 400)}")
    return lines


# ----------------------------------------------------------------------------- the picture

@dataclass
class Pattern:
    """Where one tensor changes, and by how much (for the panels), in its matrix layout."""

    name: str
    shape: tuple[int, ...]
    flat_index: np.ndarray
    magnitude: np.ndarray | None  # one value per index, larger = bigger change; None: not known

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def nnz(self) -> int:
        return int(self.flat_index.size)


def _layer_module(name: str) -> tuple[int | None, str]:
    """(layer, module) of a state-dict key: model.layers.12.self_attn.q_proj.weight -> (12, self_attn.q_proj)."""
    stem = re.sub(r"\.(weight|bias)$", "", name)
    m = re.match(r"^.*?\.(\d+)\.(.+)$", stem)
    if m:
        return int(m.group(1)), m.group(2)
    return None, stem.rsplit(".", 1)[-1]


def _module_labels(modules: list[str]) -> dict[str, str]:
    """Short column labels: the last name component where that is unambiguous (q_proj, v_proj)."""
    last = [m.rsplit(".", 1)[-1] for m in modules]
    return {m: (s if last.count(s) == 1 else m) for m, s in zip(modules, last)}


def patch_patterns(patch: Patch) -> tuple[list[Pattern], str]:
    """Patterns of a patch, with the magnitude the XOR bits tell without the base: the highest changed bit
    of each element, as log10 of the relative change it stands for (exponent or sign changes count as 1)."""
    out = []
    for name in sorted(patch.tensors, key=natural_key):
        tp = patch.tensors[name]
        _, exp = np.frexp(tp.xor_bits.astype(np.float64))  # exact for integers below 2**53: highest bit = exp - 1
        m = MANTISSA_BITS.get(tp.dtype_name, 23)
        rel_log2 = np.minimum(exp - 1 - m, 0).astype(np.float64)
        out.append(Pattern(name, tuple(tp.shape), tp.flat_index, rel_log2 * math.log10(2)))
    return out, "log10 |Δw / w| (from the highest changed bit)"


def adapter_patterns(adapter_dir: str | os.PathLike) -> tuple[list[Pattern], str]:
    """Patterns of an adapter: where its fp32 delta is nonzero, with log10 |Δw| there."""
    adapter = read_adapter(adapter_dir)
    out = []
    for key in sorted(adapter.edits, key=natural_key):
        edit = adapter.edits[key]
        if not edit.is_delta:
            continue  # ft-l values without the base: no pattern to draw
        delta = _lora_delta_f32(edit).reshape(-1)
        flat = np.flatnonzero(delta)
        out.append(Pattern(key, tuple(edit.shape), flat, np.log10(np.abs(delta[flat]).astype(np.float64))))
    return out, "log10 |Δw|"


def _safe_text(s: str, limit: int = 60) -> str:
    s = _CONTROL.sub("?", str(s)).replace("$", r"\$")  # no mathtext from names in a file
    return s if len(s) <= limit else "…" + s[-(limit - 1):]


def _pick_panels(patterns: list[Pattern], limit: int) -> list[Pattern]:
    """Up to `limit` panels: every changed module of the layers with the most changes (so q_proj and v_proj
    of one layer sit side by side), in natural (layer) order."""
    layers: dict[int | None, list[Pattern]] = {}
    for p in patterns:
        layers.setdefault(_layer_module(p.name)[0], []).append(p)
    picked: list[Pattern] = []
    for _, group in sorted(layers.items(), key=lambda kv: -sum(p.nnz for p in kv[1])):
        picked += group[: limit - len(picked)]
        if len(picked) >= limit:
            break
    return sorted(picked, key=lambda p: natural_key(p.name))


def overview_grid(patterns: list[Pattern], value: str = "density") -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(row labels: layers in order, then "other"; module columns; value per cell, NaN where nothing changed;
    nnz per cell) for the overview heat map."""
    cells = [(_layer_module(p.name), p) for p in patterns]
    modules = sorted({mod for (_, mod), _ in cells}, key=natural_key)
    layers = sorted({layer for (layer, _), _ in cells if layer is not None})
    rows = [str(layer) for layer in layers] + (["other"] if any(layer is None for (layer, _), _ in cells) else [])
    nnz = np.zeros((len(rows), len(modules)))
    numel = np.zeros_like(nnz)
    for (layer, mod), p in cells:
        i, j = rows.index("other" if layer is None else str(layer)), modules.index(mod)
        nnz[i, j] += p.nnz
        numel[i, j] += p.numel
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(numel > 0, nnz / numel if value == "density" else nnz, np.nan)
    return rows, modules, grid, nnz


def _overview(fig, ax, patterns: list[Pattern], value: str) -> None:
    rows, modules, grid, nnz = overview_grid(patterns, value)
    labels = _module_labels(modules)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", interpolation="nearest", vmin=0)
    ax.set_xticks(range(len(modules)), [_safe_text(labels[m], 24) for m in modules], rotation=30, ha="right", fontsize=7)
    step = max(1, len(rows) // 32)
    ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(f"every changed tensor by layer and module: {value} (blank: unchanged)", fontsize=9)
    if len(rows) * len(modules) <= 400:
        for i in range(len(rows)):
            for j in range(len(modules)):
                if nnz[i, j]:
                    ax.text(j, i, f"{int(nnz[i, j]):,}", ha="center", va="center", fontsize=5, color="white")
    fig.colorbar(im, ax=ax, label=f"{value}" + (" (nnz / elements)" if value == "density" else " (changed elements)"))


def _panel(ax, p: Pattern, bins: int, norm):
    nrows, ncols = matrix_shape(p.shape)
    nrows, ncols = max(nrows, 1), max(ncols, 1)
    r, c = np.divmod(p.flat_index, ncols)
    hr, hc = min(nrows, bins), min(ncols, bins)
    img = np.full((hr, hc), -np.inf)
    mag = p.magnitude if p.magnitude is not None else np.zeros(p.nnz)
    np.maximum.at(img, (r * hr // nrows, c * hc // ncols), mag)
    im = ax.imshow(np.ma.masked_invalid(np.where(np.isneginf(img), np.nan, img)), cmap="viridis", norm=norm,
                   aspect="auto", interpolation="nearest", extent=(0, ncols, nrows, 0))
    ax.set_title(f"{_safe_text(p.name)}\n{'x'.join(map(str, p.shape))}, nnz {p.nnz:,} ({p.nnz / p.numel:.2%})", fontsize=7)
    ax.set_xlabel("input (column)", fontsize=7)
    ax.set_ylabel("output (row)", fontsize=7)
    ax.tick_params(labelsize=6)
    return im, (hr < nrows or hc < ncols)


def plot_patterns(patterns: list[Pattern], out_png: str | os.PathLike, *, magnitude_label: str, limit: int = 12,
                  bins: int = 256, value: str = "density") -> Path:
    """An overview heat map (layer x module, `value` = density or nnz), then up to `limit` panels of single
    matrices (each module kind in turn), changed cells coloured by magnitude; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if value not in ("density", "nnz"):
        raise ValueError("value must be 'density' or 'nnz'")
    panels = _pick_panels(patterns, limit) if limit > 0 else []
    cols = min(4, max(len(panels), 1))
    prow = (len(panels) + cols - 1) // cols
    layers = len({_layer_module(p.name)[0] for p in patterns}) or 1
    over_h = min(max(2.5, 0.18 * layers + 1.5), 9.0)
    fig = plt.figure(figsize=(4.0 * cols, over_h + 3.4 * prow), layout="constrained")
    grid = fig.add_gridspec(1 + prow, cols, height_ratios=[over_h] + [3.4] * prow)
    if patterns:
        _overview(fig, fig.add_subplot(grid[0, :]), patterns, value)
    else:
        ax = fig.add_subplot(grid[0, :])
        ax.axis("off")
        ax.text(0.5, 0.5, "no changed tensors", ha="center", va="center")
    mags = [p.magnitude[np.isfinite(p.magnitude)] for p in panels if p.magnitude is not None and p.nnz]
    mags = [m for m in mags if m.size]
    lo, hi = (min(float(m.min()) for m in mags), max(float(m.max()) for m in mags)) if mags else (0.0, 1.0)
    norm = matplotlib.colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)  # one scale for every panel
    axes, binned, im = [], False, None
    for k, p in enumerate(panels):
        ax = fig.add_subplot(grid[1 + k // cols, k % cols])
        im, was_binned = _panel(ax, p, bins, norm)
        axes.append(ax)
        binned |= was_binned
    if axes and mags:
        bar = fig.colorbar(im, ax=axes, shrink=0.6, aspect=40)
        bar.set_label(magnitude_label + (", max per cell" if binned else ""), fontsize=8)
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    return atomic_write(out_png, png.getvalue())


def plot_sparsity(patch: Patch, out_png: str | os.PathLike, *, limit: int = 12, bins: int = 256,
                  value: str = "density") -> Path:
    """`plot_patterns` for a patch (magnitudes from its XOR bits)."""
    patterns, label = patch_patterns(patch)
    return plot_patterns(patterns, out_png, magnitude_label=label, limit=limit, bins=bins, value=value)
