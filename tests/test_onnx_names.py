"""names.json is read defensively: malformed content is an InputError, never a traceback."""
import json

import pytest

from roselora_export.errors import InputError
from roselora_export.onnx.names import NAMES_FILE, read_names


@pytest.mark.parametrize("content, pattern", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "1", "tensors": {}}), "'format' must be an integer"),
    (json.dumps({"format": 1}), "no 'tensors' map"),
])
def test_malformed_names_json_is_an_input_error(tmp_path, content, pattern):
    (tmp_path / NAMES_FILE).write_text(content)
    with pytest.raises(InputError, match=pattern):
        read_names(tmp_path)
