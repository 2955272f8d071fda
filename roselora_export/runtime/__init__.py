"""runtime: apply and revert patches in place on a live torch model (any device), exactly and thread-safely.

`PatchRuntime(model)` is the one entry point; see `runtime.live` for the thread-safety contract and
the stacking rule. `try_patch` (runtime.tryout) backs the `roselora-export try` command.
"""
from .live import PatchHandle, PatchRuntime
from .lock import ServingLock

__all__ = ["PatchHandle", "PatchRuntime", "ServingLock"]
