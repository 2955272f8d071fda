"""CLI for serving and signing: `serve` (an OpenAI-compatible server taking live patches), `sign`, `verify`."""
from __future__ import annotations

import ipaddress

import click

from . import main
from .options import device_option, dtype_option, model_option


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@main.command("serve")
@model_option("Local Hugging Face model directory to serve (the base the patches are built on).")
@click.option("--host", default="127.0.0.1", help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, type=click.IntRange(0, 65535), help="Port to listen on (0: any free port).")
@device_option()
@dtype_option(help="Dtype to load the model in; patches apply only in their own dtype.  "
                   "[default: the first --patch's dtype, else fp32]")
@click.option("--admin-token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the bearer token the patch endpoints require.  [default: patch endpoints off]")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="PEM EC public key; with any given, every patch must carry a signature by one of them. Repeatable.")
@click.option("--patch", "patches", multiple=True, type=click.Path(dir_okay=False),
              help="Patch to apply at start-up (its signature beside it, PATCH.sig). Repeatable, applied in order.")
@click.option("--served-model-name", default=None, help="Model name in answers and /v1/models.  [default: the directory's name]")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="torch CPU threads.  [default: torch's]")
@click.option("--concurrency", type=click.IntRange(1, 1024), default=None,
              help="Answers generated at once; the others queue. A patch write waits for the answers in flight, "
                   "so 1 keeps that wait to one answer.  [default: no bound (the thread pool's)]")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]),
              help="uvicorn's log level (debug also logs each request).")
def serve_command(model_dir, host, port, device, dtype, admin_token_file, trusted_keys, patches, served_model_name,
                  threads, concurrency, log_level) -> None:
    """Serve MODEL over HTTP (OpenAI completions and chat), taking patches live, without a restart.

    POST /v1/patches (multipart parts `patch` and `signature`) applies a patch atomically;
    DELETE /v1/patches/ID reverts it bit for bit; GET /v1/patches lists the stack. Those three need
    `Authorization: Bearer TOKEN` (the token in --admin-token-file); with --trusted-key they also need a
    valid signature (`roselora-export sign`). Every answer comes from one weight state, named in its
    `system_fingerprint`. Nothing is ever written to MODEL.
    """
    from ..serve.server import bind, build_app, run, url_of
    from .options import resolve_device, resolve_model

    sock = bind(host, port)  # before loading: a busy port fails at once
    model_dir = str(model_dir) if model_dir is not None else str(resolve_model(None))
    dev = resolve_device(device)
    if threads:
        import torch

        torch.set_num_threads(threads)
    served = build_app(model_dir, device=dev, dtype=dtype, admin_token_file=admin_token_file,
                       trusted_keys=list(trusted_keys), patches=list(patches), name=served_model_name,
                       concurrency=concurrency)
    for w in served.warnings:
        click.echo(w, err=True)
    if admin_token_file and not _loopback(host):
        click.echo(f"warning: listening on {host} over plain HTTP: the admin token travels in clear; "
                   f"put the server behind a TLS proxy", err=True)
    engine, url = served.engine, url_of(sock)
    admin = "on" if admin_token_file else "off"
    applied = ", ".join(f"{p['id']}={p['filename']}" for p in served.store.list()) or "none"

    def started() -> None:
        click.echo(f"serving {engine.name} on {url} ({engine.device}, {str(engine.dtype).removeprefix('torch.')}); "
                   f"patch admin {admin}, trusted keys {len(trusted_keys)}, patches applied: {applied}")

    run(served.app, sock, log_level=log_level, started=started)


@main.command("sign")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="PEM EC private key (openssl ecparam -name prime256v1 -genkey -noout -out KEY.pem).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Signature file to write.  [default: PATCH.sig]")
@click.argument("patch_path", type=click.Path(dir_okay=False))
def sign_command(key_path, out_path, patch_path) -> None:
    """Sign PATCH with an EC private key: writes PATCH.sig (the OpenSSF model-signing format)."""
    from ..patch.io import load_patch
    from ..signing import sign_patch

    load_patch(patch_path)  # sign only what is a valid patch
    click.echo(f"wrote {sign_patch(patch_path, key_path, out_path)}")


@main.command("verify")
@click.option("--key", "keys", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="PEM EC public key (openssl ec -in KEY.pem -pubout); repeat to accept any of several.")
@click.option("--signature", "sig_path", type=click.Path(dir_okay=False), default=None,
              help="Signature file.  [default: PATCH.sig]")
@click.argument("patch_path", type=click.Path(dir_okay=False))
def verify_command(keys, sig_path, patch_path) -> None:
    """Check PATCH's signature against trusted public keys (exit 2 with `error:` if it does not verify)."""
    from pathlib import Path

    from ..patch.io import check_patch_bytes
    from ..signing import verify_patch

    check_patch_bytes(Path(patch_path))  # a .jsonl is "not a patch file" rather than "no signature"
    key = verify_patch(patch_path, list(keys), sig_path)
    click.echo(f"{patch_path}: signature verified with {key}")
