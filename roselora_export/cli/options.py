"""Options shared by the commands that load a model: --model, --device, --dtype, --max-new-tokens, prompts, --chat.

Each `*_option()` returns a click decorator (`@model_option()` gives `model_dir`); each `resolve_*()` turns
the parsed value into what the library takes (`resolve_model(model_dir)`: the embedded model when --model
is not given), printing at most one line on stderr (what `--device auto` picked). Bad values are
InputErrors: one `error:` line, exit code 2.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from ..devices import DTYPE_NAMES, ort_providers, torch_device, torch_dtype
from ..errors import InputError

MAX_NEW_TOKENS = 20  # the one default for every command that generates answers


def device_option(default: str = "auto", help: str | None = None):
    """`--device auto|cpu|cuda[:N]`, parsed into the string `device` (resolve it with resolve_device)."""
    return click.option("--device", default=default, show_default=True, metavar="auto|cpu|cuda[:N]",
                        help=help or "Where to run: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N.")


def resolve_device(name: str):
    """The torch.device for a --device value; for `auto`, one line on stderr says what was picked."""
    device, note = torch_device(name)
    if note:
        click.echo(note, err=True)
    return device


def resolve_providers(name: str) -> list:
    """The onnxruntime providers for a --device value; for `auto`, one line on stderr says what was picked."""
    providers, note = ort_providers(name)
    if note:
        click.echo(note, err=True)
    return providers


def dtype_option(default: str | None = None, help: str | None = None):
    """`--dtype fp32|bf16|fp16`, parsed into the string `dtype` or None (resolve it with resolve_dtype)."""
    return click.option("--dtype", type=click.Choice(DTYPE_NAMES, case_sensitive=False), default=default,
                        help=help or "Dtype to load the model in.  [default: fp32]")


def resolve_dtype(name: str | None):
    """The torch dtype for a --dtype value; None when not given (the caller's default)."""
    return torch_dtype(name)


def model_option(help: str = "Local Hugging Face model directory.", *, name: str = "model_dir"):
    """`--model DIR`, optional: without it the embedded SmolLM2-135M-Instruct (resolve it with resolve_model)."""
    return click.option("--model", name, type=click.Path(file_okay=False, path_type=Path), default=None,
                        help=f"{help}  [default: the embedded SmolLM2-135M-Instruct]")


def resolve_model(model_dir: str | os.PathLike | None) -> Path:
    """The model directory, checked; the embedded demo model (converted once) when none is given."""
    from ..models import check_model_dir, demo_model_dir

    return check_model_dir(model_dir) if model_dir is not None else demo_model_dir()


def max_new_tokens_option():
    return click.option("--max-new-tokens", default=MAX_NEW_TOKENS, type=click.IntRange(1, 4096),
                        help="Tokens to generate per answer (greedy).")


def prompts_option(what: str = "Prompt to answer"):
    """`--prompt TEXT` (repeatable) and `--requests FILE`: the prompts to run (resolve them with resolve_prompts)."""
    def decorate(f):
        f = click.option("--requests", "requests_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                         help="Edit requests (.jsonl, as for edit): answer each request's prompt, "
                              "shown with its target_new.")(f)
        return click.option("--prompt", "prompts", multiple=True,
                            help=f"{what}; repeat for several.")(f)
    return decorate


def chat_option(what: str = "Ask each prompt"):
    """`--chat`: prompts go through the model's chat template (a request's own "chat" field wins)."""
    return click.option("--chat", is_flag=True,
                        help=f"{what} as a user turn through the model's chat template (instruct models); "
                             "the answer starts the assistant's turn. A request's own \"chat\" field overrides it.")


def resolve_prompts(prompts: tuple[str, ...], requests_path: Path | None,
                    chat: bool = False) -> list[tuple[str, str | None, bool]]:
    """(prompt, target or None, chat) triples: the --prompt values in order, then each request's prompt and
    target_new; chat is --chat, or a request's own "chat" field."""
    items: list[tuple[str, str | None, bool]] = [(p, None, chat) for p in prompts]
    if any(not p.strip() for p in prompts):
        raise InputError("--prompt: an empty prompt")
    if requests_path is not None:
        from ..edit.requests import load_requests

        items += [(r.prompt, r.target_new, r.chat) for r in load_requests(requests_path, chat=chat)]
    if not items:
        raise InputError("give --prompt TEXT (repeatable) or --requests FILE.jsonl")
    return items


def check_chat(tokenizer, requests, chat: bool, requests_path) -> None:
    """InputError before the model loads when some request is a chat one and the tokenizer has no template."""
    from ..chat import require_chat_template

    if any(r.chat for r in requests):
        require_chat_template(tokenizer, "--chat" if chat else f"--requests {requests_path}: field 'chat'")
