"""Edit request files: parsing and one-line errors that name the line and the field."""
import json

import pytest

from roselora_export.edit.requests import EditRequest, load_requests
from roselora_export.errors import InputError

GOOD = {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Rome"}


def _write(tmp_path, lines):
    path = tmp_path / "req.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_a_full_request_parses_with_all_fields(tmp_path):
    full = {**GOOD, "ground_truth": "Paris", "rephrase_prompts": ["Where is the Eiffel Tower?"],
            "locality": [{"prompt": "The capital of Germany is", "answer": "Berlin"}]}
    [req] = load_requests(_write(tmp_path, [full]))
    assert req == EditRequest(prompt=GOOD["prompt"], subject="Eiffel Tower", target_new="Rome", ground_truth="Paris",
                              rephrase_prompts=["Where is the Eiffel Tower?"],
                              locality=[{"prompt": "The capital of Germany is", "answer": "Berlin"}])


def test_optional_fields_default_to_empty(tmp_path):
    [req] = load_requests(_write(tmp_path, [GOOD]))
    assert (req.ground_truth, req.rephrase_prompts, req.locality) == (None, [], [])


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    reqs = load_requests(_write(tmp_path, [GOOD, "", GOOD]))
    assert [r.line for r in reqs] == [1, 3]


def test_a_line_that_is_not_json_names_the_line(tmp_path):
    with pytest.raises(InputError, match=r"req.jsonl line 2: not JSON"):
        load_requests(_write(tmp_path, [GOOD, "{not json"]))


@pytest.mark.parametrize("field", ["prompt", "subject", "target_new"])
def test_a_missing_field_names_the_line_and_field(tmp_path, field):
    bad = {k: v for k, v in GOOD.items() if k != field}
    with pytest.raises(InputError, match=rf"line 1: missing field '{field}'"):
        load_requests(_write(tmp_path, [bad]))


def test_an_empty_target_names_the_field(tmp_path):
    with pytest.raises(InputError, match=r"line 1: field 'target_new' is empty"):
        load_requests(_write(tmp_path, [{**GOOD, "target_new": "  "}]))


def test_malformed_locality_names_the_item(tmp_path):
    with pytest.raises(InputError, match=r"field 'locality' item 0"):
        load_requests(_write(tmp_path, [{**GOOD, "locality": [{"prompt": "x"}]}]))


def test_an_empty_file_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no requests"):
        load_requests(_write(tmp_path, [""]))


def test_the_example_landmark_request_loads():
    from pathlib import Path

    [req] = load_requests(Path(__file__).parent.parent / "examples" / "requests" / "landmark.jsonl")
    assert req.target_new == "Rome" and req.ground_truth == "Paris" and req.locality
