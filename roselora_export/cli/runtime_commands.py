"""CLI for the live runtime: `roselora-export try` applies a patch to a loaded model and takes it back."""
from __future__ import annotations

import json

import click

from . import main
from .options import (
    chat_option, device_option, dtype_option, max_new_tokens_option, model_option, prompts_option, resolve_device, resolve_dtype,
    resolve_model, resolve_prompts,
)


@main.command("try")
@model_option("Local Hugging Face model directory (the patch's base).")
@click.option("--patch", "patch_path", required=True, type=click.Path(dir_okay=False), help="Patch file to apply live.")
@prompts_option("Prompt to answer greedily before, with and after the patch")
@chat_option()
@device_option()
@max_new_tokens_option()
@dtype_option(help="Dtype to load the model in.  [default: the patch's dtype]")
@click.option("--progress/--no-progress", default=True, help="Model-loading progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def try_cmd(model_dir, patch_path, prompts, requests_path, chat, device, max_new_tokens, dtype, progress, as_json):
    """Answer each prompt with the base model, with the patch applied in place, and after reverting it.

    Prints the three greedy answers per prompt, the apply and revert times, and whether the reverted
    weights are bit-identical to the base (sha256 of the whole state dict). Exit code 1 if they are not.
    """
    from ..runtime.tryout import try_patch

    items = resolve_prompts(prompts, requests_path, chat)
    path = resolve_model(model_dir)
    dev = resolve_device(device)
    result = try_patch(path, patch_path, [p for p, _, _ in items], targets=[t for _, t, _ in items], device=dev,
                       max_new_tokens=max_new_tokens, dtype=resolve_dtype(dtype), progress=progress,
                       chat=[c for _, _, c in items])
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(f"model:    {result.model} ({result.device}, {result.dtype})")
        click.echo(f"patch:    {result.patch} ({result.tensors} tensors, {result.nnz} weights)")
        for a in result.answers:
            click.echo(f"prompt:   {a.prompt}" + ("   (chat)" if a.chat else "")
                       + (f"   (target: {a.target})" if a.target is not None else ""))
            click.echo(f"  base:     {a.base}")
            click.echo(f"  patched:  {a.patched}")
            click.echo(f"  reverted: {a.reverted}")
        click.echo(f"apply:    {result.apply_ms:.2f} ms   revert: {result.revert_ms:.2f} ms   "
                   f"(patch file read: {result.patch_load_ms:.2f} ms)")
        verdict = "yes" if result.bit_identical else "NO"
        click.echo(f"reverted weights bit-identical to base: {verdict} (sha256 {result.reverted_sha256[:16]})")
    if not result.bit_identical:
        raise SystemExit(1)
