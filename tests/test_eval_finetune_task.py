"""The generated fine-tuning task, and one fine-tuning run on a tiny model."""
from __future__ import annotations

import datetime as dt
import re

from roselora_export.edit.finetune_task import finetune, finetune_config, make_task


def test_train_and_test_never_share_a_prompt():
    train, test = make_task(300, 100, seed=3)
    assert len(train) == 300 and len(test) == 100
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}


def test_every_completion_is_the_iso_form_of_the_date_in_the_prompt():
    train, _ = make_task(50, 10)
    for e in train:
        date = e["prompt"].split("Date: ")[1].split("\n")[0]
        parsed = None
        for fmt in ("%B %d, %Y", "%d %B %Y", "%b %d %Y"):
            try:
                parsed = dt.datetime.strptime(date, fmt).date()
            except ValueError:
                continue
        assert parsed is not None, date
        assert e["completion"] == parsed.isoformat()
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", e["completion"])


def test_finetune_reports_accuracy_and_restores_the_base(tiny_model_dirs):
    from roselora_export.edit.benchmark import state_sha256
    from roselora_export.models import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dirs["llama"]), load_tokenizer(tiny_model_dirs["llama"])
    before = state_sha256(model)
    train, test = make_task(16, 4)
    probes = [{"prompt": "The capital of France is", "answer": "Paris"}]
    run = finetune(model, tok, train, test, "roselora", finetune_config(steps=2), epochs=2 * 8 / 16,
                   batch=8, probes=probes)
    assert 0 <= run.accuracy <= 1 and run.probes_kept in (0.0, 1.0)
    assert run.steps == 2 and 0 < run.params_modified_fraction < 0.05
    assert state_sha256(model) == before
