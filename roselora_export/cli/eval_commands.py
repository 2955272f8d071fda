"""`evaluate` and `benchmark-edits`: measure edits the way the paper does (EasyEdit's metrics)."""
from __future__ import annotations

import json
import sys

import click

from . import main

_CONFIG_HELP = None


def _help(name: str) -> str:
    global _CONFIG_HELP
    if _CONFIG_HELP is None:
        from ..method.config import RoseLoraConfig

        _CONFIG_HELP = RoseLoraConfig.help()
    return _CONFIG_HELP.get(name, "")


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Base model directory (safetensors).")
@click.option("--requests", "requests_path", required=True, type=click.Path(), help="Edit requests, .jsonl.")
@click.option("--adapter", type=click.Path(), default=None,
              help="A PEFT adapter dir (measured unmerged, as PEFT runs it) or an ft-l dir (applied as an fp32 merge).")
@click.option("--patch", "patches", multiple=True, type=click.Path(),
              help="Patch file(s) applied in place, in order, before measuring (repeat the option for several).")
@click.option("--edited", "edited_dir", type=click.Path(), default=None,
              help="An already-edited model directory (e.g. what merge wrote), measured against --model as the "
                   "unedited reference; an fp16/bf16 one against --model rounded to that dtype.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def evaluate(model_dir, requests_path, adapter, patches, edited_dir, as_json):
    """Measure reliability, generalization, locality and efficacy of an edit against the unedited model.

    Without --adapter, --patch or --edited the unedited model itself is measured (locality is then 1).
    Metrics: token-level teacher-forced accuracy of target_new (reliability; on rephrases:
    generalization), unchanged argmax on locality answers, P(target_new) > P(ground_truth).
    """
    from ..edit.evaluate import evaluate_dir

    report = evaluate_dir(model_dir, requests_path, adapter=adapter, patches=list(patches), edited=edited_dir)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'#':>3}  {'reliab':>7} {'general':>7} {'local':>7} {'effic':>6}  prompt -> target_new")
    for r in report["per_request"]:
        click.echo(f"{r['index']:>3}  {_fmt(r['reliability']):>7} {_fmt(r['generalization']):>7} "
                   f"{_fmt(r['locality']):>7} {_fmt(r['efficacy']):>6}  {r['prompt']} -> {r['target_new']}")
    click.echo(f"mean {_fmt(report['reliability']):>7} {_fmt(report['generalization']):>7} "
               f"{_fmt(report['locality']):>7} {_fmt(report['efficacy']):>6}")
    click.echo(f"params modified: {report['params_modified']:,} of {report['base_params']:,} "
               f"({100 * report['params_modified_fraction']:.5f}%)")


@main.command("benchmark-edits")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Base model directory (safetensors).")
@click.option("--requests", "requests_path", required=True, type=click.Path(), help="Edit requests, .jsonl.")
@click.option("--methods", default="roselora,lora,ft-l", help="Comma-separated methods to compare.")
@click.option("--mass", is_flag=True, help="Train one edit carrying all requests instead of one edit per request.")
@click.option("--limit", type=int, default=None, help="Only the first N requests.")
@click.option("--steps", type=int, default=None, help=_help("steps") + " [default: 25]")
@click.option("--lr", type=float, default=None, help=_help("lr") + " [default: 5e-4]")
@click.option("--rank", type=int, default=None, help=_help("rank") + " [default: 8]")
@click.option("--alpha", type=float, default=None, help=_help("alpha") + " [default: 32]")
@click.option("--targets", default=None, help=_help("targets") + " [default: q_proj,v_proj]")
@click.option("--tau", type=float, default=None, help=_help("tau") + " [default: 0.05]")
@click.option("--clamp", default=None, help=_help("clamp") + " [default: 3e-3; 'none' = off]")
@click.option("--layer", type=int, default=None, help="ft-l: the layer whose MLP down-projection is trained [default: 5].")
@click.option("--seed", type=int, default=None, help=_help("seed") + " [default: 0]")
@click.option("--no-bit-check", is_flag=True, help="Skip the sha256 of the whole model after each revert.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def benchmark_edits(model_dir, requests_path, methods, mass, limit, steps, lr, rank, alpha, targets, tau, clamp,
                    layer, seed, no_bit_check, as_json):
    """Edit each request alone from the unedited model (or all at once with --mass), measure, revert exactly.

    After every revert the whole model's bits are checked against the unedited model (sha256), so no
    edit leaks into the next. All methods get the same shared settings; what differs by construction
    is printed with the results.
    """
    from tqdm.auto import tqdm

    from ..edit.benchmark import benchmark_edits as run
    from ..edit.requests import load_requests
    from ..errors import InputError
    from ..method.config import RoseLoraConfig
    from ..models import load_model, load_tokenizer

    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise InputError("--methods: give at least one of roselora,lora,ft-l")
    overrides = {k: v for k, v in dict(steps=steps, lr=lr, rank=rank, alpha=alpha, targets=targets, tau=tau,
                                        seed=seed).items() if v is not None}
    if clamp is not None:
        if clamp.lower() == "none":
            overrides["clamp"] = None
        else:
            try:
                overrides["clamp"] = float(clamp)
            except ValueError:
                raise InputError(f"--clamp {clamp}: give a number or 'none'") from None
    config = RoseLoraConfig(**overrides)
    requests = load_requests(requests_path)
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit {limit}: must be >= 1")
        requests = requests[:limit]
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    bar = tqdm(total=len(names) * len(requests), desc="edits", file=sys.stderr, unit="edit")
    try:
        report = run(model, tokenizer, requests, names, config, mass=mass, check_bits=not no_bit_check,
                     layer=layer, on_edit=lambda m, i: (bar.set_postfix(method=m), bar.update(1)))
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['mode']} edits, {report['requests']} requests, base {report['base_params']:,} weights")
    click.echo(f"{'method':<9} {'reliab':>7} {'general':>7} {'local':>7} {'effic':>6} {'params modified':>16} {'s/edit':>7}")
    for name, m in report["methods"].items():
        click.echo(f"{name:<9} {_fmt(m['reliability']):>7} {_fmt(m['generalization']):>7} {_fmt(m['locality']):>7} "
                   f"{_fmt(m['efficacy']):>6} {m['params_modified_fraction'] * 100:>15.4f}% {m['seconds_per_edit']:>7.2f}")
    shared = report["shared_config"]
    click.echo("shared: " + ", ".join(f"{k}={shared[k]}" for k in ("steps", "lr", "weight_decay", "early_stop_loss", "seed")))
    for name, m in report["methods"].items():
        click.echo(f"{name}: {m['differs']}")
    if all(m["bits_checked"] for m in report["methods"].values()):
        click.echo("after every revert the model's sha256 equalled the unedited model's")
