"""The shared --device / --dtype / --model options (cli/options.py, devices.py), and the CLI's warnings policy."""
from __future__ import annotations

import warnings

import click
import pytest
import torch
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.cli.options import (
    device_option, dtype_option, model_option, resolve_device, resolve_dtype, resolve_model,
)
from roselora_export.devices import ort_providers, torch_device
from roselora_export.errors import InputError, InputWarning

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answers")


@click.command()
@model_option()
@device_option()
@dtype_option()
def _probe(model_dir, device, dtype):
    """A command built from the shared options, as the lead's commands will be."""
    click.echo(f"{resolve_model(model_dir)} {resolve_device(device)} {resolve_dtype(dtype)}")


def test_the_shared_options_parse_and_resolve_together(tiny_model_dirs):
    result = CliRunner().invoke(_probe, ["--model", str(tiny_model_dirs["llama"]), "--device", "cpu", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{tiny_model_dirs['llama']} cpu torch.bfloat16"


def test_dtype_option_defaults_to_none_and_refuses_other_names(tiny_model_dirs):
    ok = CliRunner().invoke(_probe, ["--model", str(tiny_model_dirs["llama"]), "--device", "cpu"])
    assert ok.stdout.strip().endswith(" None")
    bad = CliRunner().invoke(_probe, ["--dtype", "int8"])
    assert bad.exit_code == 2


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("BF16", torch.bfloat16), ("fp16", torch.float16)])
def test_resolve_dtype_names(name, dtype):
    assert resolve_dtype(name) is dtype


def test_resolve_model_without_a_directory_is_the_embedded_model(monkeypatch, tmp_path):
    import roselora_export.models as models

    monkeypatch.setattr(models, "demo_model_dir", lambda out=None: tmp_path / "demo")
    assert resolve_model(None) == tmp_path / "demo"


def test_resolve_model_checks_a_given_directory(tmp_path):
    with pytest.raises(InputError, match="not a model directory"):
        resolve_model(tmp_path)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:0", "auto:1", ""])
def test_a_bad_device_name_is_an_input_error(name):
    with pytest.raises(InputError, match="not a device name"):
        torch_device(name)


def test_cpu_is_taken_as_given_without_a_note():
    assert torch_device("cpu") == (torch.device("cpu"), None)


@needs_no_cuda
def test_auto_on_a_machine_without_cuda_picks_the_cpu_and_says_so(capsys):
    assert resolve_device("auto") == torch.device("cpu")
    err = capsys.readouterr().err
    assert err == "device: cpu (auto: torch sees no CUDA device)\n"


@needs_no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_on_a_machine_without_it_is_an_input_error(name):
    with pytest.raises(InputError, match="no CUDA device"):
        torch_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_picks_cuda_when_torch_sees_it_and_names_the_gpu():
    device, note = torch_device("auto")
    assert device == torch.device("cuda:0") and note.startswith("device: cuda:0 (auto: ")
    with pytest.raises(InputError, match="only"):
        torch_device(f"cuda:{torch.cuda.device_count()}")


def test_onnx_cpu_is_the_cpu_provider_and_auto_says_what_it_picked():
    assert ort_providers("cpu") == (["CPUExecutionProvider"], None)
    providers, note = ort_providers("auto")
    assert providers[-1] == "CPUExecutionProvider" and note.startswith("device: ") and "(auto" in note


def test_the_cli_shows_an_input_warning_as_one_line_and_hides_future_warnings(tmp_path, monkeypatch):
    import roselora_export.patch.inspect as ins

    real = ins.check_patch_file

    def noisy(path):
        warnings.warn("a library deprecation", FutureWarning)
        warnings.warn("this input looks mistyped", InputWarning)
        return real(path)

    monkeypatch.setattr(ins, "check_patch_file", noisy)
    (tmp_path / "x.bin").write_bytes(b"\0" * 16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, ["inspect", str(tmp_path / "x.bin")])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == "warning: this input looks mistyped"
    assert not [w for w in seen if issubclass(w.category, FutureWarning)]
