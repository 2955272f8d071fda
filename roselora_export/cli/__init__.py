"""The `roselora-export` command: a click group whose verbs live in one module per area.

Each area module defines its commands with `@main.command()`; the modules stay thin (parse, call
the library, print). They are imported on demand: running one command imports only its module, so
`merge` starts copying shards before torch is imported, and `--help` of a command stays light.
InputError becomes one line on stderr and exit code 2; an InputWarning one `warning:` line. Other
libraries' FutureWarnings (transformers, peft deprecations) are not shown: they are not the user's to act on.
"""
from __future__ import annotations

import importlib
import sys
import warnings

import click

from ..errors import InputError, InputWarning

# Every area module, and which one defines each command. A command missing from the map still works:
# an unknown name imports every module before click looks it up (only slower).
_MODULES = ("edit_commands", "patch_commands", "onnx_commands", "runtime_commands", "eval_commands", "serve_commands",
            "ledger_commands")
_COMMAND_MODULES = {
    "edit": "edit_commands", "train": "edit_commands", "demo-model": "edit_commands",
    "merge": "patch_commands", "diff": "patch_commands", "apply": "patch_commands", "inspect": "patch_commands",
    "export-onnx": "onnx_commands", "onnx-generate": "onnx_commands", "map-onnx": "onnx_commands",
    "try": "runtime_commands",
    "evaluate": "eval_commands", "benchmark-edits": "eval_commands",
    "serve": "serve_commands", "sign": "serve_commands", "verify": "serve_commands",
    "log": "ledger_commands", "combine": "ledger_commands",
}


def _load(*modules: str) -> None:
    for m in modules:
        importlib.import_module(f"{__name__}.{m}")  # registers its commands on `main`


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, InputWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def _user_facing_warnings() -> None:
    """InputWarnings as one line each (every one, not once per call site); FutureWarnings silenced."""
    warnings.showwarning = _show_warning
    warnings.simplefilter("always", InputWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


class _Group(click.Group):
    def get_command(self, ctx: click.Context, cmd_name: str):
        if cmd_name not in self.commands:
            _load(_COMMAND_MODULES[cmd_name]) if cmd_name in _COMMAND_MODULES else _load(*_MODULES)
        if cmd_name not in self.commands:
            _load(*_MODULES)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        _load(*_MODULES)
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context):
        _user_facing_warnings()
        try:
            return super().invoke(ctx)
        except InputError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="roselora-export")
def main() -> None:
    """Train RoseLoRA edits, ship them as tiny sparse patches, apply and revert them exactly."""
