"""Build the server from its options and run it under uvicorn, in the foreground or on a thread.

`build_app(...)` loads the model, checks the admin token and trusted keys, applies the start-up
patches (signed like uploads), and returns the FastAPI app with its engine and store; `run(...)`
serves it on a socket bound here, so `--port 0` works and the real address can be printed;
`ServerThread` runs it in the background (tests and benchmarks).
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


@dataclass
class Served:
    app: object  # FastAPI
    engine: object  # serve.engine.Engine
    store: object  # serve.patches.PatchStore
    warnings: list[str]


def read_admin_token(path: str | os.PathLike) -> str:
    """The admin token: the file's first line, stripped; InputError if the file is missing or the token short."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--admin-token-file {p}: no such file")
    lines = p.read_text(errors="replace").strip().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise InputError(f"--admin-token-file {p}: the token must be at least 16 characters "
                         f"(make one with `openssl rand -hex 32 > {p.name}`)")
    return token


def build_app(model_dir: str | os.PathLike, *, device="cpu", dtype: str | None = None,
              admin_token_file: str | os.PathLike | None = None, trusted_keys: list | tuple = (),
              patches: list | tuple = (), name: str | None = None, concurrency: int | None = None) -> Served:
    """Everything `serve` needs: options checked (and start-up patches' signatures) before the model loads.

    `device` is a torch.device or a name (auto, cpu, cuda, cuda:N; see roselora_export.devices);
    `concurrency` bounds the answers generated at once (serve.engine)."""
    from ..models import check_model_dir, load_model, load_tokenizer
    from ..signing import check_public_keys, verify_patch
    from .app import create_app
    from .engine import Engine
    from .patches import PatchStore

    if concurrency is not None and concurrency < 1:
        raise InputError(f"--concurrency must be at least 1 (got {concurrency})")
    path = check_model_dir(model_dir)
    token = read_admin_token(admin_token_file) if admin_token_file is not None else None
    keys = check_public_keys(list(trusted_keys))
    for p in patches:
        if not Path(p).is_file():
            raise InputError(f"--patch {p}: no such file")
        if keys:  # refused before the model loads (the store checks again as it applies)
            verify_patch(p, keys)
    warnings = []
    if token is not None and not keys:
        warnings.append("warning: no --trusted-key: any holder of the admin token can change the model with an "
                        "unsigned patch")
    from ..devices import torch_device

    dev = device if not isinstance(device, str) else torch_device(device)[0]
    torch_dtype = _dtype(dtype, patches)
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=torch_dtype).to(dev)
    engine = Engine(model, tokenizer, name or path.name, concurrency)
    store = PatchStore(engine.runtime, keys)
    for p in patches:
        store.add_file(p)  # a Refused is an InputError: the server does not start
    return Served(create_app(engine, store, token), engine, store, warnings)


def _dtype(name: str | None, patches):
    """The dtype given, else the first start-up patch's (a patch applies only in its own dtype), else fp32."""
    from ..devices import torch_dtype
    from ..patch.io import load_patch
    from ..runtime.tryout import patch_dtype

    if name is None and patches:
        return patch_dtype(load_patch(patches[0]), None)
    return torch_dtype(name or "fp32")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); InputError if it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app, log_level: str):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug",
                                         timeout_graceful_shutdown=5))


def run(app, sock: socket.socket, *, log_level: str = "info", started: Callable[[], None] | None = None) -> None:
    """Serve `app` on `sock` until interrupted (Ctrl-C or SIGTERM stop it gracefully)."""
    server = _server(app, log_level)
    if started is not None:
        _call_when_started(server, started)
    server.run(sockets=[sock])


def _call_when_started(server, fn: Callable[[], None]) -> None:
    startup = server.startup

    async def startup_then_tell(*args, **kwargs):
        await startup(*args, **kwargs)
        fn()

    server.startup = startup_then_tell


class ServerThread:
    """`with ServerThread(app) as url:` serves `app` on 127.0.0.1 (a free port) on a daemon thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = _server(app, log_level)
        self._ready = threading.Event()
        _call_when_started(self.server, self._ready.set)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       name="roselora-serve", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the server did not start within 30 s")
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
