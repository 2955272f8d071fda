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
def clock(fn, device: torch.device) -> float:
    """Wall seconds of one fn(), synchronising the device before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, device: torch.device, rounds: int, evict=None) -> dict[str, list[float]]:
    """Seconds per call of each fn(record) in interleaved rounds (one timed call of each per round), so a slow
    spell on the shared machine hits every variant alike. Before each timed call either the same fn runs once
    untimed (record=False: hot caches, as in a loop of the same call) or `evict` streams a large buffer through
    the caches (cold: as after forward passes, which read the whole model)."""
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            evict() if evict else fn(False)
            out[k].append(clock(lambda: fn(True), device))
    return out


def evictor(device: torch.device):
    """A function that writes a buffer several times the size of the last-level cache."""
    buf = torch.empty((256 if device.type == "cuda" else 128) << 20, dtype=torch.uint8, device=device)
    return lambda: buf.fill_(1)


def pass_variants(model: torch.nn.Module, patch: Patch, device: torch.device) -> dict:
    """One pass over the touched elements done in several ways, to split the runtime's time into per-op overhead
    and memory access (the runtime does two such passes per apply and two per revert: a gather, then a scatter).

    'per tensor' is what the runtime does: one index_select / scatter_ per tensor on a flat view of it
    (runtime.staging); 'tiny' is one call per tensor on one element (the per-op cost alone); 'consecutive' is
    one call on nnz consecutive elements of a private buffer (the kernel's per-element cost without scattered access).
    Every scatter writes back the bits its gather read, so the model is left as it was.
    """
    live = dict(model.named_parameters(remove_duplicate=False))
    flats, idxs = [], []
    for name, tp in patch.tensors.items():
        flats.append(live[name].detach().view(-1).view(TORCH_BITS_DTYPE[tp.dtype]))
        idxs.append(torch.from_numpy(np.ascontiguousarray(tp.flat_index, dtype=np.int64)).to(device))
    if len({f.dtype for f in flats}) != 1:
        return {}
    outs = [torch.index_select(f, 0, i) for f, i in zip(flats, idxs)]  # the base bits
    gout = torch.cat(outs)
    seq = torch.arange(gout.numel(), device=device)
    private = gout.clone()
    tiny = [(f, i[:1], o[:1]) for f, i, o in zip(flats, idxs, outs)]
    ref = gout.clone()
    items = list(zip(flats, idxs, outs))

    def equal(_=None):
        return bool(np.array_equal(gout.numpy(), ref.numpy())) if device.type == "cpu" else torch.equal(gout, ref)

    return {
        GATHER: lambda _: [torch.index_select(f, 0, i, out=o) for f, i, o in items],
        "gather, tiny ops (1 element per tensor)": lambda _: [torch.index_select(f, 0, i, out=o) for f, i, o in tiny],
        "gather, one op on consecutive elements": lambda _: torch.index_select(private, 0, seq, out=gout),
        SCATTER: lambda _: [f.scatter_(0, i, o) for f, i, o in items],
        "scatter, tiny ops (1 element per tensor)": lambda _: [f.scatter_(0, i, o) for f, i, o in tiny],
        "scatter, one op on consecutive elements": lambda _: private.scatter_(0, seq, gout),
        "bit comparison of nnz values": equal,
    }


GATHER, SCATTER = "gather, one op per tensor (as the runtime)", "scatter, one op per tensor (as the runtime)"


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

    # The runtime variants and the pass variants, interleaved round by round, hot and cold.
    handles, split = [], {"apply": [], "revert": []}

    def apply_revert(record: bool) -> None:
        t0 = time.perf_counter()
        h = runtime.apply(patch)
        sync(device)
        t1 = time.perf_counter()
        runtime.revert(h)
        sync(device)
        if record:
            split["apply"].append(t1 - t0)
            split["revert"].append(time.perf_counter() - t1)
            handles.append(h)

    fns = {"apply+revert": apply_revert,
           "fast": lambda _: runtime.revert(runtime.apply(patch, verify=False), check=False),
           # A new Patch object each time (same arrays): no cached staging: staging, index check and sha256 every time.
           "first": lambda _: runtime.revert(runtime.apply(Patch(tensors=patch.tensors, provenance=patch.provenance)))}
    passes = pass_variants(model, patch, device)
    apply_revert(False)
    times = interleaved({**fns, **passes}, device, repeats)
    hot_split, hot_handles = dict(split), list(handles)
    split, handles[:] = {"apply": [], "revert": []}, []
    cold = interleaved({**fns, **passes}, device, repeats, evict=evictor(device))
    exact = all(torch.equal(v.cpu(), base_sd[k]) for k, v in model.state_dict().items())
    t_apply, t_revert = hot_split["apply"], hot_split["revert"]
    t_runtime, t_fast, t_first = times["apply+revert"], times["fast"], times["first"]

    # Baselines, interleaved among themselves. Reload: what a server does without the runtime to take an edit back
    # (warm page cache). PEFT: merge_and_unload of the same adapter into a fresh copy of the base (copy not timed).
    st = str(model_dir / "model.safetensors")

    def reload():
        sd = load_file(st, device=str(device))
        model.load_state_dict(sd, strict=False)

    def peft_model():
        return peft.PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).to(device)

    pm = peft_model()
    fresh = [peft_model()]

    def merge_and_unload():
        fresh[0].merge_and_unload()

    def merge_unmerge():
        pm.merge_adapter()
        pm.unmerge_adapter()

    base_rounds = max(3, repeats // 4)
    t_reload, t_merge, t_merge_unmerge = [], [], []
    for r in range(base_rounds + 1):
        tr, tm = clock(reload, device), clock(merge_and_unload, device)
        fresh[0] = peft_model()
        tmu = clock(merge_unmerge, device)
        if r:
            t_reload.append(tr), t_merge.append(tm), t_merge_unmerge.append(tmu)
    t_fresh = [clock(lambda: load_model(model_dir).to(device), device) for _ in range(3)][1:]
    after = pm.get_base_model().state_dict()
    drifted = sum(not torch.equal(after[k].cpu(), base_sd[k]) for k in patch.tensors if k in after)

    nnz = patch.total_nnz
    rt = med(t_runtime)
    na = None
    rows = [
        ("runtime apply + revert (this tool)", t_runtime, cold["apply+revert"], "1x"),
        ("  of which apply", t_apply, split["apply"], ""),
        ("  of which revert", t_revert, split["revert"], ""),
        ("runtime apply(verify=False) + revert(check=False)", t_fast, cold["fast"], f"{med(t_fast) / rt:.2f}x"),
        ("runtime apply + revert, first apply of a Patch (staging + sha256)", t_first, cold["first"],
         f"{med(t_first) / rt:.2f}x"),
        ("reload weights from safetensors (load_file + load_state_dict)", t_reload, na, f"{med(t_reload) / rt:.0f}x"),
        ("reload model (from_pretrained)", t_fresh, na, f"{med(t_fresh) / rt:.0f}x"),
        ("PEFT merge_and_unload (one direction only)", t_merge, na, f"{med(t_merge) / rt:.0f}x"),
        ("PEFT merge_adapter + unmerge_adapter", t_merge_unmerge, na, f"{med(t_merge_unmerge) / rt:.0f}x"),
    ]
    table = [f"Edit patch on {label} ({device.type}, fp32): rank 8, q/v of all 30 layers, "
             f"A rows / B columns with ceil(0.05 d) nonzeros, alpha 32 (bench/synthetic_adapter.py); "
             f"{len(patch.tensors)} tensors, {nnz} weights ({nnz * 4 / 1e6:.2f} MB touched). "
             f"Runtime rows: {repeats} interleaved rounds, each call timed hot (right after the same call, as in a "
             f"loop) and cold (right after writing a buffer four times the last-level cache, as after forward passes "
             f"that read the whole model); baselines: {base_rounds} interleaved rounds (from_pretrained: 2). "
             f"The runtime rows re-apply one loaded Patch object, as a server toggling "
             f"an edit does: its staging is cached, and the sha256 check is replaced by a bit comparison with the "
             f"base bits that passed it (any difference runs the hash again); the 'first apply' row builds a new "
             f"Patch object each time, so it pays staging, index checks and sha256 every time.", "",
             "| operation | hot median s | hot min s | cold median s | hot median vs runtime |",
             "|---|---:|---:|---:|---:|"]
    table += [f"| {name} | {med(ts):.4f} | {min(ts):.4f} | {'' if c is None else f'{med(c):.4f}'} | {ratio} |"
              for name, ts, c, ratio in rows]
    lines = sum(int(np.unique(tp.flat_index // (64 // tp.xor_bits.itemsize)).size) for tp in patch.tensors.values())
    crt = med(cold["apply+revert"])
    table += ["", f"Goals (issue #6): apply + revert >= 100x faster than the reload, i.e. <= "
              f"{med(t_reload) / 100 * 1e3:.2f} ms here: reached {med(t_reload) / rt:.0f}x (hot median), "
              f"{med(t_reload) / crt:.0f}x (cold median); >= 50x faster than merge_and_unload, i.e. <= "
              f"{med(t_merge) / 50 * 1e3:.2f} ms: reached {med(t_merge) / rt:.0f}x (hot), {med(t_merge) / crt:.0f}x "
              f"(cold).",
              f"After revert the state dict is bit-identical to the base: {'yes' if exact else 'NO'}. "
              f"After PEFT merge + unmerge, {drifted} of {len(patch.tensors)} adapted tensors differ from the base "
              f"in at least one bit."]
    phases = {k: med([h.timings[k] for h in hot_handles]) for k in hot_handles[0].timings}
    figures = {"nnz": nnz, "apply_revert_s": rt, "apply_revert_min_s": min(t_runtime), "apply_revert_cold_s": crt,
               "apply_s": med(t_apply), "revert_s": med(t_revert), "unchecked_apply_revert_s": med(t_fast),
               "first_apply_revert_s": med(t_first), "reload_s": med(t_reload), "from_pretrained_s": med(t_fresh),
               "merge_and_unload_s": med(t_merge), "merge_unmerge_s": med(t_merge_unmerge), "exact": exact,
               "peft_unmerge_drifted": drifted, "phases": phases,
               "passes": {k: {"hot_median_s": med(times[k]), "hot_min_s": min(times[k]), "cold_median_s": med(cold[k])}
                          for k in passes}}
    if passes:
        table += ["", breakdown(times, cold, passes, phases, len(patch.tensors), lines, patch,
                                min(med(t_reload) / 100, med(t_merge) / 50) * 1e3)]
    return "\n".join(table), figures


def breakdown(times: dict, cold: dict, passes: dict, phases: dict, n_tensors: int, lines: int, patch: Patch,
              goal_ms: float) -> str:
    """Where the time of one apply + revert goes: per-op overhead vs memory access (the measurement behind it)."""
    g, s = GATHER, SCATTER
    gt, st_ = "gather, tiny ops (1 element per tensor)", "scatter, tiny ops (1 element per tensor)"
    gc, sc = "gather, one op on consecutive elements", "scatter, one op on consecutive elements"
    cmp = "bit comparison of nnz values"

    def split(t: dict, stat) -> tuple[dict, str]:
        m = {k: stat(t[k]) * 1e3 for k in list(passes) + ["apply+revert"]}
        rt, four, cmps = m["apply+revert"], 2 * m[g] + 2 * m[s], 2 * m[cmp]
        return m, f"{four:.2f} ms of passes + {cmps:.2f} ms of comparisons against {rt:.2f} ms for the whole"

    m, hot_text = split(times, med)
    lo_m, lo_text = split(times, min)
    rest = min(m["apply+revert"] - 2 * (m[g] + m[s] + m[cmp]), lo_m["apply+revert"] - 2 * (lo_m[g] + lo_m[s] + lo_m[cmp]))
    hot_text = (f"medians {hot_text} (minimums: {lo_text}): " +
                ("the passes measured alone add up to the whole apply + revert, so what Python adds (validity of "
                 "the cached staging, the handle, the lock) is within the noise" if rest < 0.1 * m["apply+revert"] else
                 f"the rest, at least {rest:.2f} ms, is Python (validity of the cached staging, the handle, the lock)"))
    mc = {k: med(cold[k]) * 1e3 for k in list(passes) + ["apply+revert"]}
    cold_text = (f"an apply + revert takes {mc['apply+revert']:.2f} ms ({mc['apply+revert'] - m['apply+revert']:+.2f} ms "
                 f"against hot; passes alone: gather {mc[g]:.3f} ms against {m[g]:.3f} hot, scatter {mc[s]:.3f} "
                 f"against {m[s]:.3f}): after a flush the whole apply + revert is slower, not only its first pass (why, "
                 f"dirty lines left by the flush or cold TLBs, is not separated here)")
    lo = {k: min(times[k]) * 1e3 for k in passes}
    floor = 2 * lo[g] + 2 * lo[s]
    total_bytes = sum(tp.numel * tp.xor_bits.itemsize for tp in patch.tensors.values())
    ph = {k: v * 1e3 for k, v in phases.items()}
    rows = ["Where the time of one apply + revert goes (same run; ms per pass, one pass = every touched element "
            f"once; {n_tensors} tensors, {total_bytes / 1e6:.0f} MB, {lines} touched 64-byte cache lines):", "",
            "| one pass over the touched elements | hot median ms | hot min ms | cold median ms |", "|---|---:|---:|---:|"]
    rows += [f"| {k} | {m[k]:.3f} | {lo[k]:.3f} | {mc[k]:.3f} |" for k in passes]
    rows += ["", f"Runtime phases, hot (median ms): apply check {ph['check']:.3f} (gather + comparison), apply write "
             f"{ph['write']:.3f} (scatter under the lock), revert check {ph['revert_check']:.3f}, revert write "
             f"{ph['revert_write']:.3f}; bookkeeping before the check {ph['stage']:.3f}.",
             f"An apply + revert is two gathers, two scatters and two bit comparisons (a check before each write). "
             f"Hot: {hot_text}. Cold: {cold_text}.",
             f"Per-op overhead: {n_tensors} one-element calls alone take {m[gt]:.3f} / {m[st_]:.3f} ms (gather / "
             f"scatter) per pass hot, {mc[gt]:.3f} / {mc[st_]:.3f} ms cold. Memory access: the same one op "
             f"on consecutive elements takes {m[gc]:.3f} / {m[sc]:.3f} ms, so scattered access is "
             f"{(m[g] - m[gc]) / m[g]:.0%} / {(m[s] - m[sc]) / m[s]:.0%} of a pass hot, "
             f"{(mc[g] - mc[gc]) / mc[g]:.0%} / {(mc[s] - mc[sc]) / mc[s]:.0%} cold.",
             f"Floor of this design with torch kernels: four passes at their hot minimum, {floor:.2f} ms, "
             f"before any comparison or Python, against the {goal_ms:.2f} ms that both goals need."]
    return "\n".join(rows)


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
        patch.tensors[name] = TensorPatch(name=name, shape=tuple(w.shape), dtype_name=w.dtype, flat_index=idx, xor_bits=xor,
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
    ap.add_argument("--repeats", type=int, default=40, help="timed rounds of the edit part (default 40)")
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
    load_start = open("/proc/loadavg").read().split()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, label = model_dir_or_synthetic(args.model, Path(tmp))
        edit_table, edit_figs = bench_edit(model_dir, label, device, args.repeats, Path(tmp))
    tp_table, tp_figs = bench_throughput(args.gib, [float(d) for d in args.densities.split(",")], device,
                                         max(3, args.repeats // 10))
    cmd = "python bench/runtime.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    head = [f"Machine: {machine_line()}, {torch.get_num_threads()} torch threads, load average {load_start} at the "
            f"start and {open('/proc/loadavg').read().split()[0]} at the end (other engineers share the 2 cores)" + (f"; device: {name}" if device.type == "cuda" else ""),
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
