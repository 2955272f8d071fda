"""ONNX artifacts of other exporters: patching in place (after map-onnx) against rebuilding, per exporter.

    .venv/bin/python bench/onnx_mapping.py [--adapter EDIT_DIR]

On SmolLM2-135M, for each exporter: our export-onnx, onnxruntime-genai's model builder (fp32, and
fp16 for CPU) and torch.onnx.export with constant folding (weights inline in model.onnx): the time
to build the artifact (what a user re-runs to deploy an edit without patching), the time and peak
memory of `map-onnx` (once per artifact), and the time of `apply --in-place` and `--revert` of an
edit patch (RoseLoRA on q_proj/v_proj: slices of genai's fused qkv_proj), each as a fresh process
as a user runs it (start-up included), best of 3. Revert is checked to leave every file bit-identical.
The patch is merged from --adapter (an `edit` output), else from a synthetic RoseLoRA adapter
(merged again with --dtype fp16 for the fp16 artifact). Every command's wall time and CPU time
(user + sys of the child, all its threads) are measured: on a shared machine the CPU time is the
comparable figure, and the ratios are given for both.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import machine_line, write_section  # noqa: E402
from bench.synthetic_adapter import write_synthetic_adapter  # noqa: E402
from roselora_export.models import demo_model_dir  # noqa: E402

CLI = [sys.executable, "-m", "roselora_export.cli"]
ROUNDS = 3
KINDS = ("export-onnx", "genai fp32", "genai fp16", "torch.onnx constant-folded")
_FOLDED = """
import sys, warnings, torch
from roselora_export.models import load_model
model = load_model(sys.argv[1]); model.set_attn_implementation("eager")
class M(torch.nn.Module):
    def __init__(s, m): super().__init__(); s.m = m
    def forward(s, i, a): return s.m(input_ids=i, attention_mask=a, use_cache=False).logits
ids = torch.randint(0, 1000, (1, 8))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(M(model).eval(), (ids, torch.ones_like(ids)), sys.argv[2] + "/model.onnx", dynamo=False,
                      do_constant_folding=True, opset_version=17, input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
"""


class Timing(tuple):
    """(wall seconds, CPU seconds of the child: user + sys)."""

    @property
    def wall(self) -> float:
        return self[0]

    @property
    def cpu(self) -> float:
        return self[1]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_run(cmd: list[str], **kw) -> tuple[Timing, subprocess.CompletedProcess]:
    c0, t0 = _children_cpu(), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    dt = Timing((time.perf_counter() - t0, _children_cpu() - c0))
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed: {r.stderr[-1500:]}")
    return dt, r


def best(timings: list[Timing]) -> Timing:
    return Timing((min(t.wall for t in timings), min(t.cpu for t in timings)))


def dir_sha(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.iterdir()):
        if p.is_file() and p.name != "names.json":
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
            out[p.name] = h.hexdigest()
    return out


def build(kind: str, base: Path, out: Path) -> Timing:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if kind == "export-onnx":
        return timed_run(CLI + ["export-onnx", "--model", str(base), "--out", str(out), "--no-check"], env=env)[0]
    if kind.startswith("genai"):
        precision = kind.split()[1]
        return timed_run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(out),
                          "-p", precision, "-e", "cpu", "-c", str(out.parent / "cache")], env=env)[0]
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        if (base / name).is_file():
            (out / name).write_bytes((base / name).read_bytes())
    return timed_run([sys.executable, "-c", _FOLDED, str(base), str(out)], env=env)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", type=Path, default=None, help="An edit output dir to merge (default: synthetic)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"Exporters to measure, of {', '.join(KINDS)}")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="apply/revert rounds (best of)")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",")]
    base = demo_model_dir()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="onnx-mapping-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        adapter = args.adapter
        if adapter is None:
            adapter = tmp / "adapter"
            write_synthetic_adapter(base, adapter)
        patches = {}
        for dtype in ("fp32", "fp16") if any("fp16" in k for k in kinds) else ("fp32",):
            extra = ["--dtype", dtype] if dtype == "fp16" else []
            timed_run(CLI + ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp / f"m{dtype}"),
                             "--json", *extra])
            patches[dtype] = tmp / f"m{dtype}.patch.safetensors"
        for kind in kinds:
            art = tmp / kind.replace(" ", "_").replace(".", "_")
            build_s = build(kind, base, art)
            map_s = map_rss = None
            if kind != "export-onnx":
                map_s, r = timed_run(CLI + ["map-onnx", "--base", str(base), "--onnx", str(art), "--json"])
                rep = json.loads(r.stdout)
                map_rss = rep["peak_rss_mb"]
                assert not rep["unmapped"], rep["reasons"]
            patch = patches["fp16" if "fp16" in kind else "fp32"]
            before = dir_sha(art)
            applies, reverts, inner = [], [], []
            for _ in range(args.rounds):
                dt, r = timed_run(CLI + ["apply", "--base", str(art), "--patch", str(patch), "--in-place", "--json"])
                applies.append(dt)
                inner.append(json.loads(r.stdout)["seconds"])
                reverts.append(timed_run(CLI + ["apply", "--base", str(art), "--patch", str(patch), "--in-place",
                                                "--revert", "--json"])[0])
            assert dir_sha(art) == before, f"{kind}: revert did not restore the files"
            data = sum(p.stat().st_size for p in art.iterdir() if p.is_file())
            rows.append((kind, build_s, map_s, map_rss, best(applies), min(inner), best(reverts), data))
            print(rows[-1], os.getloadavg(), flush=True)
    load = os.getloadavg()
    lines = [
        "## ONNX artifacts of other exporters: patch in place vs rebuild (`bench/onnx_mapping.py`)",
        "",
        f"SmolLM2-135M-Instruct, an edit patch merged from {'an `edit` output' if args.adapter else 'a synthetic RoseLoRA adapter'} "
        "(q_proj/v_proj of every layer: slices of genai's fused qkv_proj). Each command a fresh process as a user runs "
        f"it, start-up included; apply/revert best of {args.rounds}, revert checked bit-identical. {machine_line()}; "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at the end: the machine was shared, "
        "so wall times are upper bounds and CPU times (user + sys of the process) are the figures to compare.",
        "",
        "| exporter | artifact | rebuild: wall / CPU | map-onnx (once): wall / CPU | map peak RSS | "
        "apply --in-place: wall / CPU (in library, wall) | revert: wall / CPU | rebuild / apply: by CPU (by wall) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, build_s, map_s, map_rss, apply_s, inner_s, revert_s, data in rows:
        mapping = "names.json at export" if map_s is None else f"{map_s.wall:.1f} s / {map_s.cpu:.1f} s"
        rss = "" if map_rss is None else f"{map_rss:.0f} MB"
        lines.append(f"| {kind} | {data / 2**20:.0f} MiB | {build_s.wall:.1f} s / {build_s.cpu:.1f} s | {mapping} | {rss} | "
                     f"{apply_s.wall:.2f} s / {apply_s.cpu:.2f} s ({inner_s:.2f} s) | {revert_s.wall:.2f} s / "
                     f"{revert_s.cpu:.2f} s | {build_s.cpu / apply_s.cpu:.0f}x ({build_s.wall / apply_s.wall:.0f}x) |")
    lines += ["", "map-onnx's time is the whole process (start-up, reading both files, verifying every hit bit by bit); "
              "its peak RSS counts the memory-mapped pages of the checkpoint and the artifact it reads.", *notes]
    write_section("onnx-mapping", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
