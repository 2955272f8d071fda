"""CLI for the live runtime: `roselora-export try` applies a patch to a loaded model and takes it back."""
from __future__ import annotations

import json

import click

from . import main


@main.command("try")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Local Hugging Face model directory (the patch's base).")
@click.option("--patch", "patch_path", required=True, type=click.Path(dir_okay=False), help="Patch file to apply live.")
@click.option("--prompt", required=True, help="Prompt to answer greedily before, with and after the patch.")
@click.option("--device", default="cpu", help="Where to load the model: cpu, cuda or cuda:N.")
@click.option("--max-new-tokens", default=20, type=click.IntRange(1, 4096), help="Tokens to generate per answer.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Dtype to load the model in  [default: the patch's dtype]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def try_cmd(model_dir, patch_path, prompt, device, max_new_tokens, dtype, as_json):
    """Answer PROMPT with the base model, with the patch applied in place, and after reverting it.

    Prints the three greedy answers, the apply and revert times, and whether the reverted weights
    are bit-identical to the base (sha256 of the whole state dict). Exit code 1 if they are not.
    """
    from ..runtime.tryout import try_patch

    result = try_patch(model_dir, patch_path, prompt, device=device, max_new_tokens=max_new_tokens, dtype=dtype)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(f"model:    {result.model} ({result.device}, {result.dtype})")
        click.echo(f"patch:    {result.patch} ({result.tensors} tensors, {result.nnz} weights)")
        click.echo(f"prompt:   {result.prompt}")
        click.echo(f"base:     {result.base_answer}")
        click.echo(f"patched:  {result.patched_answer}")
        click.echo(f"reverted: {result.reverted_answer}")
        click.echo(f"apply:    {result.apply_ms:.2f} ms   revert: {result.revert_ms:.2f} ms   "
                   f"(patch file read: {result.patch_load_ms:.2f} ms)")
        verdict = "yes" if result.bit_identical else "NO"
        click.echo(f"reverted weights bit-identical to base: {verdict} (sha256 {result.reverted_sha256[:16]})")
    if not result.bit_identical:
        raise SystemExit(1)
