"""Streaming merge: time and peak RSS of `roselora-export merge` on a synthetic sharded checkpoint (>= 2 GB),
side by side with a naive load-everything merge, a plain `cp -r` of the checkpoint, and `import torch` alone
(for scale: merge itself never imports torch).

    .venv/bin/python bench/streaming_merge.py [--layers 10] [--rounds 3] [--keep]

Every measured command runs in its own fresh process, as a user runs it (the console script, start-up
included), with OMP_NUM_THREADS=1; peak RSS is its maximum resident set (GNU time %M).
The checkpoint and all outputs live under /tmp and are deleted at the end (unless --keep).
Goals: peak RSS <= largest shard + 300 MB, time <= 2 x the plain copy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine_line, write_section  # noqa: E402

HIDDEN, INTER, VOCAB = 2048, 5632, 32000


def make_checkpoint(path: Path, layers: int, shard_bytes: int = 512 << 20) -> Path:
    import torch

    """A Llama-shaped fp32 checkpoint, random weights, sharded like save_pretrained (index + shards)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
                       p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
                       p + "post_attention_layernorm.weight": (HIDDEN,)})
    shapes["model.norm.weight"] = (HIDDEN,)
    groups, cur, size = [], [], 0
    for k, shp in shapes.items():
        n = 4 * int(torch.tensor(shp).prod())
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    groups.append(cur)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: torch.randn(shapes[k], generator=g) * 0.02 for k in keys}
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({k: name for k in keys})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": VOCAB,
        "tie_word_embeddings": True, "dtype": "float32"}, indent=2))
    (path / "tokenizer_config.json").write_text("{}")
    return path


NAIVE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
base, adapter, out = map(Path, sys.argv[1:4])
torch.set_num_threads(1)
index = json.loads((base / "model.safetensors.index.json").read_text())
shards = sorted(set(index["weight_map"].values()))
sd = {}
for s in shards:
    sd.update(load_file(str(base / s)))                        # everything in memory
cfg = json.loads((adapter / "adapter_config.json").read_text())
ab = load_file(str(adapter / "adapter_model.safetensors"))
for k, a in ab.items():
    if ".lora_A." in k:
        name = k.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
        b = ab[k.replace(".lora_A.", ".lora_B.")]
        sd[name] = sd[name] + (b @ a) * (cfg["lora_alpha"] / a.shape[0])
out.mkdir()
for s in shards:
    save_file({k: sd[k] for k, v in index["weight_map"].items() if v == s}, str(out / s), metadata={"format": "pt"})
