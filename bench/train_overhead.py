"""RoseLoRA training-step overhead over a plain PEFT LoRA step on SmolLM2-135M, and seconds per CLI edit.

Both models are trained side by side in one run on the same batch (the landmark request), same rank
and targets; steps alternate between the two so machine noise hits both alike. Then the `edit`
command is run end to end as a user would (process start, model load, training, answers, save).

    .venv/bin/python bench/train_overhead.py [--rounds 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine_line, write_section  # noqa: E402
from roselora_export.edit.data import collate, encode_requests, pad_id_of  # noqa: E402
from roselora_export.edit.requests import load_requests  # noqa: E402
from roselora_export.edit.train import token_loss  # noqa: E402
from roselora_export.method import RoseLoraConfig, RoseLoraPruner, wrap_with_lora  # noqa: E402
from roselora_export.models import demo_model_dir, load_model, load_tokenizer  # noqa: E402

REQUESTS = ROOT / "examples" / "requests" / "landmark.jsonl"


def _setup(path, cfg, roselora: bool):
    model = wrap_with_lora(load_model(path), cfg)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    pruner = RoseLoraPruner(model, cfg) if roselora else None
    return model, opt, pruner


def _step(model, opt, pruner, batch) -> tuple[float, float]:
    """(seconds for the whole step, seconds of it spent in the RoseLoRA importance + prune)."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss, n = token_loss(model, batch)
    (loss / n).backward()
    opt.step()
    t1 = time.perf_counter()
    if pruner is not None:
        pruner.step()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="runs of the full 25-step schedule")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    ap.add_argument("--no-cli", action="store_true", help="skip the end-to-end CLI timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = demo_model_dir()
    tok = load_tokenizer(path)
    cfg = RoseLoraConfig(clamp=None, early_stop_loss=None)
    reqs = load_requests(REQUESTS)
    batch = collate(encode_requests(reqs, tok, None), pad_id_of(tok))
    lora = _setup(path, cfg, roselora=False)
    rose = _setup(path, cfg, roselora=True)
    for _ in range(2):  # warm-up, not timed
        _step(*lora, batch)
    times = {"lora": [], "roselora": [], "prune": []}
    for r in range(args.rounds):
        rose = _setup(path, cfg, roselora=True) if r else rose  # a fresh schedule each round
        for t in range(cfg.steps):
            order = ("lora", "roselora") if t % 2 == 0 else ("roselora", "lora")
            for name in order:
                total, prune = _step(*(lora if name == "lora" else rose), batch)
                times[name].append(total)
                if name == "roselora":
                    times["prune"].append(prune)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}  # the least disturbed step: steadiest on a shared machine
    ratio_median = med["roselora"] / med["lora"]
    ratio_total = sum(times["roselora"]) / sum(times["lora"])

    cli_rows = []
    if not args.no_cli:
        exe = Path(sys.executable).with_name("roselora-export")
        for method in ("roselora", "lora", "ft-l"):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [str(exe), "edit", "--requests", str(REQUESTS), "--out", f"{tmp}/out", "--method", method,
                       "--clamp", "none", "--json", "--no-progress"]
                env = {"OMP_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr[-2000:])
                info = json.loads(proc.stdout)
                cli_rows.append((method, wall, info["seconds"], info["steps_run"], info["final_loss"],
                                 info["weights_modified"], info["fraction_modified"], info["answers"][0]["after"]))

    lines = [
        f"Machine: {machine_line()}; torch threads: {args.threads}.",
        "",
        f"Command: `.venv/bin/python bench/train_overhead.py --rounds {args.rounds} --threads {args.threads}`",
        "",
        f"SmolLM2-135M-Instruct, rank {cfg.rank}, alpha {cfg.alpha:g}, targets {','.join(cfg.targets)}, the landmark request "
        f"(batch 1), {args.rounds} x {cfg.steps} steps each, PEFT LoRA and RoseLoRA steps alternating. "
        "A step is forward, backward and Adam; RoseLoRA adds the importance EMA and the row/column prune.",
        "",
        "| step | min s/step | median s/step | total s | ratio to LoRA |",
        "|---|---:|---:|---:|---:|",
        f"| PEFT LoRA | {low['lora']:.4f} | {med['lora']:.4f} | {sum(times['lora']):.2f} | 1.00 |",
        f"| RoseLoRA | {low['roselora']:.4f} | {med['roselora']:.4f} | {sum(times['roselora']):.2f} | "
        f"{low['roselora'] / low['lora']:.3f} (min), {ratio_median:.3f} (median), {ratio_total:.3f} (total) |",
        f"| of which importance + prune | {low['prune']:.4f} | {med['prune']:.4f} | {sum(times['prune']):.2f} | "
        f"{100 * sum(times['prune']) / sum(times['roselora']):.1f}% of RoseLoRA's time |",
        "",
        f"Goal: overhead at most 15%. Measured: {100 * (low['roselora'] / low['lora'] - 1):+.1f}% (min step), "
        f"{100 * (ratio_median - 1):+.1f}% (median step), {100 * (ratio_total - 1):+.1f}% (total); the importance + prune "
        "work itself is the last row, the rest of any difference is machine noise (the forward/backward/Adam work is the same).",
    ]
    if cli_rows:
        lines += [
            "",
            "Seconds per edit through the CLI on CPU (`roselora-export edit --requests examples/requests/landmark.jsonl "
            "--method M --clamp none`; wall = the whole process: start, model load, answers before/after, training, save):",
            "",
            "| method | wall s | training s | steps | final loss | weights changed | fraction | answer after |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for method, wall, train_s, steps, loss, nnz, frac, after in cli_rows:
            lines.append(f"| {method} | {wall:.1f} | {train_s:.1f} | {steps} | {loss:.4f} | {nnz:,} | {100 * frac:.4f}% | `{(after.strip().splitlines() or [''])[0]}` |")
    body = "\n".join(lines)
    write_section("train-overhead", body)
    print(body)


if __name__ == "__main__":
    main()
