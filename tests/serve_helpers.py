"""Helpers for the signing and serving tests: EC key files, and patches on the tiny Llama that change its answers."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.torch import load_file

from roselora_export.patch import build_patch_from_state_dicts, config_fingerprint, save_patch


def write_keypair(directory: Path, name: str, *, openssl_style: bool = True) -> tuple[Path, Path]:
    """(private, public) PEM files of a new P-256 key. openssl_style: the private key as
    `openssl ecparam -name prime256v1 -genkey` writes it (an EC PARAMETERS block, then BEGIN EC PRIVATE KEY)."""
    key = ec.generate_private_key(ec.SECP256R1())
    if openssl_style:
        params = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
        private = params + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption())
    else:
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    priv_path, pub_path = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    priv_path.write_bytes(private)
    pub_path.write_bytes(public)
    return priv_path, pub_path


def scrambled(base: dict[str, torch.Tensor], seed: int, frac: float, keys=None) -> dict[str, torch.Tensor]:
    """A copy of `base` with a fraction of each matrix (of `keys`, default all) set to large random values."""
    target = {k: v.clone() for k, v in base.items()}
    g = torch.Generator().manual_seed(seed)
    for k, t in target.items():
        if t.dim() == 2 and (keys is None or k in keys):
            mask = torch.rand(t.shape, generator=g) < frac
            t[mask] = torch.randn(int(mask.sum()), generator=g) * 5
    return target


def model_patch(model_dir: Path, out: Path, *, seed: int = 0, frac: float = 0.3, on_top_of: dict | None = None,
                keys=None) -> tuple[Path, dict[str, torch.Tensor]]:
    """A patch of the saved model (or of `on_top_of`, a state dict built from it) that changes its answers;
    the patch file and the patched state dict."""
    base = on_top_of if on_top_of is not None else load_file(str(model_dir / "model.safetensors"))
    target = scrambled(base, seed, frac, keys)
    config = json.loads((model_dir / "config.json").read_text())
    patch = build_patch_from_state_dicts(base, target, provenance={"base_config_sha256": config_fingerprint(config),
                                                                   "base_model": model_dir.name})
    return save_patch(patch, out), target
