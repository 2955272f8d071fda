"""Runtime benchmark: live apply+revert of an edit patch vs reloading the model and vs PEFT merge, and
throughput of large synthetic patches vs a plain copy of the same bytes, measured side by side.

    .venv/bin/python bench/runtime.py                      # CPU, writes section "runtime"
    .venv/bin/python bench/runtime.py --device cuda --section runtime-gpu   # what bench/gpu.sh runs

Without the converted SmolLM2 directory (e.g. on a bare GPU machine) a randomly initialised model of
SmolLM2-135M's exact shape is used instead; timings depend on shapes, not on weight values.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine_line, write_section  # noqa: E402
from bench.synthetic_adapter import write_synthetic_adapter  # noqa: E402
from roselora_export.patch import build_patch_from_adapter, config_fingerprint  # noqa: E402
from roselora_export.patch.model import TORCH_BITS_DTYPE, Patch, TensorPatch, sha256_bits  # noqa: E402
from roselora_export.runtime import PatchRuntime  # noqa: E402

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, setup=None) -> list[float]:
    """Wall seconds of fn() per repeat (after one warm-up), synchronising the device around each."""
    out = []
    for i in range(repeats + 1):
        state = setup() if setup else None
        sync(device)
        t0 = time.perf_counter()
        fn(state) if setup else fn()
        sync(device)
        if i:
            out.append(time.perf_counter() - t0)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def model_dir_or_synthetic(model: str | None, tmp: Path) -> tuple[Path, str]:
    if model:
        return Path(model), Path(model).name
    default = Path.home() / ".cache" / "roselora-export" / "SmolLM2-135M-Instruct"
    if (default / "model.safetensors").is_file():
        return default, "SmolLM2-135M-Instruct"
    import transformers

    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_SHAPE))
    m.save_pretrained(str(tmp / "smollm2-shape"), safe_serialization=True)
    return tmp / "smollm2-shape", "random model of SmolLM2-135M's shape"


# ---- part 1: an edit patch on SmolLM2 -----------------------------------------------------------
def bench_edit(model_dir: Path, label: str, device: torch.device, repeats: int, tmp: Path) -> tuple[str, dict]:
    import peft
    from safetensors.torch import load_file

    from roselora_export.models import load_model

    adapter_dir = write_synthetic_adapter(model_dir, tmp / "adapter")
    model = load_model(model_dir).to(device)
    base_sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    patch = build_patch_from_adapter(adapter_dir, load_file(str(model_dir / "model.safetensors")),
                                     provenance={"base_config_sha256": config_fingerprint(model.config.to_dict())})
    runtime = PatchRuntime(model)

    def apply_revert():
        runtime.revert(runtime.apply(patch))

    t_runtime = timed(apply_revert, device, repeats)
    handles, t_apply, t_revert = [], [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        h = runtime.apply(patch)
        sync(device)
        t1 = time.perf_counter()
        runtime.revert(h)
        sync(device)
        handles.append(h)
        t_apply.append(t1 - t0)
        t_revert.append(time.perf_counter() - t1)
    exact = all(torch.equal(v.cpu(), base_sd[k]) for k, v in model.state_dict().items())
    t_fast = timed(lambda: runtime.revert(runtime.apply(patch, verify=False), check=False), device, repeats)
    # A new Patch object each time (same arrays): no cached staging, so staging, index check and sha256 every time.
    t_first = timed(lambda: runtime.revert(runtime.apply(Patch(tensors=patch.tensors, provenance=patch.provenance))),
                    device, repeats)

    # Reload: what a server does without the runtime to take an edit back (warm page cache).
    st = str(model_dir / "model.safetensors")

    def reload():
        sd = load_file(st, device=str(device))
        model.load_state_dict(sd, strict=False)

    t_reload = timed(reload, device, max(3, repeats // 4))

    def from_pretrained():
        load_model(model_dir).to(device)

    t_fresh = timed(from_pretrained, device, 2)

    # PEFT: merge_and_unload of the same adapter into a fresh copy of the base model (copy not timed).
    def peft_setup():
        return peft.PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).to(device)

    t_merge = timed(lambda pm: pm.merge_and_unload(), device, max(3, repeats // 4), setup=peft_setup)
    pm = peft_setup()

    def merge_unmerge():
        pm.merge_adapter()
        pm.unmerge_adapter()

    t_merge_unmerge = timed(merge_unmerge, device, max(3, repeats // 4))
    after = pm.get_base_model().state_dict()
    drifted = sum(not torch.equal(after[k].cpu(), base_sd[k]) for k in patch.tensors if k in after)

    nnz = patch.total_nnz
    rt = med(t_runtime)
    rows = [
        ("runtime apply + revert (this tool)", rt, "1x"),
        ("  of which apply", med(t_apply), ""),
        ("  of which revert", med(t_revert), ""),
        ("runtime apply(verify=False) + revert(check=False)", med(t_fast), f"{med(t_fast) / rt:.2f}x"),
        ("runtime apply + revert, first apply of a Patch (staging + sha256)", med(t_first), f"{med(t_first) / rt:.2f}x"),
        ("reload weights from safetensors (load_file + load_state_dict)", med(t_reload), f"{med(t_reload) / rt:.0f}x"),
        ("reload model (from_pretrained)", med(t_fresh), f"{med(t_fresh) / rt:.0f}x"),
        ("PEFT merge_and_unload (one direction only)", med(t_merge), f"{med(t_merge) / rt:.0f}x"),
        ("PEFT merge_adapter + unmerge_adapter", med(t_merge_unmerge), f"{med(t_merge_unmerge) / rt:.0f}x"),
    ]
    table = [f"Edit patch on {label} ({device.type}, fp32): rank 8, q/v of all 30 layers, "
             f"A rows / B columns with ceil(0.05 d) nonzeros, alpha 32 (bench/synthetic_adapter.py); "
             f"{len(patch.tensors)} tensors, {nnz} weights ({nnz * 4 / 1e6:.2f} MB touched). "
             f"Median of {repeats} runs. The runtime rows re-apply one loaded Patch object, as a server toggling "
             f"an edit does: its staging is cached, and the sha256 check is replaced by a bit comparison with the "
             f"base bits that passed it (any difference runs the hash again); the 'first apply' row builds a new "
             f"Patch object each time, so it pays staging, index checks and sha256 every time.", "",
             "| operation | seconds | time vs runtime |", "|---|---:|---:|"]
    table += [f"| {name} | {sec:.4f} | {ratio} |" for name, sec, ratio in rows]
    lines = sum(int(np.unique(tp.flat_index // (64 // tp.xor_bits.itemsize)).size) for tp in patch.tensors.values())
    table += ["", f"The patch touches {lines} distinct 64-byte cache lines ({lines * 64 / 1e6:.1f} MB) spread over "
              f"{sum(tp.numel * 4 for tp in patch.tensors.values()) / 1e6:.0f} MB of weights: apply reads them (check) and "
              f"writes them, revert reads them (check) and writes them, so the runtime is bound by scattered memory "
              f"access, where a reload streams the whole model.",
              f"After revert the state dict is bit-identical to the base: {'yes' if exact else 'NO'}. "
              f"After PEFT merge + unmerge, {drifted} of {len(patch.tensors)} adapted tensors differ from the base "
              f"in at least one bit."]
    figures = {"nnz": nnz, "apply_revert_s": rt, "apply_s": med(t_apply), "revert_s": med(t_revert),
               "unchecked_apply_revert_s": med(t_fast), "first_apply_revert_s": med(t_first), "reload_s": med(t_reload), "from_pretrained_s": med(t_fresh), "merge_and_unload_s": med(t_merge),
               "merge_unmerge_s": med(t_merge_unmerge), "exact": exact, "peft_unmerge_drifted": drifted,
               "phases": {k: med([h.timings[k] for h in handles]) for k in handles[0].timings}}
    return "\n".join(table), figures


# ---- part 2: throughput of large synthetic patches ------------------------------------------------
class Synthetic(torch.nn.Module):
    """A 'model' of n fp32 matrices (about `gib` GiB), random values."""

    def __init__(self, gib: float, device: torch.device, side: int = 4096):
        super().__init__()
        n = max(1, round(gib * 2**30 / (side * side * 4)))
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(side, side, generator=gen).to(device), requires_grad=False) for _ in range(n)])


def synthetic_patch(model: Synthetic, density: float, seed: int = 0) -> Patch:
    """Random elements at `density` of every matrix, XOR in the low mantissa bits (values stay finite)."""
    rng = np.random.default_rng(seed)
    patch = Patch(provenance={"kind": "synthetic", "density": density})
    for i, w in enumerate(model.weights):
        name = f"weights.{i}"
        n = w.numel()
        idx = np.flatnonzero(rng.random(n, dtype=np.float32) < density).astype(np.int64)
        xor = rng.integers(1, 1 << 12, size=idx.size, dtype=np.uint32)
        bits = w.detach().cpu().view(-1).view(TORCH_BITS_DTYPE[w.dtype]).numpy().view(np.uint32)
        base = bits[idx]
        patch.tensors[name] = TensorPatch(name=name, shape=tuple(w.shape), dtype=w.dtype, flat_index=idx, xor_bits=xor,
                                          base_sha256="", patched_sha256="", base_touched_sha256=sha256_bits(base))
    return patch


def bench_throughput(gib: float, densities: list[float], device: torch.device, repeats: int) -> tuple[str, dict]:
    model = Synthetic(gib, device)
    runtime = PatchRuntime(model)
    total_bytes = sum(w.numel() * 4 for w in model.weights)
    rows, figures = [], {}
    for density in densities:
        patch = synthetic_patch(model, density)
        touched = patch.total_nnz * 4
        src = torch.empty(patch.total_nnz, dtype=torch.int32, device=device)
        dst = torch.empty_like(src)
        t_copy = med(timed(lambda: dst.copy_(src), device, repeats))
        del src, dst
        res = {}
        for verify in (True, False):
            applies, reverts, phases = [], [], []
            for _ in range(repeats + 1):
                sync(device)
                t0 = time.perf_counter()
                h = runtime.apply(Patch(tensors=patch.tensors, provenance=patch.provenance), verify=verify)  # not cached
                sync(device)
                t1 = time.perf_counter()
                runtime.revert(h)
                sync(device)
                applies.append(t1 - t0)
                reverts.append(time.perf_counter() - t1)
                phases.append(h.timings)
            res[verify] = (med(applies[1:]), med(reverts[1:]),
                           {k: med([p[k] for p in phases[1:]]) for k in phases[0]})
        gbs = lambda s: touched / s / 1e9  # noqa: E731
        (a_v, r_v, ph_v), (a_n, r_n, ph_n) = res[True], res[False]
        device_part = ph_n["check"] + ph_n["write"]
        rows.append(f"| {density:.0%} | {touched / 1e6:.0f} | {gbs(t_copy):.2f} | {gbs(a_v):.2f} ({gbs(a_v) / gbs(t_copy):.0%}) "
                    f"| {gbs(a_n):.2f} ({gbs(a_n) / gbs(t_copy):.0%}) | {gbs(device_part):.2f} ({gbs(device_part) / gbs(t_copy):.0%}) "
                    f"| {gbs(r_v):.2f} ({gbs(r_v) / gbs(t_copy):.0%}) "
                    f"| {ph_v['stage']:.3f} / {ph_v['check']:.3f} / {ph_v['write']:.3f} |")
        figures[density] = {"model_bytes": total_bytes, "touched_bytes": touched, "copy_s": t_copy, "apply_s": a_v, "apply_unverified_s": a_n,
                            "revert_s": r_v, "phases_verified": ph_v, "phases_unverified": ph_n}
        del patch
    table = [f"Throughput on a synthetic {total_bytes / 2**30:.2f} GiB fp32 model ({len(model.weights)} matrices of "
             f"4096x4096, {device.type}), GB/s of touched bytes (nnz x 4), median of {repeats}; percentages are of "
             f"a plain copy of the same number of bytes on the same device (dst.copy_(src)).", "",
             "| density | touched MB | copy GB/s | apply GB/s | apply, no sha256 GB/s | device phases only GB/s "
             "| revert GB/s | apply phases s: stage / check / write |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"] + rows
    table += ["", "Each apply here is of a new Patch object (no cached staging). "
              "apply = pack the patch into one buffer (pinned on CUDA) and copy it to the device once (stage), "
              "check indices, gather, sha256 of the touched base bits on the host, finiteness (check), scatter (write). "
              "'no sha256' is `apply(patch, verify=False)`; 'device phases only' leaves out staging as well."]
    return "\n".join(table), figures


def summary_table(device_name: str, edit: dict, throughput: dict) -> str:
    """One table of the headline figures (what bench/gpu.sh writes)."""
    rt = edit["apply_revert_s"]
    rows = [f"| edit patch apply + revert ({edit['nnz']} weights) | {rt * 1e3:.2f} ms | |",
            f"| same, first apply of the Patch (staging + sha256) | {edit['first_apply_revert_s'] * 1e3:.2f} ms | |",
            f"| reload weights from safetensors | {edit['reload_s'] * 1e3:.1f} ms | {edit['reload_s'] / rt:.0f}x slower (goal >= 100x) |",
            f"| PEFT merge_and_unload | {edit['merge_and_unload_s'] * 1e3:.1f} ms | {edit['merge_and_unload_s'] / rt:.0f}x slower (goal >= 50x) |"]
    for density, f in throughput.items():
        copy_gbs = f["touched_bytes"] / f["copy_s"] / 1e9
        for label, key in (("apply", "apply_s"), ("apply, no sha256", "apply_unverified_s"), ("revert", "revert_s")):
            gbs = f["touched_bytes"] / f[key] / 1e9
            rows.append(f"| {label}, {float(density):.0%} of {f['model_bytes'] / 2**30:.2g} GiB | {gbs:.2f} GB/s | {gbs / copy_gbs:.0%} of copy "
                        f"({copy_gbs:.1f} GB/s; goal >= 50%) |")
    return "\n".join([f"Device: {device_name}", "", "| measure | value | vs baseline |", "|---|---:|---|", *rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--model", default=None, help="model dir (default: the converted SmolLM2, else a random one of its shape)")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per figure of the edit part (default 20)")
    ap.add_argument("--gib", type=float, default=1.0, help="size of the synthetic model for throughput (default 1.0)")
    ap.add_argument("--densities", default="0.01,0.1", help="patch densities for throughput (default 0.01,0.1)")
    ap.add_argument("--section", default="runtime", help="section of docs/benchmarks.md to write (default runtime)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--summary", action="store_true", help="write one headline table (gpu.sh) instead of the full tables")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine_line()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, label = model_dir_or_synthetic(args.model, Path(tmp))
        edit_table, edit_figs = bench_edit(model_dir, label, device, args.repeats, Path(tmp))
    tp_table, tp_figs = bench_throughput(args.gib, [float(d) for d in args.densities.split(",")], device,
                                         max(3, args.repeats // 5))
    cmd = "python bench/runtime.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    head = [f"Machine: {machine_line()}, {torch.get_num_threads()} torch threads, load average "
            f"{open('/proc/loadavg').read().split()[0]} at the end" + (f"; device: {name}" if device.type == "cuda" else ""),
            f"Command: `{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
    full = "\n".join(head + [edit_table, "", tp_table])
    print(full)
    if args.summary:
        print("\n" + summary_table(name if device.type == "cuda" else "cpu", edit_figs, tp_figs))
    body = "\n".join(head + [summary_table(name if device.type == "cuda" else "cpu", edit_figs, tp_figs)]) \
        if args.summary else full
    if args.json:
        Path(args.json).write_text(json.dumps({"edit": edit_figs, "throughput": tp_figs}, indent=2, default=str))
    if not args.no_write:
        write_section(args.section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