"""

IMPORT_ONLY = "import torch"  # for scale: what any command that imports torch pays before doing anything

# The CPU cost of each step merge takes per changed tensor, timed one by one in one thread (median over them).
PER_TENSOR = r"""
import json, os, statistics, sys, tempfile, time
import numpy as np
from roselora_export.checkpoint import open_model_dir
from roselora_export.checkpoint.safetensors_stream import _pwrite_all
from roselora_export.patch.adapter import read_adapter, resolve_keys
from roselora_export.patch.io import encode_tensor
from roselora_export.patch.merge_math import merge_bits
from roselora_export.patch.model import fill_sha256
model = open_model_dir(sys.argv[1])
edits = resolve_keys(read_adapter(sys.argv[2]).edits, model.keys(), tied=model.tied_aliases())
costs = {k: [] for k in ("read", "merge", "sha256", "encode", "write")}
fd, tmp = tempfile.mkstemp(dir=sys.argv[3])
try:
    for name in [n for n in model.keys() if n in edits]:
        info = model.locations[name][1]
        t0 = time.perf_counter(); base = model.read_array(name); base.sum()  # mapped: the sum reads every page
        t1 = time.perf_counter(); m = merge_bits(name, base, info.dtype, info.shape, edits[name])
        t2 = time.perf_counter(); fill_sha256(m.patch, m.base_bits, m.bits)
        t3 = time.perf_counter(); encode_tensor(m.patch)
        t4 = time.perf_counter(); _pwrite_all(fd, memoryview(m.bits.view(np.uint8)), 0)
        t5 = time.perf_counter()
        for k, v in zip(costs, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            costs[k].append(v)
finally:
    os.close(fd); os.unlink(tmp)
print("COSTS=" + json.dumps({k: statistics.median(v) for k, v in costs.items()}))
print("TORCH=" + json.dumps("torch" in sys.modules))
"""

# `roselora-export merge` with timestamps around its phases (wrapped from outside; the library is unchanged).
PHASES = r"""
import json, sys, time
T0 = time.perf_counter()
marks = {}
import roselora_export.checkpoint.copier as copier, roselora_export.checkpoint.merge as merge
def wrap(obj, attr, key):
    f = getattr(obj, attr)
    def timed(*a, **k):
        marks.setdefault(key + "_start", time.perf_counter() - T0)
        try:
            return f(*a, **k)
        finally:
            marks[key + "_end"] = time.perf_counter() - T0
    setattr(obj, attr, timed)
wrap(copier.ShardCopier, "_copy_shard", "copy")
import roselora_export.patch.adapter as adapter_module
wrap(adapter_module, "read_adapter", "adapter")
wrap(merge, "_merge_into_copies", "jobs")
import roselora_export.patch.io as patch_io
wrap(patch_io, "save_patch", "save")
from roselora_export.cli import main
main(sys.argv[1:], prog_name="roselora-export", standalone_mode=False)
marks["cli_end"] = time.perf_counter() - T0
marks["torch"] = "torch" in sys.modules
print("PHASES=" + json.dumps(marks))
"""


def cli(py: str) -> list[str]:
    """The installed `roselora-export` console script (what a user runs), else `python -m roselora_export.cli`."""
    script = Path(py).parent / "roselora-export"
    return [str(script)] if script.is_file() else [py, "-m", "roselora_export.cli"]


def prime(base: Path, scratch: Path) -> None:
    """Write a copy of the checkpoint and delete it, so that every measured command finds memory alike.

    On this VM, memory freed a while ago is handed back to the host, and writing 2 GB into it again
    cost up to 3x the kernel time (cp -r: 0.6 s right after another copy was deleted, 1.0-1.8 s after
    a 3 GB allocation was freed and two seconds passed). Without this, whichever command ran right
    after another's output was deleted had the advantage.
    """
    subprocess.run(["cp", "-r", str(base), str(scratch)], check=True)
    shutil.rmtree(scratch)


def measure(args: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MiB, CPU seconds user+sys) of one fresh process.

    Through /usr/bin/time: Linux keeps a process's RSS high-water mark across fork+exec, so a child
    started straight from this (large) Python process would report at least our own RSS. CPU time is
    shown because the machine is shared: wall time swings with other users' load, CPU time much less.
    """
    subprocess.run(["sync"], check=True)  # no dirty pages from the previous command to write back meanwhile
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one torch thread, as every benchmark on this shared machine
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as f:
        t0 = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", f.name, *args], cwd=ROOT, check=True,
                       capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        rss, user, sys_ = f.read().strip().splitlines()[-1].split()
        return wall, int(rss) / 1024, float(user) + float(sys_)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--section", default="streaming-merge",
                    help="docs/benchmarks.md section to write (another one keeps a second checkpoint size beside it)")
    args = ap.parse_args()
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="streaming_merge_", dir="/tmp"))
    try:
        # Made in a child process, so that this one stays small and idle while it times the others: made
        # here, the 2 GB of torch tensors this process had freed left every later merge slower and noisier
        # (two runs, 19:33 and 19:40 UTC on 2026-11-29: merge median 2.22x cp -r, then 1.63x).
        subprocess.run([py, "-c", "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                        "from bench.streaming_merge import make_checkpoint; "
                        "from bench.synthetic_adapter import write_synthetic_adapter; "
                        "b = make_checkpoint(Path(sys.argv[2]), int(sys.argv[3])); "
                        "write_synthetic_adapter(b, Path(sys.argv[4]))",
                        str(ROOT), str(tmp / "base"), str(args.layers), str(tmp / "adapter")], check=True)
        base, adapter = tmp / "base", tmp / "adapter"
        shard_sizes = [p.stat().st_size for p in base.glob("*.safetensors")]
        total, largest = sum(shard_sizes), max(shard_sizes)
        rows = []

        def fresh(name: str) -> Path:
            out = tmp / name
            shutil.rmtree(out, ignore_errors=True)
            return out

        measure(["cp", "-r", str(base), str(fresh("warm"))])  # warm the page cache once
        shutil.rmtree(tmp / "warm")
        load_before = os.getloadavg()
        merge = cli(py)
        methods = [
            ("cp -r (plain copy)", lambda o: ["cp", "-r", str(base), str(o)]),
            ("roselora-export merge", lambda o: [*merge, "merge", "--base", str(base), "--adapter", str(adapter),
                                                 "--out", str(o)]),
            ("roselora-export merge --dtype bf16 (converts every tensor)",
             lambda o: [*merge, "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(o), "--dtype", "bf16"]),
            ("naive merge (load all, merge, save_file per shard)", lambda o: [py, "-c", NAIVE, str(base), str(adapter), str(o)]),
            ("python -c 'import torch' (start-up alone, for scale)", lambda o: [py, "-c", IMPORT_ONLY]),
        ]
        results: dict[str, list[tuple]] = {}
        # Rounds interleave the methods; the table shows each method's median and best run. The naive merge
        # allocates and frees 3 GB, which on this VM slowed the next commands' kernel work for seconds, so
        # it (with the torch import) has rounds of its own after the others.
        for group in (methods[:3], methods[3:]):
            for rep in range(args.rounds):
                for label, cmd in group:
                    out = fresh("out")
                    prime(base, tmp / "prime")
                    wall, rss, cpu = measure(cmd(out))
                    results.setdefault(label, []).append((wall, rss, cpu))
                    shutil.rmtree(out, ignore_errors=True)
                    Path(str(out) + ".patch.safetensors").unlink(missing_ok=True)
                    print(rep, label, f"{wall:.2f}s cpu {cpu:.2f}s {rss:.0f}MiB", flush=True)
        phases = []  # one timed run per round, after the rounds
        for _ in range(args.rounds):
            out = fresh("out")
            prime(base, tmp / "prime")
            subprocess.run(["sync"], check=True)
            t0 = time.perf_counter()
            run = subprocess.run([py, "-c", PHASES, "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)],
                                 cwd=ROOT, check=True, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            wall = time.perf_counter() - t0
            marks = json.loads(run.stdout.split("PHASES=")[-1])
            marks["wall"] = wall
            phases.append(marks)
            shutil.rmtree(out, ignore_errors=True)
            Path(str(out) + ".patch.safetensors").unlink(missing_ok=True)
        run = subprocess.run([py, "-c", PER_TENSOR, str(base), str(adapter), str(tmp)], cwd=ROOT, check=True,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        costs = json.loads(run.stdout.split("COSTS=")[-1].split("\n")[0])
        load_after = os.getloadavg()
        ph = min(phases, key=lambda m: m["wall"])
        phase_rows = [
            ("interpreter start-up, click, numpy, open the base (headers), start the copier", "main", 0.0,
             ph["copy_start"]),
            ("copy every shard (copy_file_range), the changed tensors' bytes skipped", "copier", ph["copy_start"],
             ph["copy_end"]),
            ("read the adapter", "main", ph["adapter_start"], ph["adapter_end"]),
            (f"merge, hash, encode, then write the {2 * args.layers} changed tensors (2 jobs)", "2 jobs",
             ph["jobs_start"], ph["jobs_end"]),
            ("write the patch file, print the report", "main", ph["save_start"], ph["cli_end"]),
            ("interpreter exit (and process start before the first timestamp)", "main", ph["cli_end"], ph["wall"]),
        ]

        med = {label: (statistics.median(r[0] for r in runs), min(r[0] for r in runs), statistics.median(r[2] for r in runs),
                       max(r[1] for r in runs)) for label, runs in results.items()}
        cp_med, cp_min = med["cp -r (plain copy)"][:2]
        for label, (wall, best, cpu, rss) in med.items():
            rows.append(f"| {label} | {wall:.2f} | {best:.2f} | {wall / cp_med:.2f} | {best / cp_min:.2f} | {cpu:.2f} | "
                        f"{rss:.0f} | {rss - largest / 2**20:+.0f} |")
        m_med, m_min, m_cpu, m_rss = med["roselora-export merge"]
        t_med = med["python -c 'import torch' (start-up alone, for scale)"][0]
        imports_torch = any(m["torch"] for m in phases)
        body = [
            f"Machine: {machine_line()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
            "(the machine is shared). Command: "
            f"`.venv/bin/python bench/streaming_merge.py --layers {args.layers} --rounds {args.rounds}"
            + (f" --section {args.section}" if args.section != "streaming-merge" else "") + "` "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
            "",
            f"Synthetic Llama-shaped fp32 checkpoint: {args.layers} layers, hidden {HIDDEN}, {len(shard_sizes)} shards, "
            f"{total / 2**30:.2f} GiB in all, largest shard {largest / 2**20:.0f} MiB; synthetic RoseLoRA-shaped adapter "
            f"(r=8, tau=0.05) on q_proj and v_proj of every layer ({2 * args.layers} changed 16 MiB tensors). Every command is a fresh "
            "process, as a user runs it (`roselora-export merge ...`, start-up included), with OMP_NUM_THREADS=1. Page "
            "cache warm; before each command a copy of the checkpoint is written and deleted (on this VM, writing 2 GB "
            "into memory freed a while ago costs up to 3x the kernel time, which otherwise favoured whichever command "
            f"ran right after another's output was deleted), then `sync`; {args.rounds} interleaved rounds of cp, merge "
            "and merge --dtype, then as many of the naive merge and the torch import (the naive merge's 3 GB, allocated "
            "and freed, slowed the kernel work of the commands after it for seconds). The checkpoint is made by a "
            "child process: made by the timing process itself, the 2 GB of tensors it had freed made every later merge "
            "slower and noisier (median 2.22x cp -r instead of 1.63x). Median and best wall time, "
            "median CPU time (user + sys), highest peak RSS.",
            "",
            "| command | wall s (median) | wall s (best) | x cp -r (median) | x cp -r (best) | CPU s | peak RSS MiB | "
            "RSS - largest shard MiB (goal <= +300) |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Goal: merge wall time <= 2 x cp -r, peak RSS <= largest shard + 300 MB. Reached here: time "
            f"{m_med / cp_med:.2f}x cp -r (median; best {m_min / cp_min:.2f}x), so the time goal is "
            f"{'met' if m_med <= 2 * cp_med else 'missed'}; peak RSS is "
            f"{'met' if m_rss - largest / 2**20 <= 300 else 'missed'}. A process that only imports torch takes "
            f"{t_med:.2f} s = {t_med / cp_med:.2f}x cp -r; merge "
            + ("imported torch in the timed runs." if imports_torch else "never imports it (checked in the timed runs)."),
            "",
            "How merge spends its time: it opens the base (headers only) and starts one thread that copies every shard "
            "with copy_file_range, skipping the bytes of the tensors the adapter's header names (kernel work, on one "
            "core). Meanwhile it reads the adapter and two jobs at a time merge the changed tensors with numpy "
            "(patch/merge_math.py: each fused multiply-add of B @ A computed exactly, in k order, on the rectangles "
            "where B and A have nonzeros; the same bits as torch's B @ A here), hash the base and merged tensors "
            "(sha256), encode their part of the patch, and then write each merged tensor at its offset in its copied "
            "shard once that shard is copied. The patch file is written last. Memory stays a few tensors. "
            "`--dtype bf16` changes every tensor's size, so every shard is rewritten (header first, each tensor at its new "
            "offset; two tensors converted at once with numpy beside the merge), also without torch.",
            "",
            f"CPU per changed 16 MiB tensor (median, one thread): merge arithmetic {1e3 * costs['merge']:.1f} ms "
            f"(the delta, the add, the bit comparison, survival, the merged copy), sha256 of base and merged "
            f"{1e3 * costs['sha256']:.1f} ms, patch encoding {1e3 * costs['encode']:.1f} ms (the format's deflate), "
            f"write {1e3 * costs['write']:.1f} ms, read (mapped, pages read in) {1e3 * costs['read']:.1f} ms. With "
            f"two cores the floor is about: interpreter start-up + (the copy's CPU + the {2 * args.layers} tensors' "
            "CPU) / 2.",
        ]
        body += [
            "",
            f"Where the time of one merge goes (the fastest of {args.rounds} timed runs, {ph['wall']:.2f} s; seconds "
            "from the first timestamp, phases on different threads overlap):",
            "",
            "| phase | thread | from s | to s | takes s |",
            "|---|---|---|---|---|",
            *[f"| {name} | {thread} | {a:.2f} | {b:.2f} | {b - a:.2f} |" for name, thread, a, b in phase_rows],
        ]
        write_section(args.section, "\n".join(body))
        print("\n".join(body))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
