"""Regenerate the results on SmolLM2-135M: knowledge edits, deployment survival, fine-tuning and forgetting.

Writes docs/results.md, docs/results.json (raw figures), docs/finetune_datasize.png, and the README
block between <!-- results:start --> and <!-- results:end -->. CPU only.

    .venv/bin/python examples/results.py            # everything (about 30 minutes on 2 free cores; run with
                                                    # OMP_NUM_THREADS=1 on a shared machine)
    .venv/bin/python examples/results.py --quick    # a few requests, small fine-tuning (a few minutes)
    .venv/bin/python examples/results.py --only finetune   # rerun one stage; the others come from docs/results.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from roselora_export.edit.benchmark import benchmark_edits  # noqa: E402
from roselora_export.edit.evaluate import EditEvaluator, count_base_params  # noqa: E402
from roselora_export.edit.finetune_task import exact_match, finetune, finetune_config, make_task  # noqa: E402
from roselora_export.edit.metrics import mean, torch_forward  # noqa: E402
from roselora_export.edit.requests import load_requests  # noqa: E402
from roselora_export.edit.train import save_edit, train_edit  # noqa: E402
from roselora_export.method.config import RoseLoraConfig  # noqa: E402
from roselora_export.models import demo_model_dir, load_model, load_tokenizer  # noqa: E402

EDITS = ROOT / "examples" / "edits" / "counterfact_dev.jsonl"
PROBES = ROOT / "examples" / "probes" / "facts.jsonl"
DOCS = ROOT / "docs"
RESULTS_JSON = DOCS / "results.json"
RESULTS_MD = DOCS / "results.md"
PLOT = DOCS / "finetune_datasize.png"
README = ROOT / "README.md"
METHODS = ["roselora", "lora", "ft-l"]
STAGES = ("edits", "variant", "deploy", "deploy-variant", "finetune", "sweep")
# A RoseLoRA row beside the authors' defaults: the one setting the sweep (below) found that makes edits take here.
VARIANT = ("roselora, clamp 3e-2", {"clamp": 3e-2})
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What was tried when RoseLoRA with the authors' editing defaults did not take on this model.
SWEEP = [
    ("authors' defaults (clamp 3e-3)", {}),
    ("clamp 3e-2", {"clamp": 3e-2}),
    ("no clamp", {"clamp": None}),
    ("no clamp, lr 2e-3", {"clamp": None, "lr": 2e-3}),
    ("no clamp, tau 0.2", {"clamp": None, "tau": 0.2}),
    ("no clamp, all linear layers", {"clamp": None, "targets": ALL_LINEAR}),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> str:
    from bench.report import machine_line

    return machine_line()


# ------------------------------------------------------------------------------------------ stage 1

def stage_edits(model, tok, requests, quick: bool) -> dict:
    out = {}
    for mass in (False, True):
        log(f"edits: {'mass' if mass else 'single'}, {len(requests)} requests, {', '.join(METHODS)}")
        rep = benchmark_edits(model, tok, requests, METHODS, RoseLoraConfig(), mass=mass,
                              on_edit=lambda m, i: log(f"  {m} #{i} done"))
        for m in rep["methods"].values():
            m.pop("per_request_rows", None)
        out["mass" if mass else "single"] = rep
    return out


def stage_variant(model, tok, requests) -> dict:
    label, overrides = VARIANT
    out = {}
    for mass in (False, True):
        log(f"variant {label}: {'mass' if mass else 'single'}, {len(requests)} requests")
        rep = benchmark_edits(model, tok, requests, ["roselora"], RoseLoraConfig(**overrides), mass=mass)
        out["mass" if mass else "single"] = rep["methods"]["roselora"]
    return {"label": label, **out}


def stage_sweep(model, tok, requests, n: int) -> dict:
    """RoseLoRA single edits on n requests under each SWEEP variant (everything else as in the main table)."""
    rows = []
    for label, overrides in SWEEP:
        cfg = RoseLoraConfig(**overrides)
        rep = benchmark_edits(model, tok, requests[:n], ["roselora"], cfg, check_bits=False)
        m = rep["methods"]["roselora"]
        rows.append({"variant": label, **{k: m[k] for k in ("reliability", "generalization", "locality", "efficacy",
                                                          "params_modified", "params_modified_fraction",
                                                          "seconds_per_edit", "steps", "final_loss")}})
        log(f"sweep: {label}: reliability {m['reliability']:.3f}, locality {m['locality']:.3f}, "
            f"loss {m['final_loss']:.3f}, modified {m['params_modified_fraction']:.6f}")
    return {"requests": n, "rows": rows}


# ------------------------------------------------------------------------------------------ stage 2

def onnx_forward(session):
    import numpy as np

    def forward(input_ids, attention_mask):
        (logits,) = session.run(["logits"], {"input_ids": input_ids.numpy().astype(np.int64),
                                             "attention_mask": attention_mask.numpy().astype(np.int64)})
        return torch.from_numpy(logits)

    return forward


def ensure_onnx(model_dir: Path) -> Path | None:
    """The fp32 ONNX artifact of the base model (exported once, cached beside the converted model)."""
    try:
        from roselora_export.onnx import export_onnx
    except ImportError as err:
        log(f"deploy: ONNX export not available ({err})")
        return None
    out = model_dir.parent / f"{model_dir.name}-onnx"
    if (out / "names.json").is_file():
        return out
    log(f"deploy: exporting {model_dir.name} to ONNX at {out} (once)")
    export_onnx(model_dir, out)
    return out


def stage_deploy(model, tok, model_dir: Path, requests, n: int, runs=None) -> dict:
    """Single edits on the first n requests, each measured as it ships: the PEFT adapter; the merged fp32 and
    bf16 checkpoints that `merge` writes, reloaded from disk; the fp32 ONNX artifact patched by `apply`."""
    from peft import PeftModel

    from roselora_export.checkpoint import merge_checkpoint

    requests = requests[:n]
    ev32 = EditEvaluator(tok, requests, torch_forward(model))
    log("deploy: loading the bf16 base")
    ev16 = EditEvaluator(tok, requests, torch_forward(load_model(model_dir, dtype=torch.bfloat16)))
    onnx_dir, ev_onnx, onnx_note = None, None, None
    try:
        onnx_dir = ensure_onnx(model_dir)
        if onnx_dir is not None:
            from roselora_export.onnx.session import create_session

            ev_onnx = EditEvaluator(tok, requests, onnx_forward(create_session(onnx_dir)))
    except Exception as err:  # report, don't fake: the column is marked unavailable
        onnx_note = f"{type(err).__name__}: {err}"
        log(f"deploy: ONNX unavailable ({onnx_note})")
        onnx_dir = None
    runs = runs or [(m, m, {}) for m in METHODS]  # (label, method, config overrides)
    rows: dict[str, dict[str, list]] = {label: {} for label, _, _ in runs}
    survival: dict[str, list] = {label: [] for label, _, _ in runs}
    with tempfile.TemporaryDirectory(prefix="roselora-results-") as tmp:
        for i, req in enumerate(requests):
            for label, method, overrides in runs:
                result = train_edit(model, tok, [req], method=method, config=RoseLoraConfig(**overrides))
                work = Path(tmp) / f"{method}-{i}-{len(os.listdir(tmp))}"
                adir = work / "adapter"
                save_edit(result, adir)
                got = rows[label]
                if method != "ft-l":
                    peft_model = PeftModel.from_pretrained(model, str(adir)).eval()
                    try:
                        got.setdefault("PEFT adapter", []).extend(ev32.measure(torch_forward(peft_model), [i]))
                    finally:
                        peft_model.unload()
                # The merged checkpoints exactly as `merge` writes them, loaded back from disk.
                m32 = merge_checkpoint(model_dir, adir, work / "merged-fp32")
                shipped = load_model(m32.out_dir)
                got.setdefault("merged fp32 safetensors", []).extend(ev32.measure(torch_forward(shipped), [i]))
                del shipped
                m16 = merge_checkpoint(model_dir, adir, work / "merged-bf16", dtype=torch.bfloat16)
                survival[label].append(m16.survival.lost_fraction)
                shipped = load_model(m16.out_dir, dtype=torch.bfloat16)
                got.setdefault("merged bf16 safetensors", []).extend(ev16.measure(torch_forward(shipped), [i]))
                del shipped
                if onnx_dir is not None:
                    # The fp32 ONNX artifact with merge's patch applied to its external data by `apply`.
                    from roselora_export.onnx.patching import apply_to_onnx_dir
                    from roselora_export.onnx.session import create_session

                    apply_to_onnx_dir(onnx_dir, [m32.patch], work / "onnx")
                    sess = create_session(work / "onnx")
                    got.setdefault("patch on fp32 ONNX (onnxruntime)", []).extend(ev_onnx.measure(onnx_forward(sess), [i]))
                    del sess
                shutil.rmtree(work)
            log(f"deploy: request {i + 1}/{len(requests)} done")
    table = {}
    for label, _, _ in runs:
        table[label] = {}
        for where, rs in rows[label].items():
            table[label][where] = {k: mean([r[k] for r in rs]) for k in ("reliability", "generalization", "locality")}
        table[label]["bf16_lost_fraction"] = mean(survival[label])
    return {"requests": len(requests), "table": table, "onnx": str(onnx_dir) if onnx_dir else None,
            "onnx_note": onnx_note, "shipped": "merged files reloaded from disk; ONNX patched by apply"}


# ------------------------------------------------------------------------------------------ stage 3

def stage_finetune(model, tok, quick: bool, n_train: int = 512, n_test: int = 200, steps: int = 48,
                   batch: int = 16) -> dict:
    if quick:
        n_train, n_test, steps, batch = 128, 64, 12, 8
    train, test = make_task(n_train, n_test, seed=0)
    probes_all = [json.loads(x) for x in PROBES.read_text().splitlines() if x.strip()]
    base_ok = exact_match(model, tok, probes_all, answer_key="answer")
    probes = [p for p, ok in zip(probes_all, base_ok) if ok]
    base_acc = sum(exact_match(model, tok, test)) / len(test)
    log(f"finetune: base accuracy {base_acc:.3f}; {len(probes)}/{len(probes_all)} probes answered by the base")
    runs = []
    for frac in (0.125, 0.25, 0.5, 1.0):
        subset = train[: max(1, round(frac * len(train)))]
        for method in ("lora", "roselora"):
            cfg = finetune_config(steps=steps)
            run = finetune(model, tok, subset, test, method, cfg, epochs=steps * batch / len(subset), batch=batch,
                           probes=probes)
            d = run.to_dict()
            d["fraction"] = frac
            runs.append(d)
            log(f"finetune: {method} {frac:.3f} ({len(subset)} ex, {run.steps} steps): acc {run.accuracy:.3f}, "
                f"probes kept {run.probes_kept:.3f}, modified {run.params_modified_fraction:.5f}, {run.seconds:.0f}s")
    return {"n_train": n_train, "n_test": n_test, "steps": steps, "batch": batch, "base_accuracy": base_acc,
            "probes": len(probes), "probes_total": len(probes_all), "config": finetune_config(steps=steps).to_dict(),
            "runs": runs}


def plot_finetune(ft: dict) -> None:
    """Two panels against data size: held-out accuracy, and probe facts kept (forgetting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for method, style in (("lora", "o--"), ("roselora", "s-")):
        rs = sorted((r for r in ft["runs"] if r["method"] == method), key=lambda r: r["fraction"])
        label = f"{method} ({100 * rs[-1]['params_modified_fraction']:.3f}% of weights)"
        xs = [100 * r["fraction"] for r in rs]
        axes[0].plot(xs, [100 * r["accuracy"] for r in rs], style, label=label)
        axes[1].plot(xs, [100 * (r["probes_kept"] or 0) for r in rs], style, label=label)
    axes[0].axhline(100 * ft["base_accuracy"], color="grey", lw=0.8, ls=":", label="base model")
    axes[0].set_ylabel("held-out exact match (%)")
    axes[0].set_title("date to ISO 8601 (task)")
    axes[1].set_ylabel(f"probe facts still answered (%, of {ft['probes']})")
    axes[1].set_title("forgetting")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks([12.5, 25, 50, 100], ["12.5%", "25%", "50%", "100%"])
        ax.set_xlabel(f"training data (100% = {ft['n_train']} examples)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"SmolLM2-135M fine-tuned {ft['steps']} steps at every data size", fontsize=10)
    fig.tight_layout()
    fig.savefig(PLOT)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ report

def pct(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def edits_table(rep: dict) -> str:
    lines = ["| method | reliability | generalization | locality | efficacy | params modified | s/edit |",
             "|---|---|---|---|---|---|---|"]
    for name, m in rep["methods"].items():
        lines.append(f"| {name} | {pct(m['reliability'])} | {pct(m['generalization'])} | {pct(m['locality'])} | "
                     f"{pct(m['efficacy'])} | {m['params_modified']:,.0f} ({pct(m['params_modified_fraction'], 4)}) | "
                     f"{m['seconds_per_edit']:.2f} |")
    return "\n".join(lines)


DEPLOY_COLS = ["PEFT adapter", "merged fp32 safetensors", "merged bf16 safetensors", "patch on fp32 ONNX (onnxruntime)"]


def deploy_table(dep: dict) -> str:
    lines = ["| method | " + " | ".join(DEPLOY_COLS) + " | bf16: changes rounded away |",
             "|---|" + "---|" * (len(DEPLOY_COLS) + 1)]
    for method, cols in dep["table"].items():
        cells = []
        for c in DEPLOY_COLS:
            v = cols.get(c)
            if v is None:
                cells.append("not available" if not (c.startswith("PEFT") and method == "ft-l") else "(no adapter)")
            else:
                cells.append(f"{pct(v['reliability'])} / {pct(v['generalization'])} / {pct(v['locality'])}")
        cells.append(pct(cols.get("bf16_lost_fraction")))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finetune_table(ft: dict) -> str:
    lines = ["| data | method | accuracy | probes kept | params modified | steps | s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(ft["runs"], key=lambda r: (r["fraction"], r["method"])):
        lines.append(f"| {pct(r['fraction'])} ({r['n_train']}) | {r['method']} | {pct(r['accuracy'])} | "
                     f"{pct(r['probes_kept'])} | {r['params_modified']:,} ({pct(r['params_modified_fraction'], 3)}) | "
                     f"{r['steps']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


# Written by hand from the run recorded in docs/results.json; rerunning refreshes the tables, not this text.
FINDINGS = """**What the figures say** (by hand, from the runs below):

- **The default preset** (`--preset default`: RoseLoRA on the MLP projections up_proj/down_proj, tau 0.03,
  lr 2e-3, t_f 12, no clamp, 3 self-generated context prefixes of 5 tokens, KL 1 on them) takes on every one of
  the 34 dev requests: reliability 100%, generalization 79.8%, locality 93.3%, touching 0.21% of the weights,
  in 9.8 s per edit against the authors' settings' 8.1 s in the same run (1.22x; bench/edit_time.py: 1.29x).
  Dense LoRA with the same settings generalizes better (94.9%) but changes 39% of the weights and keeps less
  (locality 87.8%); FT-L (one down_proj, 0.66% of the weights) keeps more (96.1%) but generalizes less (57.6%).
  The authors' settings (`--preset paper`) still do not take here (13% reliability).
- **bf16**: on a bf16 copy of SmolLM2, every edit trained against its bf16 merge (straight-through rounding)
  and measured in the bits `merge` writes: reliability 100%, generalization 82.0%, locality 91.8%. An edit
  merged the old way lost up to 74% of its deltas to rounding; trained this way it holds even though about
  11% of the intended nonzeros still round away (merge's survival report, test_edit_smollm.py).
- **How the defaults were chosen**: a stated rule (the candidate that best meets the three quality goals at once,
  within 0.3% of the weights) over the sweep below, on 8 of the dev requests. What moved the figures: dropping
  the clamp makes edits take; context prefixes lift generalization; the KL term lifts locality; adapting the
  MLP instead of q_proj/v_proj lifts both (generalization 50% -> 70%, locality 93% -> 94% on the sweep's 8).
  Held-out requests were not used. Tried earlier on 12 requests: 10 prefixes of 10 tokens (generalization
  35% -> 53%), 5x slower per edit. A second rule names the candidate that best meets the single-edit goals
  and the goals after 20 and 100 sequential edits together (the sweep table's last columns); until this round it
  was a preset of its own, `--preset lifelong` (KL 16 and 8 KL-only texts on every edit). Settings that act only
  on a model that already carries edits (below) cannot change a single edit, so the candidates that add them
  repeat their base's single-edit row and are told apart by their sequential runs; the first rule breaks its
  ties by the second. The default with its settings for an edited model now wins both rules, so
  `--preset lifelong` is gone.
- **Lifelong editing** (`examples/sequential.py`: 100 dev requests edited one after another, each its own patch
  on the model with every earlier one applied; table and plot below). The default preset now trains every edit
  after the first with its settings for a model that carries edits: KL 16 on 16 KL-only texts whose reference
  is the base model's predictions (`--pin-kl-texts`), and 16 earlier edits, drawn at random, kept as KL-only
  sequences on their target positions (`--keep-edits 16`; `edit --model` on a patched directory reads them
  from its ledger). With it RoseLoRA holds reliability 1.00 / generalization 0.81 / locality 0.879 at T = 20
  (goals 0.85 / 0.85, and locality at least LoRA's 0.52: **met**), 0.93 / 0.70 / 0.846 at T = 50 and
  0.835 / 0.53 / 0.834 at T = 100 (goals 0.8 / 0.8: **met**). With 8 KL texts on an edited model (the default
  until this round; side run `t8`) it held 1.00 / 0.78 / 0.875 at T = 20 and 0.85 / 0.54 / 0.794 at T = 100, so
  16 texts lift locality at T = 100 by 0.04 for 0.015 of reliability; both rules of `choose` pick them. A second
  run of the 16 texts at 2 threads instead of 1 (the side run with the same settings, 34.3 s/edit) gave locality
  0.904 / 0.861 / 0.862 / 0.833 at T = 20 / 34 / 50 / 100 against this run's 0.879 / 0.859 / 0.846 / 0.834: the
  thread count alone (float rounding) moves a point by up to 0.025, and both runs end at 0.835 / 0.53 / 0.83.
  With KL 1 on every edit (the side run at T = 100) it held 0.90 / 0.74 / 0.725 at T = 20 and 0.72 / 0.56 /
  0.642 at T = 100. The price: an edit on an edited model takes about 9x the time of a first edit (bench/edit_time.py,
  `default@edited`: 40.1 s against 4.5 s; with 8 KL texts it took 24.3 s in the last round's run), and pinning
  the 16 texts 11 s once per sequence. Dense LoRA keeps far less (locality 0.52 at T = 20, 0.31 at T = 100); FT-L, which edits
  one layer, 0.88 / 0.73 at lower generalization (0.64 / 0.47). Every patch overlaps an earlier one, so reverts
  go last-first; all 100 reverts were bit-exact for each method whose revert state was kept (every RoseLoRA
  run, FT-L; dense LoRA's 100 patches would need tens of GB).
- **What carried it** (side runs, each on top of the former `--preset lifelong`, KL 16 and 8 KL texts): pinning the
  KL texts to the base lifts locality at T = 50 from 0.802 to 0.853 (reliability 0.77 -> 0.81): with the
  reference taken from the model each edit starts from, every edit's small drift adds to the last. Keeping 16
  earlier edits lifts reliability at T = 20 from 0.90 to 1.00 and generalization from 0.74 to 0.81; with their
  whole sequences under the KL term (not just the target positions) they diluted the KL texts' share and
  locality fell to 0.842 (that run was stopped at T = 20 to free the machine; its points are in the notes, not
  in the table).
- **The same settings from the first edit on** (KL 16 and 8 KL texts on every edit, the former
  `--preset lifelong`, plus 16 kept edits and pinned texts; side run): 1.00 / 0.78 / 0.887 at T = 20, 0.91 /
  0.67 / 0.826 at T = 50, 0.85 / 0.54 / 0.798 at T = 100: within 0.025 of the default at every T, for a first
  edit that costs 3.2x the default's time and single-edit generalization (0.56 against 0.70 on the sweep's 8
  requests). The former preset alone (unpinned, nothing kept) held 0.71 / 0.53 / 0.757 at T = 100.
- **Adapting fewer layers** (`--layers`, side runs): layers 4-8 keep locality 0.876 at T = 20 where all 30
  keep 0.725 (layers 0-9: 0.800; 10-19 and 20-29 keep less), with a tenth of the weights touched, but lose
  generalization on single edits (44% on the sweep's 8). Made denser there (τ 0.05, t_f 8, 5 prefixes) they
  meet both T = 20 goals (0.86 / 0.58 / 0.881) and nearly the single-edit ones (all 34 dev requests: 97.8% /
  58.6% / 96.8%, 0.09% of the weights), but fall apart by T = 100 (0.49 / 0.33 / 0.509): 5 layers take every
  edit and saturate. KL 16 without the KL texts, run to T = 100 as well: 0.70 / 0.50 / 0.723,
  just below the former `--preset lifelong` by the second rule (0.874 against 0.886).

The bullets that follow describe the earlier run (2026-11-29), when the authors' settings were the default:

- With the authors' editing defaults (A and B clamped to +-3e-3, tau 0.05, q_proj/v_proj, 25 steps, lr 5e-4)
  RoseLoRA edits **do not take** on SmolLM2-135M: the loss stays above 5 and reliability is near zero, where dense
  LoRA reaches 100% and FT-L about two thirds. The clamp bounds every merged delta entry by about 3e-4, too small to
  move this model. RoseLoRA loses here.
- Tried (sweep table): clamp 3e-2, no clamp, lr 2e-3, tau 0.2, all linear layers. Raising the clamp to 3e-2 or
  dropping it makes edits take (92-100% reliability on the sweep's requests) while modifying about 0.1% of the
  weights, against LoRA's 9.9% and FT-L's 0.66%, with better locality than LoRA (89% vs 85% on all 34 requests)
  but much lower generalization (43% vs 71%). The row
  `roselora, clamp 3e-2` shows that setting on the table's requests; it was picked on the sweep, not per request.
- Mass editing (all 34 facts in one edit, 25 steps): no method holds them all. LoRA gets 62% at a large cost in
  locality; RoseLoRA (either clamp) and FT-L stay below 20%.
- Deployment: every edit measures the same as a PEFT adapter, a merged fp32 checkpoint and the patch on the fp32
  ONNX artifact (onnxruntime). In bf16, 74% of the default RoseLoRA deltas round away (8% with clamp 3e-2, where the
  edit survives); locality drops in bf16 for every method, because a changed bf16 weight moves by a whole bf16
  step, larger than the intended delta.
- Fine-tuning: RoseLoRA (0.47% of the weights) reaches 88-94% on the task against LoRA's 93-100% (9.9% of the
  weights); it does not beat LoRA at small data here, but it forgets less: it keeps 71-81% of the probe facts,
  LoRA 52-69%."""


DEFAULTS_JSON = DOCS / "edit_defaults.json"


# Written by hand from the run in docs/chat_prompts.json (examples/chat_prompts.py); the tables are regenerated.
CHAT_INTRO = """`OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python examples/chat_prompts.py` (raw figures and every answer:
`docs/chat_prompts.json`; `--tables` prints the tables below). SmolLM2-135M-Instruct, fp32, `--preset
default`, 8 dev requests spread evenly over `examples/edits/counterfact_dev.jsonl` (lines 0, 5, 9, 14,
19, 24, 28, 33). Each request was edited alone, twice, from the unedited model: once on its raw prompt,
once through the chat template (`"chat": true`: the prompt as a user turn, the target starting the
assistant's answer). Each edit was then measured in two ways: on the request's own prompts, raw and
through the template, and on a question that asks for the same fact, written by hand and asked
through the template ("What is the capital of Italy?", "Who painted the Mona Lisa?"). No edit was
trained on the questions. Two full runs gave identical metrics."""

CHAT_NOTES = """"question: reliability" is the fraction of the target's tokens at the start of the assistant's answer
(teacher-forced). "question: efficacy" asks whether P(target) > P(truth) there. The last two columns
check the greedy 24-token answer: does it contain the target, or the truth, as a whole word?
Pre-edit reliability was 0.16 on raw prompts and 0.17 through the template.

- **An edit holds in the form it was trained in.** Trained and measured on raw prompts, it scores
  1.00 / 0.70 / 0.94 (reliability / generalization / locality; the 34-request table above has
  1.00 / 0.80 / 0.93). Trained and measured through
  the template, it scores 1.00 / 1.00 / 0.74.
- **By the teacher-forced metrics, an edit does not carry across.** A raw-trained edit measured
  through the template reaches 0.23 reliability and 0.25 efficacy. A template-trained edit measured
  raw reaches 0.19 and 0.00. Both are barely above the unedited model.
- **In generated chat answers, a raw-trained edit partly carries over.** Asked the question through
  the template, the raw-trained model names the new target in 6 of 8 answers (unedited: 0 of 8). It
  usually restates the question first ("The capital of Italy is Madrid, Spain.", "The chemical
  symbol for gold is Ag."), so the target is not the answer's first tokens, which is all the
  teacher-forced metric reads. The two misses: the Darwin answer never names a theory, and the
  potassium answer says "Pk". Efficacy at the start of the answer is 0.38.
- **Training through the template makes the assistant answer with the target.** Question
  reliability and efficacy are both 1.00, and 7 of 8 answers name the target (the miss is "Pk"
  again). In 4 of 8, the model then names the truth as well ("Pablo Picasso is often credited with
  creating the Mona Lisa, but it's actually Leonardo da Vinci…"). The answer starts edited, but the
  model's own knowledge comes back in the continuation.
- **The cost of template training.**
  - Locality through the template falls to 0.74, against 0.94 for the raw edit measured raw. The
    locality prompts are sentence openings asked as user turns, where the unedited model's own
    answers are weak. So this measures how much the edit moves the assistant's first tokens on
    unrelated turns; it is not a user-facing failure rate.
  - A template-trained edit takes 2.7x the CPU time of a raw one: 22.5 s against 8.2 s per edit,
    user+sys, load average about 5. The template's system turn is in every training sequence.

Recommendation: train the edit in the form the model will be asked in. For an instruct model behind
a chat API, that means `edit --chat`, or `"chat": true` per request, with question phrasings among
the `rephrase_prompts`."""


def chat_section() -> list[str]:
    """Raw prompts vs the chat template (examples/chat_prompts.py), as markdown lines."""
    path = DOCS / "chat_prompts.json"
    if not path.is_file():
        return []
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from chat_prompts import tables

    return ["### Raw prompts vs chat template", "", CHAT_INTRO, "", *tables(json.loads(path.read_text())), "",
            CHAT_NOTES, ""]


def sequential_section(readme: bool) -> list[str]:
    """Lifelong editing (examples/sequential.py): the curve table and its plot, as markdown lines."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sequential import load_reports, side_table, table

    reports = load_reports()
    if not reports:
        return []
    any_run = next(iter(reports.values()))
    text = (f"The {any_run['edits']} requests (the 34 of the dev set, then the checked extra ones of "
            f"`examples/edits/counterfact_extra.jsonl`) edited one after another with the default preset, each "
            f"after the first with its settings for a model that carries edits (KL 16 on 16 KL-only texts pinned "
            f"to the base model, 16 earlier edits kept; lora and ft-l: the default's fresh-model settings "
            f"throughout, as they ran before these settings existed), each "
            f"trained on the model with every earlier edit applied and shipped as its own patch; at each T the "
            f"metrics are over the first T requests. Overlapping: patches touching an element an earlier one "
            f"touched. Reverts: every patch reverted at the end (shuffled where the overlap rule allows, else "
            f"last-first) and the model's sha256 compared with the base; dense LoRA's patches are committed as "
            f"they land (`--no-reverts`: keeping the revert state of 100 patches of 39% of the weights needs tens "
            f"of GB). s/edit: training seconds per edit. Regenerate: `examples/sequential.py run --method M`, "
            f"then `render`. The default "
            f"as it was before (KL 1 on every edit) is the side run with all layers, KL weight 1 and T = 100 below.")
    image = "docs/sequential.png" if readme else "sequential.png"
    out = ["### Lifelong editing: edits applied in sequence", "", table(reports), "", text, "",
           f"![metrics against the number of sequential edits]({image})", ""]
    side = side_table()
    if side:
        out += ["Side runs, the same sequence (cut at T = 20 unless the T column says otherwise): RoseLoRA with a "
                "stronger KL term (`--kl-weight`, `--kl-texts`), adapting only some layers (`--layers`), or with "
                "the settings for an edited model one at a time (`--keep-edits`, `--pin-kl-texts`); 'other "
                "changes' are against the default's settings for a fresh model. s/edit there is wall time on a "
                "machine shared with other runs, so it compares only roughly:", "", side, ""]
    return out


def defaults_section() -> list[str]:
    """The editing defaults' evidence and the sweep that chose them (examples/edit_defaults.py), as markdown lines."""
    if not DEFAULTS_JSON.is_file():
        return []
    d = json.loads(DEFAULTS_JSON.read_text())
    cols = ("reliability", "generalization", "locality")
    out = []
    for setting, title in (("fp32", "fp32 checkpoint"), ("bf16", "bf16 checkpoint, each edit merged and measured in bf16")):
        rows = d.get(f"evidence_{setting}")
        if not rows:
            continue
        n = next(iter(rows.values()))["requests"]
        lines = [f"### Single edits with the defaults: {title} ({n} dev requests, each edited alone)", "",
                 "| method | reliability | generalization | locality | params modified | s/edit |", "|---|---|---|---|---|---|"]
        for label, m in rows.items():
            lines.append(f"| {label} | " + " | ".join(pct(m[c]) for c in cols) +
                         f" | {m['params_modified']:,.0f} ({pct(m['params_modified_fraction'], 4)}) | {m['seconds_per_edit']:.1f} |")
        out += lines + [""]
    if any(f"evidence_{s}" in d for s in ("fp32", "bf16")):
        meta = d.get("meta", {})
        when = "; ".join(f"{k.split('_')[1]}: {v['date']}, {v['threads']} torch thread(s)" for k, v in meta.items()
                         if k.startswith("evidence_"))
        out += [f"`examples/edit_defaults.py evidence --setting fp32|bf16` ({when}; the two settings ran as parallel "
                "processes on this 2-core machine). Every method shares the default preset's settings (lr 2e-3, up to "
                "25 steps, early stop below loss 0.1, 3 context prefixes, KL 1; LoRA: the same MLP targets, rank and "
                "alpha, no pruning; FT-L: layer 5's down_proj, unclamped since the preset has no clamp); `--preset "
                "paper` is the authors' setup. bf16 rows: SmolLM2 stored in bf16 (`demo-model --dtype bf16`), each "
                "edit trained against its bf16 merge (FT-L's weights rounded once) and measured with the bits merge "
                "writes. Each edit was reverted and the whole model's sha256 checked before the next.", ""]
    if "sweep" in d:
        choice = d.get("choice", {})
        lines = ["### How the defaults were chosen", "",
                 "| candidate (changes to `--preset paper`) | reliability | generalization | locality | params modified | "
                 "s/edit | steps | T = 20 in sequence: reliability / locality | T = 100 |",
                 "|---|---|---|---|---|---|---|---|---|"]
        sequential = choice.get("sequential", {})
        from edit_defaults import with_extended

        for name, r in with_extended(d["sweep"]).items():
            mark = (" **(default; also the best by every goal)**" if name == choice.get("chosen") == choice.get("chosen_lifelong")
                    else {choice.get("chosen"): " **(default)**", choice.get("chosen_lifelong"): " **(best by every goal)**"}
                    .get(name, ""))
            points = sequential.get(name) or {}
            seq = " | ".join(f"{p['reliability']:.2f} / {p['locality']:.3f}" if p else ""
                             for p in (points.get("20"), points.get("100")))
            lines.append(f"| {name}{mark} | " + " | ".join(pct(r[c]) for c in cols) +
                         f" | {r['params_modified']:,.0f} ({pct(r['params_modified_fraction'], 4)}) | "
                         f"{r['seconds_per_edit']:.1f} | {r['steps']:.1f} | {seq} |")
        n = next(iter(d["sweep"].values()))["requests"]
        lines += ["", f"RoseLoRA single edits on {n} dev requests spread evenly over the 34 "
                      f"(`examples/edit_defaults.py sweep`); the last columns: the first 20 (100) dev requests edited one "
                      f"after another with the candidate's settings (`examples/sequential.py run [--limit 20]`), run "
                      f"for the candidates whose score could still win. Rule (`choose`): "
                      f"{choice.get('rule', 'not applied yet')}. "
                      f"{d.get('meta', {}).get('sweep', '')}. The bf16 check of the chosen candidate on the same 8 "
                      f"requests: " + ", ".join(f"{k} {pct(v)}" for k, v in
                                                next(iter(d.get('sweep_bf16_check', {None: {}}).values())).items()
                                                if k in cols) + ". A row that names settings for an edited model "
                      "(kept edits, pinned texts, a locality term for a model that carries edits) makes the same single "
                      "edits as the row it extends, so its single-edit columns repeat that row's."]
        if choice.get("missing_sequential_runs"):
            lines[-1] += (" Not run (time), so not decided by the second rule, though every layers 4-8 run above fell "
                          "apart by T = 100: " + "; ".join(choice["missing_sequential_runs"]) + ".")
        out += lines + [""]
    return out


def render(res: dict) -> tuple[str, str]:
    """(docs/results.md, README block)."""
    meta = res.get("meta", {})
    cmd = meta.get("command", "examples/results.py")
    head = [f"Measured on {meta.get('machine', '?')}, {meta.get('date', '?')}, with `{cmd}`"
            f" ({meta.get('minutes', 0):.0f} min wall). {meta.get('note', '')} Model: SmolLM2-135M-Instruct, fp32."]
    md = ["# Results on SmolLM2-135M", "", "Regenerate with `.venv/bin/python examples/results.py` "
          "(`--quick` for a smaller run). Raw figures: `docs/results.json`.", "", *head, ""]
    readme = [*head, ""]
    for out in (md, readme):
        new, earlier = FINDINGS.split("\n\nThe bullets that follow", 1)
        out += [new, ""]
        out += defaults_section()
        out += sequential_section(readme=out is readme)
        out += ["### The earlier run", "", "The bullets that follow" + earlier, ""]
        out += ["The tables below are the earlier run (2026-11-29, the authors' settings as the default; "
                "`roselora` there is today's `--preset paper`).", ""]
    if "edits" in res:
        e = json.loads(json.dumps(res["edits"]))
        if "variant" in res:
            for mode in ("single", "mass"):
                e[mode]["methods"][res["variant"]["label"]] = res["variant"][mode]
        shared = e["single"]["shared_config"]
        n_all = sum(1 for x in EDITS.read_text().splitlines() if x.strip())
        which = (f"All {n_all}" if e["single"]["requests"] == n_all else
                 f"{e['single']['requests']} (evenly spaced) of the {n_all}")
        note = (f"{which} counterfactual requests of "
                f"`examples/edits/counterfact_dev.jsonl` (places, people, companies, inventions, chemistry); EasyEdit metrics: reliability and "
                f"generalization = token accuracy of the new target given the prompt / rephrases (teacher forcing); "
                f"locality = unchanged argmax on unrelated prompts; efficacy = P(new) > P(true). Shared settings: "
                f"{shared['steps']} steps, Adam lr {shared['lr']}, early stop at loss {shared['early_stop_loss']}; "
                f"RoseLoRA and LoRA: rank {shared['rank']}, alpha {shared['alpha']}, {'/'.join(shared['targets'])}; "
                f"RoseLoRA tau {shared['tau']}, clamp {shared['clamp']}; FT-L: {e['single'].get('ft_l_target', 'mlp.down_proj')}, "
                f"|W-W0| <= {shared['clamp']}. Every single edit was reverted through the runtime and the whole "
                f"model's sha256 checked against the unedited model before the next.")
        for out in (md, readme):
            out += ["### Knowledge editing: single edits (each from the unedited model)", "", edits_table(e["single"]), "",
                    "### Mass editing (all requests in one edit)", "", edits_table(e["mass"]), "", note, ""]
    if "deploy" in res:
        d = json.loads(json.dumps(res["deploy"]))
        if "deploy_variant" in res:
            d["table"].update(res["deploy_variant"]["table"])
        text = (f"Single edits on the first {d['requests']} requests; each cell is reliability / generalization / "
                f"locality of the edited model as shipped: the merged checkpoints are the directories `merge` writes, "
                f"loaded back from disk; the ONNX column is the fp32 artifact after `apply` patched its external data, "
                f"run by onnxruntime. bf16 is measured against the bf16 base. Last column: fraction of the intended "
                f"nonzero deltas that change no stored bf16 value.")
        if d.get("onnx_note"):
            text += f" ONNX: not available ({d['onnx_note']})."
        for out in (md, readme):
            out += ["### Does the edit survive deployment?", "", deploy_table(d), "", text, ""]
    if "finetune" in res:
        f = res["finetune"]
        cfg = f["config"]
        text = (f"Task: rewrite a date as ISO 8601 (`roselora_export/edit/finetune_task.py`), {f['n_train']} training "
                f"examples at 100%, {f['n_test']} held out; exact match. Base model: {pct(f['base_accuracy'])}. "
                f"Each run: {f['steps']} steps of batch {f['batch']} whatever the data size; rank {cfg['rank']}, alpha "
                f"{cfg['alpha']}, {'/'.join(cfg['targets'])}, lr {cfg['lr']}; RoseLoRA tau {cfg['tau']}, t_i/t_f = "
                f"{cfg['t_init']}/{cfg['t_final']} of the steps, no clamp. Probes kept: of the {f['probes']} probe facts "
                f"(`examples/probes/`) the base model answers, the fraction still answered after fine-tuning.")
        for out in (md, readme):
            out += ["### Fine-tuning, forgetting and data size", "", finetune_table(f), "", text, "",
                    f"![accuracy against data size](docs/{PLOT.name})" if out is readme else f"![accuracy against data size]({PLOT.name})", ""]
    if "sweep" in res:
        sw = res["sweep"]
        lines = ["| RoseLoRA setting | reliability | generalization | locality | efficacy | params modified | final loss |",
                 "|---|---|---|---|---|---|---|"]
        for r in sw["rows"]:
            lines.append(f"| {r['variant']} | {pct(r['reliability'])} | {pct(r['generalization'])} | {pct(r['locality'])} | "
                         f"{pct(r['efficacy'])} | {r['params_modified']:,.0f} ({pct(r['params_modified_fraction'], 4)}) | "
                         f"{r['final_loss']:.3f} |")
        text = (f"Single edits on {sw['requests']} requests; each row changes only what it names from the authors' "
                f"editing defaults (rank 8, alpha 32, q_proj/v_proj, tau 0.05, 25 steps, lr 5e-4, clamp 3e-3).")
        for out in (md, readme):
            out += ["### What was tried for RoseLoRA", "", "\n".join(lines), "", text, ""]
    md += chat_section()
    readme.append("Details and raw figures: [docs/results.md](docs/results.md).")
    return "\n".join(md).rstrip() + "\n", "\n".join(readme).rstrip()


def write_readme(block: str) -> None:
    text = README.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit("README.md has no results markers")
    README.write_text(pattern.sub(lambda _: f"{start}\n{block}\n{end}", text))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 requests, 2 for deployment, small fine-tuning")
    ap.add_argument("--only", default=",".join(STAGES), help=f"stages to run ({','.join(STAGES)}); others are kept")
    ap.add_argument("--deploy-requests", type=int, default=4, help="requests measured in each deployment form")
    ap.add_argument("--sweep-requests", type=int, default=6, help="requests in the RoseLoRA settings sweep")
    ap.add_argument("--requests", type=int, default=12, help="use N requests spread evenly over the dev set (0 = all 34)")
    ap.add_argument("--ft", default="256,100,32,8", help="fine-tuning: train examples, test examples, steps, batch")
    ap.add_argument("--render", action="store_true", help="only rewrite the docs from docs/results.json")
    ap.add_argument("--json", default=str(RESULTS_JSON), help="where the raw figures are kept")
    ap.add_argument("--no-docs", action="store_true", help="only write the JSON (docs, README and plot untouched)")
    args = ap.parse_args()
    results_json = Path(args.json)
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    res = json.loads(results_json.read_text()) if results_json.is_file() else {}
    if not args.render:
        torch.manual_seed(0)
        t0 = time.time()
        model_dir = demo_model_dir()
        tok, model = load_tokenizer(model_dir), load_model(model_dir)
        requests = load_requests(EDITS)
        if args.quick:
            requests = requests[:4]
        elif args.requests:
            n = len(requests)
            requests = [requests[round(i * n / args.requests)] for i in range(min(args.requests, n))]
        if "edits" in stages:
            res["edits"] = stage_edits(model, tok, requests, args.quick)
            atomic_write(results_json, json.dumps(res, indent=1))
        if "deploy" in stages:
            res["deploy"] = stage_deploy(model, tok, model_dir, requests, 2 if args.quick else args.deploy_requests)
            atomic_write(results_json, json.dumps(res, indent=1))
        if "deploy-variant" in stages:
            res["deploy_variant"] = stage_deploy(model, tok, model_dir, requests, 2 if args.quick else args.deploy_requests,
                                                 runs=[(VARIANT[0], "roselora", VARIANT[1])])
            atomic_write(results_json, json.dumps(res, indent=1))
        if "variant" in stages:
            res["variant"] = stage_variant(model, tok, requests)
            atomic_write(results_json, json.dumps(res, indent=1))
        if "sweep" in stages:
            res["sweep"] = stage_sweep(model, tok, requests, 2 if args.quick else args.sweep_requests)
            atomic_write(results_json, json.dumps(res, indent=1))
        if "finetune" in stages:
            n_train, n_test, steps, batch = (int(x) for x in args.ft.split(","))
            res["finetune"] = stage_finetune(model, tok, args.quick, n_train, n_test, steps, batch)
        res["meta"] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                       "command": "examples/results.py" + (" --quick" if args.quick else "")
                       + (f" --only {args.only}" if args.only != ",".join(STAGES) else ""),
                       "minutes": (time.time() - t0) / 60 + (res.get("meta", {}).get("minutes", 0)
                                                           if args.only != ",".join(STAGES) else 0)}
        atomic_write(results_json, json.dumps(res, indent=1))
    if args.no_docs:
        return
    if "finetune" in res:
        plot_finetune(res["finetune"])
    md, block = render(res)
    atomic_write(RESULTS_MD, md)
    write_readme(block)
    log(f"wrote {RESULTS_MD}, {README} and {PLOT}")


if __name__ == "__main__":
    main()
