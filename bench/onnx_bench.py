"""ONNX benchmark on SmolLM2-135M: patch in place vs re-export, sessions with vs without overrides, bytes written.

    .venv/bin/python bench/onnx_bench.py [--repeats 3] [--keep DIR]

The main patch is RoseLoRA-shaped and synthetic (rank 8, q_proj and v_proj in all 30 layers, ceil(0.05 d)
entries per A row and per B column, A and B clamped to +-3e-3, scaling alpha/r = 4, as in the
authors' editing setup); then one real edit trained with the project's trainer goes through the
file and the session paths. Each export runs in its own process so its peak RSS is its own. Timings
alternate between the compared variants and report the median.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import machine_line, write_section  # noqa: E402

COMMAND = ".venv/bin/python bench/onnx_bench.py"


def rose_patch(state: dict[str, torch.Tensor], seed: int = 0):
    from roselora_export.patch.model import Patch, tensor_patch_from_pair

    gen = torch.Generator().manual_seed(seed)
    tensors, patched = {}, {}
    rank, tau, clamp, scaling = 8, 0.05, 3e-3, 32 / 8
    for key in sorted(k for k in state if k.endswith(("q_proj.weight", "v_proj.weight"))):
        d1, d2 = state[key].shape
        a, b = torch.zeros(rank, d2), torch.zeros(d1, rank)
        for i in range(rank):
            ka, kb = math.ceil(tau * d2), math.ceil(tau * d1)
            a[i, torch.randperm(d2, generator=gen)[:ka]] = (torch.rand(ka, generator=gen) * 2 - 1) * clamp
            b[torch.randperm(d1, generator=gen)[:kb], i] = (torch.rand(kb, generator=gen) * 2 - 1) * clamp
        new = state[key] + scaling * (b @ a)
        tp = tensor_patch_from_pair(key, state[key], new)
        if tp is not None:
            tensors[key], patched[key] = tp, new
    return Patch(tensors, {"bench": "synthetic RoseLoRA shape"}), patched


def trained_edit(model_dir: Path, requests_file: Path):
    """One RoseLoRA knowledge edit trained with the project's trainer (authors' settings, no clamp), as a patch."""
    from roselora_export.edit.benchmark import edit_patch
    from roselora_export.edit.requests import load_requests
    from roselora_export.edit.train import train_edit
    from roselora_export.models import load_model, load_tokenizer

    from roselora_export.method import RoseLoraConfig

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    request = load_requests(requests_file)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on this shared 2-core machine one thread trains faster (see tests/test_edit_smollm.py)
    t = time.perf_counter()
    # As in the project's SmolLM2 edit test: the authors' 3e-3 clamp is too tight to move a 135M model.
    result = train_edit(model, tok, [request], method="roselora", config=RoseLoraConfig(clamp=None))
    train_s = time.perf_counter() - t
    torch.set_num_threads(threads)
    from roselora_export.patch import apply_to_state_dict

    patch = edit_patch(model, result)
    prompt_ids = tok(request.prompt, return_tensors="np")["input_ids"].astype(np.int64)
    with torch.no_grad():
        model.load_state_dict(apply_to_state_dict(patch, model.state_dict()))
        torch_next = int(model(input_ids=torch.from_numpy(prompt_ids), use_cache=False).logits[0, -1].argmax())
    return patch, request, prompt_ids, (lambda i: tok.decode([i])), torch_next, train_s


def export_in_subprocess(model_dir: Path, out: Path) -> dict:
    code = ("import json,sys; from roselora_export.onnx.export import export_onnx; "
            "print(json.dumps(export_onnx(sys.argv[1], sys.argv[2], check_runtime=False)))")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, str(model_dir), str(out)], capture_output=True, text=True, check=True)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    report["wall_s"] = time.perf_counter() - t0  # includes interpreter start and imports, as a user would see
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir, removed)")
    ap.add_argument("--requests", type=Path, default=Path(__file__).resolve().parent.parent / "examples/requests/landmark.jsonl",
                    help="edit requests; the first one is trained for the trained-edit rows (skipped if missing)")
    args = ap.parse_args()

    from safetensors.torch import load_file, save_file

    from roselora_export.models import demo_model_dir, load_model
    from roselora_export.onnx.patching import apply_to_onnx_dir
    from roselora_export.onnx.session import create_session

    model_dir = demo_model_dir()
    work = args.keep or Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        state = load_file(str(model_dir / "model.safetensors"))
        patch, patched = rose_patch(state)

        # The merged checkpoint a re-export would start from.
        merged_dir = work / "merged"
        shutil.copytree(model_dir, merged_dir, dirs_exist_ok=True)
        save_file({**state, **patched}, str(merged_dir / "model.safetensors"), metadata={"format": "pt"})

        base_report = export_in_subprocess(model_dir, work / "base")
        base = work / "base"

        apply_s, revert_s, reexport_s, copy_s = [], [], [], []
        reexport_reports = []
        for r in range(args.repeats):
            t = time.perf_counter()
            rep_apply = apply_to_onnx_dir(base, [patch], None, in_place=True)
            apply_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            apply_to_onnx_dir(base, [patch], None, in_place=True, revert=True)
            revert_s.append(time.perf_counter() - t)
            shutil.rmtree(work / "copy", ignore_errors=True)
            t = time.perf_counter()
            apply_to_onnx_dir(base, [patch], work / "copy")
            copy_s.append(time.perf_counter() - t)
            if r < 2:  # re-export is slow: two runs are enough to see its spread
                shutil.rmtree(work / "reexport", ignore_errors=True)
                rep = export_in_subprocess(merged_dir, work / "reexport")
                reexport_reports.append(rep)
                reexport_s.append(rep["wall_s"])

        # The re-exported merged model and the in-place patched one hold the same bytes.
        reexported_equal = (work / "copy" / "model.onnx.data").read_bytes() == (work / "reexport" / "model.onnx.data").read_bytes()

        # Sessions: base without overrides vs base with the patch as overrides, alternating.
        sess_plain, sess_patch = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            s0 = create_session(base)
            sess_plain.append(time.perf_counter() - t)
            del s0
            t = time.perf_counter()
            s1 = create_session(base, [patch])
            sess_patch.append(time.perf_counter() - t)
            del s1

        # Logit agreement with the PyTorch merged model, and inference latency of the two sessions.
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 49152, size=(1, 32), dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        model = load_model(merged_dir)
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
            base_model = load_model(model_dir)
            base_logits = base_model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        del model, base_model
        s_file = create_session(work / "copy")
        s_over = create_session(base, [patch])
        s_base = create_session(base)
        diff_file = float(np.abs(s_file.run(["logits"], feeds)[0] - want).max())
        diff_over = float(np.abs(s_over.run(["logits"], feeds)[0] - want).max())
        edit_effect = float(np.abs(want - base_logits).max())
        run_base, run_over = [], []
        for _ in range(max(3, args.repeats)):
            t = time.perf_counter()
            s_base.run(["logits"], feeds)
            run_base.append(time.perf_counter() - t)
            t = time.perf_counter()
            s_over.run(["logits"], feeds)
            run_over.append(time.perf_counter() - t)
        del s_file, s_over, s_base

        # A real RoseLoRA edit from the project's trainer, through the ONNX file and session paths.
        trained = None
        if args.requests.is_file():
            t_patch, request, prompt_ids, decode, torch_next, train_s = trained_edit(model_dir, args.requests)
            rep_t = apply_to_onnx_dir(base, [t_patch], None, in_place=True)
            feeds_t = {"input_ids": prompt_ids, "attention_mask": np.ones_like(prompt_ids)}
            s_file = create_session(base)
            file_next = int(s_file.run(["logits"], feeds_t)[0][0, -1].argmax())
            del s_file
            apply_to_onnx_dir(base, [t_patch], None, in_place=True, revert=True)
            s_over = create_session(base, [t_patch])
            session_next = int(s_over.run(["logits"], feeds_t)[0][0, -1].argmax())
            s_base = create_session(base)
            base_next = int(s_base.run(["logits"], feeds_t)[0][0, -1].argmax())
            trained = dict(request=request, report=rep_t, train_s=train_s, file=decode(file_next),
                           session=decode(session_next), base=decode(base_next), torch=decode(torch_next),
                           nnz=t_patch.total_nnz, tensors=len(t_patch.tensors))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    data_mb = rep_apply["data_bytes"] / 2**20
    rows = [
        ("export SmolLM2 (base), wall incl. start-up", f"{base_report['wall_s']:.1f} s",
         f"trace {base_report['trace_s']:.1f} s, map {base_report['map_s']:.1f} s, write+verify "
         f"{base_report['write_verify_s']:.1f} s; peak RSS {base_report['peak_rss_mb']:.0f} MB"),
        ("re-export the merged model", f"{med(reexport_s):.1f} s", f"runs: {', '.join(f'{x:.1f}' for x in reexport_s)} s"),
        ("apply patch in place (`apply --in-place`)", f"{med(apply_s):.3f} s",
         f"**{med(reexport_s) / med(apply_s):.0f}x** faster than re-export (goal >= 20x)"),
        ("revert in place", f"{med(revert_s):.3f} s", "restores the data file bit for bit"),
        ("apply to a new directory (`apply --out`)", f"{med(copy_s):.3f} s", "copies the artifact, then patches"),
        ("bytes written by the patch", f"{rep_apply['bytes_written'] / 2**20:.2f} MiB",
         f"{rep_apply['elements']:,} elements in {rep_apply['initializers']} initializers, "
         f"{rep_apply['pages_written']:,} 4 KiB pages; {100 * rep_apply['bytes_written'] / rep_apply['data_bytes']:.2f}% "
         f"of the {data_mb:.0f} MiB data file (copy kind: {rep_apply['copy']})"),
        ("session, no overrides", f"{med(sess_plain):.2f} s", "CPUExecutionProvider, ORT_ENABLE_ALL"),
        ("session, patch as overrides (verified)", f"{med(sess_patch):.2f} s",
         f"{med(sess_patch) / med(sess_plain):.2f}x the plain session"),
        ("run 1x32 tokens: base session / override session", f"{1000 * med(run_base):.0f} ms / {1000 * med(run_over):.0f} ms", ""),
        ("max abs logit diff vs PyTorch merged: patched file", f"{diff_file:.2e}", f"edit's own effect on logits: {edit_effect:.2e}"),
        ("max abs logit diff vs PyTorch merged: session", f"{diff_over:.2e}", "bound 1e-3"),
        ("patched file == re-exported merged model (data bytes)", str(reexported_equal), ""),
    ]
    if trained:
        rows += [
            (f"trained edit ({trained['request'].prompt!r} -> {trained['request'].target_new!r})",
             f"{trained['nnz']:,} elements", f"{trained['tensors']} tensors, trained in {trained['train_s']:.0f} s; "
             f"{trained['report']['bytes_written'] / 1024:.0f} KiB written in place"),
            ("trained edit: greedy next token, base / PyTorch merged / ONNX patched file / ONNX session",
             " / ".join(repr(trained[k]) for k in ("base", "torch", "file", "session")),
             "the ONNX paths give what PyTorch gives"),
        ]
    table = "| measurement | value | notes |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    body = (f"Machine: {machine_line()}; load average at the end {os.getloadavg()[0]:.1f} (the machine is shared).\n"
            f"Command: `{COMMAND} --repeats {args.repeats}`. Medians of {args.repeats} alternating runs "
            f"(re-export: {len(reexport_s)}).\n\n{table}\n\n"
            "In-place apply writes the touched elements where they are under an undo journal (onnx/journal.py); "
            "`apply --out` copies the artifact, then patches the copy.\n")
    write_section("onnx", body)
    print(body)


if __name__ == "__main__":
    main()
