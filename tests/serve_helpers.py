"""Helpers for the signing and serving tests: EC key files, patches on the tiny Llama that change its answers,
and the serving fixtures (keys, token and signed patches; a server on loopback; an admin that checks each
test leaves the model as it found it), imported by each tests/test_serve*.py module."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from openai import OpenAI
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.torch import load_file

from roselora_export.patch import build_patch_from_state_dicts, config_fingerprint, save_patch
from roselora_export.serve import ServerThread, build_app
from roselora_export.serve.client import Admin, AdminError
from roselora_export.signing import sign_patch
from test_runtime_helpers import state_hash
from tiny_models import save_model_dir, tiny_llama


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


# ---- serving ----------------------------------------------------------------------------------
TOKEN = "test-admin-token-0123456789abcdef"
PROMPTS = ["The capital of France is", "Once upon a time", "The Eiffel Tower is located in"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def files(tiny_model_dirs, tmp_path_factory):
    """Keys, the admin token, and signed patches for the tiny Llama: A (changes answers), C (built on top of A,
    overlapping it), one for another base of the same config, one for another config, and a corrupt copy of A."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_model_dirs["llama"]
    priv, pub = write_keypair(root, "trusted")
    stranger, _ = write_keypair(root, "stranger")
    (root / "token").write_text(TOKEN + "\n")
    a, a_state = model_patch(model_dir, root / "a.patch.safetensors")
    q0 = "model.layers.0.self_attn.q_proj.weight"
    c, _ = model_patch(model_dir, root / "c.patch.safetensors", seed=1, frac=0.2, on_top_of=a_state, keys=[q0])
    other_dir = save_model_dir(tiny_llama(seed=1, vocab_size=49152), root / "other")
    other, _ = model_patch(other_dir, root / "other.patch.safetensors", seed=2)
    wider_dir = save_model_dir(tiny_llama(seed=1, vocab_size=49152, intermediate_size=96), root / "wider")
    other_config, _ = model_patch(wider_dir, root / "other_config.patch.safetensors", seed=3)
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 0x01
    corrupt = root / "corrupt.patch.safetensors"
    corrupt.write_bytes(bytes(data))
    for p in (a, c, other, other_config, corrupt):
        sign_patch(p, priv)
    return {"root": root, "model": model_dir, "priv": priv, "pub": pub, "stranger": stranger, "token": root / "token",
            "a": a, "c": c, "other": other, "other_config": other_config, "corrupt": corrupt}


@pytest.fixture(scope="module")
def server(files):
    served = build_app(files["model"], device="cpu", admin_token_file=files["token"], trusted_keys=[files["pub"]])
    with ServerThread(served.app) as url:
        yield {"url": url, "served": served, "base_hash": state_hash(served.engine.model)}


@pytest.fixture
def admin(server):
    yield Admin(server["url"], TOKEN)
    # Every test leaves the model as it found it: no patch applied, every bit the base's.
    assert Admin(server["url"], TOKEN).list() == []
    assert state_hash(server["served"].engine.model) == server["base_hash"]


def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(c: OpenAI, prompt: str) -> tuple[str, str]:
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    return r.choices[0].text, r.system_fingerprint


def answers(c: OpenAI) -> dict[str, str]:
    return {p: complete(c, p)[0] for p in PROMPTS}


def refused(server, status: int, call) -> str:
    """Run an admin call that must be refused with `status`; check the model did not change; the message."""
    with pytest.raises(AdminError) as err:
        call()
    assert err.value.status == status, err.value.message
    assert state_hash(server["served"].engine.model) == server["base_hash"]
    return err.value.message


