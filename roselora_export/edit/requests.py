"""Knowledge-edit requests: one JSON object per line of a .jsonl file.

    {"prompt": "The Eiffel Tower is in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
     "ground_truth": "Paris", "rephrase_prompts": ["..."], "locality": [{"prompt": "...", "answer": "..."}]}

The target continues the prompt after one space; training puts the loss on the target tokens only.
With `"chat": true` (or `--chat` for the lines that do not say), each of the request's prompts
(prompt, rephrases, locality) is asked as a user turn through the model's chat template and the
answer starts the assistant's turn (roselora_export/chat.py).
Every error names the file, the line and the field. A subject that does not occur in its prompt
(case aside) is accepted with an InputWarning: the edit still trains, but is probably mistyped.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

from ..errors import InputError, InputWarning
from .jsonl import read_jsonl_objects

REQUIRED = ("prompt", "subject", "target_new")


@dataclass
class EditRequest:
    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)
    locality: list[dict] = field(default_factory=list)  # [{"prompt": str, "answer": str}]
    chat: bool = False  # ask every prompt of the request through the model's chat template
    line: int = field(default=0, compare=False, repr=False)  # 1-based line in its file, for error messages

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "subject": self.subject, "target_new": self.target_new,
                "ground_truth": self.ground_truth, "rephrase_prompts": list(self.rephrase_prompts),
                "locality": [dict(x) for x in self.locality], **({"chat": True} if self.chat else {})}


def _request_from(obj, where: str, line: int, chat: bool = False) -> EditRequest:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in REQUIRED:
        if name not in obj:
            raise InputError(f"{where}: missing field '{name}' (each line needs {', '.join(REQUIRED)})")
        if not isinstance(obj[name], str):
            raise InputError(f"{where}: field '{name}' must be a string")
        if not obj[name].strip():
            raise InputError(f"{where}: field '{name}' is empty")
    if obj["subject"].strip().lower() not in obj["prompt"].lower():
        warnings.warn(f"{where}: subject {obj['subject']!r} does not occur in the prompt {obj['prompt']!r}; "
                      "is the subject or the prompt mistyped?", InputWarning, stacklevel=2)
    gt = obj.get("ground_truth")
    if gt is not None and not isinstance(gt, str):
        raise InputError(f"{where}: field 'ground_truth' must be a string or null")
    rephrase = obj.get("rephrase_prompts") or []
    if not isinstance(rephrase, list) or not all(isinstance(p, str) and p.strip() for p in rephrase):
        raise InputError(f"{where}: field 'rephrase_prompts' must be a list of non-empty strings")
    locality = obj.get("locality") or []
    if not isinstance(locality, list):
        raise InputError(f"{where}: field 'locality' must be a list of {{\"prompt\", \"answer\"}} objects")
    for i, item in enumerate(locality):
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) and item[k].strip() for k in ("prompt", "answer"))):
            raise InputError(f"{where}: field 'locality' item {i}: needs non-empty string 'prompt' and 'answer'")
    chat = obj.get("chat", chat)
    if not isinstance(chat, bool):
        raise InputError(f"{where}: field 'chat' must be true or false")
    return EditRequest(prompt=obj["prompt"], subject=obj["subject"], target_new=obj["target_new"].strip(),
                       ground_truth=gt, rephrase_prompts=list(rephrase),
                       locality=[{"prompt": x["prompt"], "answer": x["answer"]} for x in locality], chat=chat,
                       line=line)


def load_requests(path: str | os.PathLike, *, chat: bool = False) -> list[EditRequest]:
    """Parse a requests .jsonl file (blank lines skipped); InputError names the line and field of any problem.

    `chat` is the default for lines without a "chat" field (the --chat flag); a line's own field wins."""
    requests = [_request_from(obj, where, n, chat) for obj, where, n in read_jsonl_objects(path, "--requests")]
    if not requests:
        raise InputError(f"--requests {path}: no requests in the file (one JSON object per line)")
    return requests


def recorded_requests(model_dir: str | os.PathLike, entries: list | None = None) -> list[EditRequest]:
    """The requests of the edits a patched directory carries, oldest first, from its ledger's provenance
    (`merge` records an edit's requests there; `entries`: the ledger's, when already read). Empty for a
    directory without a ledger; InputError for a damaged ledger or a recorded request that does not parse."""
    from ..patch.ledger import LEDGER_NAME, read_ledger

    out = []
    for entry in read_ledger(model_dir).entries if entries is None else entries:
        recorded = (entry.provenance.get("roselora") or {}).get("requests") or []
        where = f"{os.path.join(model_dir, LEDGER_NAME)}: patch {entry.label()}"
        if not isinstance(recorded, list):
            raise InputError(f"{where}: its recorded requests are not a list")
        out += [_request_from(obj, f"{where}, request {i + 1}", 0) for i, obj in enumerate(recorded)]
    return out


def chain_base(model_dir: str | os.PathLike, entries: list | None = None) -> str | None:
    """The model directory the first edit a patched directory's ledger records was trained on (its adapter's
    `base_model_path`), or None when the ledger records none; `entries`: the ledger's, when already read."""
    from ..patch.ledger import read_ledger

    for entry in read_ledger(model_dir).entries if entries is None else entries:
        path = (entry.provenance.get("roselora") or {}).get("base_model_path")
        if isinstance(path, str):
            return path
    return None
