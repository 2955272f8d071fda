"""The `roselora-export` command: a click group whose verbs live in one module per area.

Each area module defines its commands and is registered here; the modules stay thin
(parse, call the library, print). InputError becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys

import click

from ..errors import InputError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="roselora-export")
def main() -> None:
    """Train RoseLoRA edits, ship them as tiny sparse patches, apply and revert them exactly."""


def _register() -> None:
    # Imported for their side effect of adding commands to `main`.
    from . import edit_commands, patch_commands, onnx_commands, runtime_commands, eval_commands  # noqa: F401


_register()
