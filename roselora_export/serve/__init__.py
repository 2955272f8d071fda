"""serve: an OpenAI-compatible HTTP server on a live model that takes signed patches and reverts them.

`engine` generates (one answer, one weight state), `patches` checks and applies uploads on the
model's PatchRuntime, `app` is the FastAPI routing, `server` builds it all and runs uvicorn.
The `roselora-export serve` command is `server.build_app` plus `server.run`.
"""
from .server import ServerThread, build_app, run

__all__ = ["ServerThread", "build_app", "run"]
