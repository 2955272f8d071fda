"""Packages whose public names are imported from their modules on first use (so `merge` never imports torch)."""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict, *, submodules: bool = False
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A package's `__getattr__` and `__dir__`: `exports` maps a name to its relative module (".io"); the
    value is cached in `namespace` (the package's globals()). With `submodules`, any other name is tried
    as a submodule, as an eager package would offer it."""
    def __getattr__(name: str):
        if name in exports:
            value = namespace[name] = getattr(importlib.import_module(exports[name], package), name)
            return value
        if submodules:
            with contextlib.suppress(ModuleNotFoundError):
                return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
