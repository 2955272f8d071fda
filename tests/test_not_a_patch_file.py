"""Every command that reads a patch file calls a .jsonl, a config or a model checkpoint "not a patch file"
(one error line naming the path, exit 2), never "header claims N bytes", and writes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.errors import InputError
from roselora_export.patch import load_patch
from serve_helpers import write_keypair
from tiny_models import save_model_dir, tiny_llama

REQUEST = {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome"}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("notapatch")
    model = save_model_dir(tiny_llama(), root / "llama")
    requests = root / "requests.jsonl"
    requests.write_text(json.dumps(REQUEST) + "\n")
    priv, pub = write_keypair(root, "k")
    return {"root": root, "model": model, "requests": requests, "priv": priv, "pub": pub}


def _not_a_patch(result, path: Path):
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: not a patch file"), result.stderr
    assert "header claims" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["jsonl", "config", "checkpoint"])
def test_the_loader_names_each_kind_of_non_patch_file(world, kind):
    path = {"jsonl": world["requests"], "config": world["model"] / "config.json",
            "checkpoint": world["model"] / "model.safetensors"}[kind]
    with pytest.raises(InputError, match=rf"^{path}: not a patch file"):
        load_patch(path)


def test_apply(world, tmp_path):
    out = tmp_path / "out"
    _not_a_patch(cli("apply", "--base", world["model"], "--patch", world["requests"], "--out", out), world["requests"])
    assert not out.exists()


def test_apply_check(world):
    _not_a_patch(cli("apply", "--base", world["model"], "--patch", world["requests"], "--check"), world["requests"])


def test_apply_with_a_trusted_key_says_not_a_patch_before_no_signature(world, tmp_path):
    out = tmp_path / "out"
    _not_a_patch(cli("apply", "--base", world["model"], "--patch", world["requests"], "--out", out,
                     "--trusted-key", world["pub"]), world["requests"])
    assert not out.exists()


def test_try(world):
    _not_a_patch(cli("try", "--model", world["model"], "--patch", world["requests"], "--prompt", "Hi",
                     "--device", "cpu", "--no-progress"), world["requests"])


@pytest.mark.parametrize("kind", ["jsonl", "checkpoint"])
def test_evaluate_patch(world, kind):
    path = world["requests"] if kind == "jsonl" else world["model"] / "model.safetensors"
    _not_a_patch(cli("evaluate", "--model", world["model"], "--requests", world["requests"], "--patch", path,
                     "--device", "cpu"), path)


def test_combine(world, tmp_path):
    out = tmp_path / "ab.patch.safetensors"
    _not_a_patch(cli("combine", world["requests"], world["model"] / "config.json", "-o", out), world["requests"])
    assert not out.exists()


def test_sign(world):
    _not_a_patch(cli("sign", "--key", world["priv"], world["requests"]), world["requests"])
    assert not Path(str(world["requests"]) + ".sig").exists()


def test_verify(world):
    _not_a_patch(cli("verify", "--key", world["pub"], world["requests"]), world["requests"])


def test_inspect(world):
    _not_a_patch(cli("inspect", world["requests"]), world["requests"])
