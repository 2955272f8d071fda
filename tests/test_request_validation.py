"""Request validation: a subject missing from its prompt is a warning (the library warns, the CLI prints one
line); an empty target_new is an error, before any model is loaded."""
from __future__ import annotations

import json
import warnings

import pytest
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.edit.requests import load_requests
from roselora_export.errors import InputError, InputWarning


def _write(path, *objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def test_a_subject_missing_from_its_prompt_warns_naming_the_line(tmp_path):
    path = _write(tmp_path / "r.jsonl",
                  {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Rome"},
                  {"prompt": "The capital of Germany is", "subject": "Eiffel Tower", "target_new": "Rome"})
    with pytest.warns(InputWarning, match=r"r.jsonl line 2: subject 'Eiffel Tower' does not occur in the prompt") as seen:
        requests = load_requests(path)
    assert len(requests) == 2 and len(seen) == 1


def test_a_subject_in_its_prompt_up_to_case_does_not_warn(tmp_path):
    path = _write(tmp_path / "r.jsonl", {"prompt": "the eiffel tower is in", "subject": "Eiffel Tower", "target_new": "Rome"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        assert load_requests(path)[0].subject == "Eiffel Tower"


def test_the_library_does_not_print_the_warning(tmp_path, capsys):
    path = _write(tmp_path / "r.jsonl", {"prompt": "Paris is", "subject": "Rome", "target_new": "big"})
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        load_requests(path)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("target", ["", "   "])
def test_an_empty_target_new_is_an_error(tmp_path, target):
    path = _write(tmp_path / "r.jsonl", {"prompt": "Paris is", "subject": "Paris", "target_new": target})
    with pytest.raises(InputError, match="line 1: field 'target_new' is empty"):
        load_requests(path)


def test_edit_refuses_an_empty_target_new_in_one_line_before_training(tiny_model_dirs, tmp_path):
    path = _write(tmp_path / "r.jsonl", {"prompt": "Paris is", "subject": "Paris", "target_new": ""})
    result = CliRunner().invoke(main, ["edit", "--model", str(tiny_model_dirs["llama"]), "--requests", str(path),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr == "error: r.jsonl line 1: field 'target_new' is empty\n"
    assert not (tmp_path / "out").exists()
