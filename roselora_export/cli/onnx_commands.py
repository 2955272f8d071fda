"""CLI commands for this area; each command is added to `main` with @main.command()."""
from __future__ import annotations

from . import main  # noqa: F401
