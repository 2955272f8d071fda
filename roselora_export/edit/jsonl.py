"""Reading .jsonl input files: one JSON object per line, errors that name the file, line and problem."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError


def read_jsonl_objects(path: str | os.PathLike, option: str) -> Iterator[tuple[dict, str, int]]:
    """Yield (object, "FILE line N", N) for each non-blank line; InputError for a missing file,
    non-UTF-8 text, a line that is not JSON, or one that is not an object. `option` names the flag."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{option} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{option} {path}: not UTF-8 text") from None
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object")
        yield obj, where, n
