"""Sign a patch file with an EC private key, and verify it against trusted public keys, offline.

`sign_patch(patch, key)` writes `PATCH.sig`; `verify_patch(patch, keys)` checks it and raises
`SignatureError` (an InputError) when the signature is missing, malformed, or made by no trusted key.
Keys are PEM files as `openssl ecparam -name prime256v1 -genkey` and `openssl ec -pubout` make them.

The signature is the OpenSSF `model-signing` format (a Sigstore bundle holding a DSSE-signed in-toto
statement with the file's sha256), made and checked by that library with a local key: no network,
no transparency log. So `model_signing verify key --public_key PUBLIC.pem PATCH --signature PATCH.sig`
checks our signatures too. The keys are read here first with `cryptography`, because model-signing's
errors for a key of the wrong kind are bare AttributeErrors.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm

from .core.atomic import atomic_write
from .errors import InputError, first_line

SIG_SUFFIX = ".sig"


class SignatureError(InputError):
    """The patch's signature is missing, malformed, or not made by any trusted key."""


def signature_path(patch_path: str | os.PathLike) -> Path:
    """Where a patch's signature lives: beside it, with `.sig` appended."""
    path = Path(patch_path)
    return path.with_name(path.name + SIG_SUFFIX)


def _read_key(path: Path, private: bool):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    what = "private" if private else "public"
    if not path.is_file():
        raise InputError(f"--key {path}: no such file")
    data = path.read_bytes()
    try:
        if private:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except TypeError:  # a password-protected private key
        raise InputError(f"--key {path}: the private key is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        hint = "" if private or b"PRIVATE KEY" not in data else " (this is a private key; give its public half: " \
                                                                  "openssl ec -in KEY -pubout)"
        raise InputError(f"--key {path}: not a PEM EC {what} key{hint} ({first_line(err)})") from None
    kind = ec.EllipticCurvePrivateKey if private else ec.EllipticCurvePublicKey
    if not isinstance(key, kind):
        raise InputError(f"--key {path}: a {type(key).__name__.lstrip('_')}, not an EC {what} key; make one with "
                         f"`openssl ecparam -name prime256v1 -genkey -noout -out KEY.pem`")
    return key


def _reason(err: BaseException) -> str:
    """model-signing's refusal in a few words (its hash mismatches print raw digest bytes)."""
    text = first_line(err)
    if "Hash mismatch" in text or "Signature mismatch" in text:
        return "the file is not the one that was signed (changed since, or another file's signature)"
    if "Key mismatch" in text:
        return "signed by another key"
    return text[:160]


def check_public_keys(keys: list[str | os.PathLike]) -> list[Path]:
    """The key paths, each checked to be a PEM EC public key (InputError naming the first bad one)."""
    paths = [Path(k) for k in keys]
    for p in paths:
        _read_key(p, private=False)
    return paths


def sign_patch(patch_path: str | os.PathLike, key_path: str | os.PathLike,
               out: str | os.PathLike | None = None) -> Path:
    """Sign the file at `patch_path` with the EC private key at `key_path`; write the signature
    atomically to `out` (default: PATCH.sig). Returns the signature's path."""
    import model_signing

    patch, key = Path(patch_path), Path(key_path)
    if not patch.is_file():
        raise InputError(f"{patch}: no such patch file")
    _read_key(key, private=True)
    with tempfile.TemporaryDirectory(prefix="roselora-sign-") as tmp:
        signature = Path(tmp) / "patch.sig"
        model_signing.signing.Config().use_elliptic_key_signer(private_key=key).sign(patch, signature)
        return atomic_write(Path(out) if out is not None else signature_path(patch), signature.read_bytes())


def verify_patch(patch_path: str | os.PathLike, keys: list[str | os.PathLike],
                 signature: str | os.PathLike | None = None) -> Path:
    """Check the patch's signature (default: PATCH.sig) against each key in turn; the key that verifies it.
    SignatureError if the signature is missing or unreadable, or no key verifies it."""
    import model_signing

    patch = Path(patch_path)
    if not patch.is_file():
        raise InputError(f"{patch}: no such patch file")
    if not keys:
        raise InputError("no trusted key given")
    key_paths = check_public_keys(keys)
    sig = Path(signature) if signature is not None else signature_path(patch)
    if not sig.is_file():
        raise SignatureError(f"{patch.name}: no signature ({sig.name} is missing); sign it with "
                             f"`roselora-export sign --key PRIVATE.pem {patch.name}`")
    reasons = []
    for key in key_paths:
        try:
            model_signing.verifying.Config().use_elliptic_key_verifier(public_key=key).verify(patch, sig)
            return key
        except Exception as err:  # model-signing raises ValueError, JSON and protobuf errors alike
            reasons.append(f"{key.name}: {_reason(err)}")
    raise SignatureError(f"{patch.name}: the signature does not verify with any trusted key "
                         f"({'; '.join(reasons)})")
