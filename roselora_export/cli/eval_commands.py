"""`evaluate` and `benchmark-edits`: measure edits the way the paper does (EasyEdit's metrics)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import InputError
from . import main
from .edit_commands import _preset_options, preset_settings
from .options import (chat_option, check_chat, device_option, dtype_option, model_option, resolve_device,
                      resolve_dtype, resolve_model)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _scores(m: dict, efficacy: bool = True) -> str:
    """The reliability, generalization, locality (and efficacy) columns of one row."""
    cols = f"{_fmt(m['reliability']):>7} {_fmt(m['generalization']):>7} {_fmt(m['locality']):>7}"
    return cols + (f" {_fmt(m['efficacy']):>6}" if efficacy else "")


@main.command()
@model_option("Base (unedited) model directory (safetensors).")
@click.option("--requests", "requests_path", required=True, type=click.Path(), help="Edit requests, .jsonl.")
@click.option("--adapter", type=click.Path(), default=None,
              help="A PEFT adapter dir (measured unmerged, as PEFT runs it) or an ft-l dir (applied as an fp32 merge).")
@click.option("--patch", "patches", multiple=True, type=click.Path(),
              help="Patch file(s) applied in place, in order, before measuring (repeat the option for several).")
@click.option("--edited", "edited_dir", type=click.Path(), default=None,
              help="An already-edited model directory (e.g. what merge wrote), measured against --model as the "
                   "unedited reference; an fp16/bf16 one against --model rounded to that dtype.")
@chat_option("Measure each request")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@device_option()
def evaluate(model_dir, requests_path, adapter, patches, edited_dir, chat, as_json, device):
    """Measure reliability, generalization, locality and efficacy of an edit against the unedited model.

    Without --adapter, --patch or --edited the unedited model itself is measured (locality is then 1).
    Metrics: token-level teacher-forced accuracy of target_new (reliability; on rephrases:
    generalization), unchanged argmax on locality answers, P(target_new) > P(ground_truth).
    """
    from ..edit.evaluate import evaluate_dir

    model_dir = str(model_dir) if model_dir is not None else str(resolve_model(None))
    report = evaluate_dir(model_dir, requests_path, adapter=adapter, patches=list(patches), edited=edited_dir,
                          device=resolve_device(device), chat=chat)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'#':>3}  {'reliab':>7} {'general':>7} {'local':>7} {'effic':>6}  prompt -> target_new")
    for r in report["per_request"]:
        click.echo(f"{r['index']:>3}  {_scores(r)}  {r['prompt']} -> {r['target_new']}")
    click.echo(f"mean {_scores(report)}")
    click.echo(f"params modified: {report['params_modified']:,} of {report['base_params']:,} "
               f"({100 * report['params_modified_fraction']:.5f}%)")


@main.command("benchmark-edits")
@model_option("Base (unedited) model directory (safetensors).")
@click.option("--requests", "requests_path", required=True, type=click.Path(), help="Edit requests, .jsonl.")
@click.option("--methods", default="roselora,lora,ft-l", show_default=True, help="Comma-separated methods to compare.")
@click.option("--mass", is_flag=True, help="Train one edit carrying all requests instead of one edit per request.")
@click.option("--sequential", is_flag=True,
              help="Lifelong editing: each request edited on the model with every earlier edit applied (each its own "
                   "patch), all measured after the last, then every patch reverted (shuffled where the overlap rule "
                   "allows) and the bits checked against the base.")
@click.option("--measure-at", default="", metavar="T1,T2,...",
              help="--sequential: also measure after the T-th edit, over the first T requests (a curve against T).")
@click.option("--no-reverts", is_flag=True,
              help="--sequential: commit each patch as it lands and skip the revert phase (dense edits' revert "
                   "state for many patches outgrows memory).")
@click.option("--limit", type=int, default=None, help="Only the first N requests.")
@chat_option("Train and measure each request")
@_preset_options()
@click.option("--layer", type=int, default=None, help="ft-l: the layer whose MLP down-projection is trained [default: 5].")
@click.option("--no-bit-check", is_flag=True, help="Skip the sha256 of the whole model after each revert.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full report (per request) as JSON to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@device_option()
@dtype_option(help="Dtype to load the model in for training and measuring.  [default: fp32]")
def benchmark_edits(model_dir, requests_path, methods, mass, sequential, measure_at, no_reverts, limit, chat, layer,
                    no_bit_check, progress, out_path, as_json, device, dtype, **hyper):
    """Edit each request alone from the unedited model (or all at once with --mass), measure, revert exactly.

    After every revert the whole model's bits are checked against the unedited model (sha256), so no
    edit leaks into the next. All methods get the same shared settings (--preset and the options
    that override it); what differs by construction is printed with the results. On a bf16/fp16
    checkpoint (or with --deploy-dtype) every edit is measured as merge would ship it: rounded.
    """
    from tqdm.auto import tqdm

    from ..edit.benchmark import benchmark_edits as run
    from ..edit.deploy_rounding import round_weights_
    from ..edit.requests import load_requests
    from ..edit.settings import resolve_deploy_dtype
    from ..models import check_model_dir, load_model, load_tokenizer

    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise InputError("--methods: give at least one of roselora,lora,ft-l")
    if mass and sequential:
        raise InputError("--mass and --sequential: choose one")
    if (measure_at or no_reverts) and not sequential:
        raise InputError("--measure-at and --no-reverts apply to --sequential only")
    checkpoints = _positive_ints(measure_at, "--measure-at")
    config, settings = preset_settings(hyper)
    requests = load_requests(requests_path, chat=chat)
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit {limit}: must be >= 1")
        requests = requests[:limit]
    if out_path is not None and out_path.exists() and out_path.is_dir():
        raise InputError(f"--out {out_path}: is a directory; give a .json file path")
    model_dir = str(model_dir) if model_dir is not None else str(resolve_model(None))
    tokenizer = load_tokenizer(model_dir)
    check_chat(tokenizer, requests, chat, requests_path)
    # The deploy dtype is shared by every method; ft-l's stored weights are rounded to it as well.
    settings, round_first, note = resolve_deploy_dtype(settings, check_model_dir(model_dir), "roselora")
    if note and not as_json:
        click.echo(f"note: {note}", err=True)
    model = load_model(model_dir, dtype=resolve_dtype(dtype), progress=progress).to(resolve_device(device))
    if round_first:
        round_weights_(model, settings.deploy_dtype)
    bar = tqdm(total=len(names) * len(requests), desc="edits", file=sys.stderr, unit="edit", disable=not progress)
    tick = lambda m, i: (bar.set_postfix(method=m), bar.update(1))  # noqa: E731
    try:
        if sequential:
            from ..edit.benchmark import sequential_edits
            from ..edit.evaluate import count_base_params

            report = {"methods": {m: sequential_edits(model, tokenizer, requests, m, config, settings=settings,
                                                      layer=layer, measure_at=checkpoints,
                                                      keep_reverts=not no_reverts, on_edit=tick) for m in names},
                      "base_params": count_base_params(model), "mode": "sequential", "requests": len(requests),
                      "shared_config": config.to_dict(), "settings": settings.to_dict()}
        else:
            report = run(model, tokenizer, requests, names, config, settings=settings, mass=mass,
                         check_bits=not no_bit_check, layer=layer, on_edit=tick)
    finally:
        bar.close()
    if out_path is not None:  # beside the destination, then renamed in: a crash never leaves half a report
        from ..core.atomic import atomic_write

        atomic_write(out_path, (json.dumps(report, indent=2) + "\n").encode())
    _warn_if_edits_did_not_take(report)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['mode']} edits, {report['requests']} requests, base {report['base_params']:,} weights")
    if report["mode"] == "sequential":
        _print_sequential(report)
        return
    click.echo(f"{'method':<9} {'reliab':>7} {'general':>7} {'local':>7} {'effic':>6} {'params modified':>16} {'s/edit':>7}")
    for name, m in report["methods"].items():
        click.echo(f"{name:<9} {_scores(m)} {m['params_modified_fraction'] * 100:>15.4f}% {m['seconds_per_edit']:>7.2f}")
    shared = report["shared_config"]
    click.echo("shared: " + ", ".join(f"{k}={shared[k]}" for k in ("steps", "lr", "weight_decay", "early_stop_loss", "seed")))
    for name, m in report["methods"].items():
        click.echo(f"{name}: {m['differs']}")
    if all(m["bits_checked"] for m in report["methods"].values()):
        click.echo("after every revert the model's sha256 equalled the unedited model's")


def _print_sequential(report: dict) -> None:
    click.echo(f"{'method':<9} {'reliab':>7} {'general':>7} {'local':>7} {'union touched':>14} {'overlapping':>11} "
               f"{'s/edit':>7}  reverted to base")
    for name, m in report["methods"].items():
        click.echo(f"{name:<9} {_scores(m, False)} "
                   f"{m['params_touched_union_fraction'] * 100:>13.4f}% {m['patches_overlapping_an_earlier_one']:>11} "
                   f"{m['seconds_per_edit']:>7.2f}  {_reverted(m['bits_identical_after_reverts'])}")
        for point in m["curve"][:-1]:
            click.echo(f"  after {point['edits']:>3} {_scores(point, False)}")


def _reverted(identical: bool | None) -> str:
    return {True: "bit-identical", False: "NO", None: "not reverted (--no-reverts)"}[identical]


def _positive_ints(text: str, option: str) -> list[int]:
    """'10,20,34' -> [10, 20, 34]; a one-line error for anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{option} {text}: give whole numbers separated by commas") from None
    if any(v < 1 for v in values):
        raise InputError(f"{option} {text}: every value must be >= 1")
    return values


def _warn_if_edits_did_not_take(report: dict) -> None:
    for name, m in report["methods"].items():
        if m["reliability"] is not None and m["reliability"] < 0.1:
            hint = " see --clamp" if m["config"].get("clamp") is not None else " try more --steps or a higher --lr"
            click.echo(f"warning: {name}: reliability {m['reliability']:.2f}: the edit did not take;{hint}", err=True)
