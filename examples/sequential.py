"""Lifelong editing on SmolLM2: the sequential benchmark at T = 100 with a curve, and its report.

    .venv/bin/python examples/sequential.py run --method roselora       # docs/sequential/roselora.json
    .venv/bin/python examples/sequential.py run --method lora --no-reverts
    .venv/bin/python examples/sequential.py render                      # docs/sequential.png (+ the table, printed)

The requests are the 34 of examples/edits/counterfact_dev.jsonl, then the extra checked ones of
counterfact_extra.jsonl, in file order; each run measures after 10, 20, 34, 50 and 100 edits over the
requests edited so far (the curve), with the default preset. One run per method, one torch thread each,
so that two can share a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from roselora_export.core.atomic import atomic_write  # noqa: E402

EDITS = [ROOT / "examples" / "edits" / "counterfact_dev.jsonl", ROOT / "examples" / "edits" / "counterfact_extra.jsonl"]
OUT = ROOT / "docs" / "sequential"
CHECKPOINTS = (10, 20, 34, 50)
METHODS = ("roselora", "lora", "ft-l")


def run(method: str, limit: int, keep_reverts: bool, threads: int, overrides: dict | None = None,
        tag: str = "", preset_name: str = "default") -> None:
    import torch

    from roselora_export.edit.benchmark import sequential_edits
    from roselora_export.edit.requests import load_requests
    from roselora_export.edit.settings import preset
    from roselora_export.models import demo_model_dir, load_model, load_tokenizer

    torch.set_num_threads(threads)
    requests = [r for path in EDITS for r in load_requests(str(path))][:limit]
    config, settings = preset(preset_name)
    if overrides:  # a side experiment; the table reads only the untagged runs
        config_names = set(config.to_dict())
        config = type(config).from_dict({**config.to_dict(), **{k: v for k, v in overrides.items() if k in config_names}})
        settings = settings.overridden({k: v for k, v in overrides.items() if k not in config_names})
    model_dir = str(demo_model_dir())
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    t0 = time.time()

    def tick(m, i):
        print(f"{m} edit {i + 1}/{len(requests)} at {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    partial = OUT / f"{method}{tag}.partial.json"  # the curve so far, in case the run is cut short

    def measured(point):
        points = json.loads(partial.read_text()) if partial.exists() else []
        atomic_write(partial, (json.dumps(points + [point], indent=1) + "\n").encode())
        print(f"{method}: {json.dumps(point)}", file=sys.stderr, flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    report = sequential_edits(model, tok, requests, method, config, settings=settings, measure_at=CHECKPOINTS,
                              keep_reverts=keep_reverts, on_edit=tick, on_measure=measured)
    report["threads"] = threads
    report["requests"] = [str(p.relative_to(ROOT)) for p in EDITS]
    atomic_write(OUT / f"{method}{tag}.json", (json.dumps(report, indent=1) + "\n").encode())
    partial.unlink(missing_ok=True)
    print(f"{method}: {json.dumps(report['curve'])}", file=sys.stderr)


LABELS = {"roselora": "roselora", "lora": "lora", "ft-l": "ft-l"}


def load_reports() -> dict[str, dict]:
    """The runs present under docs/sequential/, by label; a run cut short gives its curve so far (partial)."""
    out = {}
    for stem, label in LABELS.items():
        if (OUT / f"{stem}.json").exists():
            out[label] = json.loads((OUT / f"{stem}.json").read_text())
        elif (OUT / f"{stem}.partial.json").exists():
            curve = json.loads((OUT / f"{stem}.partial.json").read_text())
            out[label] = {"curve": curve, "edits": curve[-1]["edits"], "partial": True}
    return out


def table(reports: dict[str, dict]) -> str:
    """One markdown row per method and measurement point (T)."""
    lines = ["| method | T | reliability | generalization | locality | union touched | overlapping | s/edit | reverts |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m, r in reports.items():
        for p in r["curve"]:
            last = p["edits"] == r["edits"] and not r.get("partial")
            tail = "run stopped here | | " if r.get("partial") and p is r["curve"][-1] else " | | "
            if last:
                reverts = {True: "all bit-exact", False: "NOT exact", None: "not kept"}[r["bits_identical_after_reverts"]]
                tail = f"{r['patches_overlapping_an_earlier_one']} | {r['seconds_per_edit']:.1f} | {reverts}"
            lines.append(f"| {m} | {p['edits']} | {p['reliability']:.2f} | {p['generalization']:.2f} | "
                         f"{p['locality']:.3f} | {100 * p['params_touched_union_fraction']:.2f}% | {tail} |")
    return "\n".join(lines)


def side_table() -> str:
    """The side runs (roselora_<tag>.json other than the preset runs) at their last T, next to the default's
    point at that T: which layers, KL weight and KL texts, and what they gave."""
    runs = [json.loads(p.read_text()) for p in OUT.glob("roselora_*.json")
            if not p.name.endswith(".partial.json") and p.stem not in LABELS]
    if not runs:
        return ""

    def layers(r):
        ls = r["config"].get("layers")
        return "all" if not ls else (f"{ls[0]}-{ls[-1]}" if ls == list(range(ls[0], ls[-1] + 1)) else ",".join(map(str, ls)))

    runs.sort(key=lambda r: (layers(r) != "all", (r["config"].get("layers") or [0])[0], r["settings"].get("kl_texts", 0),
                             r["settings"]["kl_weight"]))
    from roselora_export.edit.settings import EditSettings, preset
    from roselora_export.method.config import RoseLoraConfig

    from dataclasses import replace

    # What the side runs vary from: the default's settings for a fresh model (none of those for an edited one).
    config0, settings0 = preset("default")
    base_config = config0.to_dict()
    base_settings = replace(settings0, kl_weight_when_edited=None, kl_texts_when_edited=None, keep_edits=0,
                            pin_kl_texts=False).to_dict()

    def other(r):  # what else differs from the default preset
        config = RoseLoraConfig.from_dict(r["config"]).to_dict()
        settings = EditSettings(**r["settings"]).to_dict()
        diff = [f"{k} {','.join(v) if isinstance(v, list) else v}" for k, v in config.items()
                if k != "layers" and v != base_config[k]]
        diff += [f"{k} {v}" for k, v in settings.items() if k not in ("kl_weight", "kl_texts") and v != base_settings[k]]
        return ", ".join(diff)

    rows = ["| layers | KL weight | KL texts | other changes | T | reliability | generalization | locality | "
            "union touched | s/edit |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    main, t = load_reports().get("roselora"), runs[0]["edits"]
    point = next((p for p in main["curve"] if p["edits"] == t), None) if main else None
    if point is not None:
        rows.append(f"| all (default) | {main['settings']['kl_weight']:g} | {main['settings'].get('kl_texts', 0)} | "
                    f"{other(main)} | {t} | "
                    f"{point['reliability']:.2f} | {point['generalization']:.2f} | {point['locality']:.3f} | "
                    f"{100 * point['params_touched_union_fraction']:.2f}% | |")
    for r in runs:
        rows.append(f"| {layers(r)} | {r['settings']['kl_weight']:g} | {r['settings'].get('kl_texts', 0)} | {other(r)} | "
                    f"{r['edits']} | "
                    f"{r['reliability']:.2f} | {r['generalization']:.2f} | {r['locality']:.3f} | "
                    f"{100 * r['params_touched_union_fraction']:.2f}% | {r['seconds_per_edit']:.1f} |")
    return "\n".join(rows)


def render() -> None:
    reports = load_reports()
    print(table(reports))
    print(side_table())
    _plot(reports)


def _plot(reports: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
    for ax, metric in zip(axes, ("reliability", "generalization", "locality")):
        for m, r in reports.items():
            ts = [p["edits"] for p in r["curve"]]
            ax.plot(ts, [p[metric] for p in r["curve"]], marker="o", label=m)
        ax.set_title(metric)
        ax.set_xlabel("edits applied in sequence (T)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean over the T requests")
    axes[0].legend()
    fig.suptitle("Sequential editing on SmolLM2-135M-Instruct, one patch per edit (default preset unless named)")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "sequential.png", dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one method's sequential run")
    r.add_argument("--method", choices=METHODS, required=True)
    r.add_argument("--limit", type=int, default=100, help="edits in the sequence (default 100)")
    r.add_argument("--no-reverts", action="store_true", help="commit each patch (dense LoRA: revert state outgrows memory)")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--preset", default="default", help="the edit preset (default, paper)")
    r.add_argument("--kl-weight", type=float, default=None, help="override the preset's KL weight (side experiment)")
    r.add_argument("--prefixes", type=int, default=None, help="override the preset's context prefixes (side experiment)")
    r.add_argument("--prefix-length", type=int, default=None, help="override the preset's prefix length (side experiment)")
    r.add_argument("--kl-texts", type=int, default=None, help="override the preset's KL-only texts (side experiment)")
    r.add_argument("--layers", default=None, help="override the preset's adapted layers, e.g. 2-6 (side experiment)")
    r.add_argument("--tau", type=float, default=None, help="override the preset's kept fraction (side experiment)")
    r.add_argument("--t-final", type=float, default=None, help="override the preset's t_f (side experiment)")
    r.add_argument("--lr", type=float, default=None, help="override the preset's learning rate (side experiment)")
    r.add_argument("--targets", default=None, help="override the preset's targets (side experiment)")
    r.add_argument("--kl-texts-when-edited", type=int, default=None, help="override the preset's KL texts on an edited model")
    r.add_argument("--keep-edits", type=int, default=None, help="override the preset's kept earlier edits (side experiment)")
    r.add_argument("--pin-kl-texts", action="store_true", default=None, help="pin the KL texts to the base (side experiment)")
    r.add_argument("--tag", default="", help="suffix of the output file name (side experiments)")
    sub.add_parser("render", help="table and plot from docs/sequential/*.json")
    args = ap.parse_args()
    if args.cmd == "run":
        overrides = {k: v for k, v in (("kl_weight", args.kl_weight), ("prefixes", args.prefixes),
                                       ("prefix_length", args.prefix_length), ("kl_texts", args.kl_texts),
                                       ("layers", args.layers), ("tau", args.tau),
                                       ("t_final", args.t_final), ("lr", args.lr),
                                       ("kl_texts_when_edited", args.kl_texts_when_edited), ("keep_edits", args.keep_edits), ("pin_kl_texts", args.pin_kl_texts),
                                       ("targets", args.targets and tuple(args.targets.split(","))))
                     if v is not None}
        run(args.method, args.limit, not args.no_reverts, args.threads, overrides, args.tag, args.preset)
    else:
        render()
