"""`sign` / `verify` (OpenSSF model-signing with local EC keys, offline) and `apply --trusted-key`."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.errors import InputError
from roselora_export.signing import SignatureError, sign_patch, signature_path, verify_patch
from serve_helpers import model_patch, write_keypair
from tiny_models import save_model_dir, tiny_llama


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("signing")
    model_dir = save_model_dir(tiny_llama(), root / "llama")
    patch, _ = model_patch(model_dir, root / "edit.patch.safetensors")
    priv, pub = write_keypair(root, "trusted")
    other_priv, other_pub = write_keypair(root, "stranger", openssl_style=False)
    return {"root": root, "model": model_dir, "patch": patch, "priv": priv, "pub": pub,
            "other_priv": other_priv, "other_pub": other_pub}


@pytest.fixture
def signed(setup, tmp_path):
    patch = tmp_path / "edit.patch.safetensors"
    shutil.copy(setup["patch"], patch)
    sign_patch(patch, setup["priv"])
    return patch


def test_sign_writes_patch_sig_and_verify_accepts_it(setup, tmp_path):
    patch = tmp_path / "edit.patch.safetensors"
    shutil.copy(setup["patch"], patch)
    result = cli("sign", "--key", setup["priv"], patch)
    assert result.exit_code == 0, result.output
    assert signature_path(patch).is_file() and f"wrote {signature_path(patch)}" in result.output
    result = cli("verify", "--key", setup["pub"], patch)
    assert result.exit_code == 0, result.output
    assert "signature verified with" in result.output


def test_verify_accepts_a_signature_when_any_of_several_keys_made_it(setup, signed):
    assert verify_patch(signed, [setup["other_pub"], setup["pub"]]) == setup["pub"]


def test_verify_refuses_a_signature_by_another_key(setup, signed):
    result = cli("verify", "--key", setup["other_pub"], signed)
    assert result.exit_code == 2 and result.output.startswith("error:") and "does not verify" in result.output


def test_verify_refuses_a_patch_changed_after_signing(setup, signed):
    data = bytearray(signed.read_bytes())
    data[-1] ^= 0x01
    signed.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_patch(signed, [setup["pub"]])


def test_verify_refuses_a_missing_or_garbage_signature(setup, signed, tmp_path):
    with pytest.raises(SignatureError, match="no signature"):
        verify_patch(setup["patch"], [setup["pub"]], tmp_path / "absent.sig")
    signature_path(signed).write_text("not a signature")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_patch(signed, [setup["pub"]])


def test_keys_of_the_wrong_kind_are_one_line_errors(setup, signed, tmp_path):
    result = cli("verify", "--key", setup["priv"], signed)  # the private half where the public one belongs
    assert result.exit_code == 2 and "pubout" in result.output
    result = cli("sign", "--key", setup["pub"], signed)
    assert result.exit_code == 2 and "not a PEM EC private key" in result.output
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(InputError, match="not a PEM EC public key"):
        verify_patch(signed, [tmp_path / "junk.pem"])


def test_sign_refuses_a_file_that_is_not_a_patch(setup, tmp_path):
    junk = tmp_path / "junk.patch.safetensors"
    junk.write_bytes(b"\0" * 64)
    result = cli("sign", "--key", setup["priv"], junk)
    assert result.exit_code == 2 and "error:" in result.output
    assert not signature_path(junk).exists()


def test_apply_with_trusted_key_refuses_an_unsigned_patch_and_writes_nothing(setup, tmp_path):
    patch = tmp_path / "edit.patch.safetensors"
    shutil.copy(setup["patch"], patch)
    before = tree_hash(setup["model"])
    result = cli("apply", "--base", setup["model"], "--patch", patch, "--out", tmp_path / "out",
                 "--trusted-key", setup["pub"])
    assert result.exit_code == 2 and "no signature" in result.output
    assert not (tmp_path / "out").exists() and tree_hash(setup["model"]) == before


def test_apply_with_trusted_key_applies_a_signed_patch(setup, signed, tmp_path):
    result = cli("apply", "--base", setup["model"], "--patch", signed, "--out", tmp_path / "out",
                 "--trusted-key", setup["pub"])
    assert result.exit_code == 0, result.output
    result = cli("apply", "--base", setup["model"], "--patch", signed, "--out", tmp_path / "out2",
                 "--trusted-key", setup["other_pub"])
    assert result.exit_code == 2 and "does not verify" in result.output and not (tmp_path / "out2").exists()


def test_apply_with_trusted_key_checks_patches_for_onnx_artifacts_too(setup, signed, tmp_path):
    from roselora_export.onnx.export import export_onnx

    art = tmp_path / "onnx"
    export_onnx(setup["model"], art, check_runtime=False)
    before = tree_hash(art)
    shutil.copy(signed, tmp_path / "unsigned.patch.safetensors")
    result = cli("apply", "--base", art, "--patch", tmp_path / "unsigned.patch.safetensors", "--in-place",
                 "--trusted-key", setup["pub"])
    assert result.exit_code == 2 and "no signature" in result.output and tree_hash(art) == before
    result = cli("apply", "--base", art, "--patch", signed, "--in-place", "--trusted-key", setup["pub"])
    assert result.exit_code == 0, result.output
    assert tree_hash(art) != before
