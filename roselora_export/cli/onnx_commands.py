"""CLI commands for ONNX artifacts: `export-onnx`, `map-onnx`, `onnx-generate` (patching them is `apply --base ONNX_DIR`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import InputError, first_line
from . import main
from .options import (
    chat_option, device_option, max_new_tokens_option, model_option, prompts_option, resolve_model, resolve_prompts,
    resolve_providers,
)


@main.command("export-onnx")
@model_option("Local Hugging Face model directory (config.json + *.safetensors).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="New directory for model.onnx, model.onnx.data and names.json (must not exist or be empty).")
@click.option("--task", type=click.Choice(["auto", "causal-lm", "sequence-classification"]), default="auto",
              help="Graph interface: causal-lm gives logits per token, sequence-classification per sequence; "
                   "auto reads config.json's architectures.")
@click.option("--opset", type=int, default=17, help="ONNX opset version.")
@click.option("--kv-cache", is_flag=True,
              help="Causal LMs: also take past_key_values.{i}.key/value and return present.{i}.key/value, "
                   "for incremental decoding (attention_mask then spans past + new tokens).")
@click.option("--stream/--no-stream", default=None,
              help="Trace the graph without weights and copy the weights file to file (any size, peak memory about "
                   "the model once).  [default: for checkpoints of 1 GiB or more]")
@click.option("--check/--no-check", default=True,
              help="Run the exported graph in onnxruntime on a new shape and compare logits with PyTorch.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def export_onnx_command(model_dir: str, out_dir: str, task: str, opset: int, kv_cache: bool, check: bool,
                        as_json: bool, stream: bool | None = None) -> None:
    """Export a model to ONNX once, so patches can later be applied to it without re-exporting.

    The graph takes input_ids and attention_mask (dynamic batch and sequence) and returns logits.
    Every weight goes to one external data file, each tensor starting at an aligned offset so the
    file can be memory-mapped. names.json maps every state-dict key to the initializer holding it
    (tied weights such as lm_head/embed_tokens map to one), verified by value at export.
    """
    from tqdm import tqdm

    from ..onnx.export import EXPORT_PHASES, export_onnx

    model_dir = resolve_model(model_dir)

    # One step per phase: loading and tracing dominate (SmolLM2-135M: about a minute on 2 busy cores).
    with tqdm(total=len(EXPORT_PHASES), desc=f"export {model_dir}", unit="phase", file=sys.stderr, leave=False) as bar:
        def step(phase: str) -> None:
            bar.set_postfix_str(f"{phase} done")
            bar.update()

        report = export_onnx(model_dir, out_dir, task=task, opset=opset, kv_cache=kv_cache, check_runtime=check,
                             progress=step, stream=stream)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    diff = report["max_abs_logit_diff"]
    click.echo(f"wrote {report['out']}: {report['initializers']} initializers, {report['data_bytes'] / 2**20:.1f} MiB "
               f"of external data, {report['verified_by_value']} state-dict keys verified by value")
    if report["tied"]:
        click.echo(f"tied: {', '.join(report['tied'])}")
    if report["unmapped"]:
        click.echo(f"not in the graph (cannot be patched): {', '.join(report['unmapped'])}")
    click.echo(f"onnxruntime vs PyTorch max |logit diff|: {report['runtime_check'] if diff is None else f'{diff:.3g}'}; "
               f"{report['total_s']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB")


@main.command("onnx-generate")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(file_okay=False),
              help="ONNX artifact directory from export-onnx (a causal LM, with its tokenizer files).")
@click.option("--patch", "patch_files", multiple=True, type=click.Path(dir_okay=False),
              help="Patch to run with, as initializer overrides (the files on disk are not changed); repeatable.")
@prompts_option("Text to continue")
@chat_option("Ask each prompt (ort runtime only)")
@max_new_tokens_option()
@device_option(help="Where to run: auto (onnxruntime's CUDA execution provider when it has one and a GPU is "
                    "present, else the CPU), cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print prompts, continuations and token ids as JSON.")
@click.option("--runtime", type=click.Choice(["auto", "ort", "genai"]), default="auto",
              help="ort: onnxruntime on an export-onnx artifact; genai: onnxruntime-genai on a model-builder "
                   "artifact (--patch then runs on a patched temporary copy); auto: genai where genai_config.json is.")
def onnx_generate_command(onnx_dir: str, patch_files: tuple[str, ...], prompts: tuple[str, ...], requests_path,
                          chat: bool, max_new_tokens: int, device: str, as_json: bool, runtime: str = "auto") -> None:
    """Greedy continuation of each prompt by onnxruntime, with or without patches.

    A quick check that an ONNX artifact carries an edit: run it with --patch (overrides in memory)
    and without, or on a directory patched by `apply --base ONNX_DIR`.
    """
    items = resolve_prompts(prompts, requests_path, chat)
    pairs = [(p, t) for p, t, _ in items]
    if runtime == "genai" or (runtime == "auto" and (Path(onnx_dir) / "genai_config.json").is_file()):
        from ..onnx.genai import genai_results

        if any(c for _, _, c in items):
            raise InputError("--chat (or a request's \"chat\" field) is not supported with onnxruntime-genai; "
                             "use --runtime ort on an export-onnx artifact")
        results = genai_results(onnx_dir, list(patch_files), pairs, max_new_tokens)
        head = {"patches": list(patch_files), "runtime": "onnxruntime-genai"}
    else:
        results, head = _ort_results(onnx_dir, list(patch_files), items, max_new_tokens, device)
    if as_json:
        click.echo(json.dumps({**head, "results": results}, indent=2))
        return
    for r in results:
        click.echo(r["prompt"] + r["continuation"] + (f"   (target: {r['target']})" if r["target"] is not None else ""))


def _ort_results(onnx_dir: str, patch_files: list, items: list, max_new_tokens: int, device: str) -> tuple[list, dict]:
    """onnx-generate through onnxruntime on an export-onnx artifact: the results and the JSON head."""
    from ..chat import prompt_ids
    from ..onnx.session import create_session, generate_greedy

    providers = resolve_providers(device)
    session = create_session(onnx_dir, patch_files, providers=providers)
    if providers[0] != "CPUExecutionProvider" and "CUDAExecutionProvider" not in session.get_providers():
        raise InputError(f"--device {device}: onnxruntime could not start its CUDA execution provider here "
                         "(no GPU, or CUDA libraries missing); use --device cpu")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(onnx_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"--onnx {onnx_dir}: no usable tokenizer files ({first_line(err)}); "
                         "re-export from a model directory that has them") from None
    results = []
    for prompt, target, as_chat in items:
        new = generate_greedy(session, prompt_ids(tok, prompt, as_chat), max_new_tokens, tok.eos_token_id)
        results.append({"prompt": prompt, "continuation": tok.decode(new), "new_token_ids": new, "target": target})
    return results, {"patches": patch_files, "providers": session.get_providers()}


@main.command("map-onnx")
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False),
              help="The Hugging Face checkpoint directory the artifact was built from (safetensors).")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(file_okay=False),
              help="ONNX artifact directory from any exporter (onnxruntime-genai builder, torch.onnx, optimum, ...).")
@click.option("--model-file", default=None, help="The graph file, where the directory holds several *.onnx.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def map_onnx_command(base_dir: str, onnx_dir: str, model_file: str | None, as_json: bool) -> None:
    """Find where each weight of --base lives in the ONNX artifact, by exact bit equality; write names.json there.

    A weight may be stored as is, transposed, as a slice of a fused initializer (q/k/v, gate/up),
    cast to the artifact's dtype, inline or in external data. `apply --base ONNX_DIR` then patches
    it in place. Weights that cannot be patched exactly (int4-quantized, folded into another tensor,
    deduplicated with another weight) are listed with the reason, and patches naming them are refused.
    """
    from ..onnx.mapping import map_onnx, write_names
    from ..onnx.names import NAMES_FILE, NAMES_FORMAT_MAPPED

    existing = Path(onnx_dir) / NAMES_FILE
    if existing.is_file():
        try:
            fmt = json.loads(existing.read_text()).get("format", 1)
        except (ValueError, UnicodeDecodeError, AttributeError):
            fmt = None
        if fmt != NAMES_FORMAT_MAPPED:
            raise InputError(f"--onnx {onnx_dir}: already has a {NAMES_FILE} that map-onnx did not write "
                             "(export-onnx's, or not valid); it needs no mapping")
    names, report = map_onnx(base_dir, onnx_dir, model_file=model_file)
    report["names"] = str(write_names(onnx_dir, names))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    p = report["places"]
    click.echo(f"wrote {report['names']}: {report['mapped']} of {report['keys']} state-dict keys found in "
               f"{report['model_file']} ({report['exporter']}): {p['whole']} as is, {p['transposed']} transposed, "
               f"{p['slice']} slices of fused initializers, {p['cast']} cast; {report['seconds']:.2f} s")
    if report["tied"]:
        click.echo(f"tied: {', '.join(report['tied'])}")
    for key, why in report["reasons"].items():
        click.echo(f"cannot be patched: {key}: {why}")
