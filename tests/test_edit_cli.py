"""`roselora-export edit` and `demo-model`: a working run, and bad input as one line, exit 2, nothing left behind."""
import json

import pytest
from click.testing import CliRunner

from roselora_export.cli import main



GOOD = {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome"}
FAST = ["--steps", "6", "--t-init", "1", "--t-final", "4", "--rank", "2", "--no-progress"]


def _requests(tmp_path, *lines):
    path = tmp_path / "req.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_input_error(result, pattern, out):
    import re

    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(pattern, last), result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dir left


def test_edit_writes_an_adapter_and_prints_a_json_summary(tiny_model_dirs, tmp_path):
    out = tmp_path / "adapter"
    result = _run(["edit", "--model", tiny_model_dirs["llama"], "--requests", _requests(tmp_path, GOOD),
                   "--out", out, "--json", *FAST])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "roselora" and summary["steps_run"] == 6 and summary["answers"][0]["prompt"] == GOOD["prompt"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "roselora.json").is_file()


def test_edit_prints_a_readable_summary(tiny_model_dirs, tmp_path):
    result = _run(["edit", "--model", tiny_model_dirs["gpt2"], "--requests", _requests(tmp_path, GOOD),
                   "--out", tmp_path / "o", "--targets", "c_attn", "--per-module", *FAST])
    assert result.exit_code == 0, result.output
    assert "weights changed:" in result.stdout and "bound holds on every module: yes" in result.stdout
    assert "transformer.h.1.attn.c_attn.weight" in result.stdout  # the per-module table


def test_ft_l_through_the_cli_writes_ft_l_safetensors(tiny_model_dirs, tmp_path):
    out = tmp_path / "f"
    result = _run(["edit", "--model", tiny_model_dirs["llama"], "--requests", _requests(tmp_path, GOOD),
                   "--out", out, "--method", "ft-l", "--no-answers", *FAST])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["ft_l.safetensors", "roselora.json"]


def test_a_requests_line_that_is_not_json(tiny_model_dirs, tmp_path):
    out = tmp_path / "o"
    result = _run(["edit", "--model", tiny_model_dirs["llama"], "--requests", _requests(tmp_path, GOOD, "{oops"), "--out", out])
    _assert_input_error(result, r"req\.jsonl line 2: not JSON", out)


def test_a_requests_line_that_lacks_a_field(tiny_model_dirs, tmp_path):
    out = tmp_path / "o"
    bad = {k: v for k, v in GOOD.items() if k != "subject"}
    result = _run(["edit", "--model", tiny_model_dirs["llama"], "--requests", _requests(tmp_path, bad), "--out", out])
    _assert_input_error(result, r"line 1: missing field 'subject'", out)


def test_an_empty_target(tiny_model_dirs, tmp_path):
    out = tmp_path / "o"
    result = _run(["edit", "--model", tiny_model_dirs["llama"], "--requests",
                   _requests(tmp_path, {**GOOD, "target_new": ""}), "--out", out])
    _assert_input_error(result, r"line 1: field 'target_new' is empty", out)


def test_a_prompt_longer_than_the_model_accepts(tiny_model_dirs, tmp_path):
    out = tmp_path / "o"
    result = _run(["edit", "--model", tiny_model_dirs["llama"], "--requests",
                   _requests(tmp_path, GOOD, {**GOOD, "prompt": "word " * 100}), "--out", out])
    _assert_input_error(result, r"line 2: field 'prompt' is too long: \d+ tokens", out)


def test_a_model_directory_that_is_not_a_model(tmp_path):
    out = tmp_path / "o"
    (tmp_path / "empty").mkdir()
    result = _run(["edit", "--model", tmp_path / "empty", "--requests", _requests(tmp_path, GOOD), "--out", out])
    _assert_input_error(result, r"--model .*empty: not a model directory", out)


@pytest.mark.parametrize("config, weights, pattern", [
    ('{"model_type": "llama"}', b"not safetensors", r"--model .*junk: cannot load its tokenizer|cannot load as a causal-lm model"),
    ("{}", b"", r"--model .*junk: config.json has no model_type"),
])
def test_a_model_directory_with_junk_files_is_an_input_error(tmp_path, config, weights, pattern):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text(config)
    (junk / "model.safetensors").write_bytes(weights)
    out = tmp_path / "o"
    result = _run(["edit", "--model", junk, "--requests", _requests(tmp_path, GOOD), "--out", out])
    _assert_input_error(result, pattern, out)


def test_an_existing_out_without_overwrite_is_left_alone(tiny_model_dirs, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _run(["edit", "--model", tiny_model_dirs["llama"], "--requests", _requests(tmp_path, GOOD), "--out", out])
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_an_existing_out(tiny_model_dirs, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    result = _run(["edit", "--model", tiny_model_dirs["llama"], "--requests", _requests(tmp_path, GOOD),
                   "--out", out, "--overwrite", "--no-answers", *FAST])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "roselora.json").is_file()


@pytest.mark.parametrize("args, pattern", [(["--tau", "0"], r"--tau 0.0: the kept fraction"),
                                           (["--targets", "nope"], r"--targets nope: no module named nope")])
def test_bad_hyper_parameters_are_input_errors(tiny_model_dirs, tmp_path, args, pattern):
    out = tmp_path / "o"
    result = _run(["edit", "--model", tiny_model_dirs["llama"], "--requests", _requests(tmp_path, GOOD),
                   "--out", out, "--no-answers", *FAST, *args])
    _assert_input_error(result, pattern, out)


def test_demo_model_prints_the_converted_directory(smollm_dir):
    result = _run(["demo-model"])
    assert result.exit_code == 0 and result.stdout.strip() == str(smollm_dir)
