"""Editing on top of earlier edits: the earlier edits kept by the locality term (--keep-edits, from the
directory's ledger) and KL texts pinned to the first model of a sequence (pin_kl_texts)."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.edit import train as train_module
from roselora_export.edit.data import IGNORE
from roselora_export.edit.requests import EditRequest, recorded_requests
from roselora_export.edit.settings import EditSettings
from roselora_export.edit.train import pin_kl_texts, train_edit
from roselora_export.errors import InputError
from roselora_export.method import RoseLoraConfig
from roselora_export.models import load_model, load_tokenizer
from roselora_export.patch.ledger import Entry, Ledger, write_ledger

FIRST = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome")
SECOND = EditRequest(prompt="The capital of Japan is", subject="Japan", target_new="Seoul")
FAST = RoseLoraConfig(rank=2, tau=0.5, t_init=1, t_final=2, steps=3, lr=1e-2, clamp=None, early_stop_loss=None)
KL = EditSettings(prefixes=0, kl_weight=1.0)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    return load_model(path), load_tokenizer(path)


def _spy_batches(monkeypatch) -> list:
    """Every micro-batch train_edit hands to the loop, in order."""
    seen = []
    real = train_module.train_lora

    def spy(model, batches, config, **kw):
        seen.extend(batches(1))
        return real(model, batches, config, **kw)

    monkeypatch.setattr(train_module, "train_lora", spy)
    return seen


def test_a_kept_edit_is_a_sequence_that_carries_only_the_locality_term(llama, monkeypatch):
    model, tok = llama
    seen = _spy_batches(monkeypatch)
    train_edit(model, tok, [SECOND], config=FAST, settings=replace(KL, keep_edits=4), earlier=[FIRST])
    want = tok(FIRST.prompt)["input_ids"] + tok(" " + FIRST.target_new, add_special_tokens=False)["input_ids"]
    rows = [(b, i) for b in seen for i in range(len(b["input_ids"]))
            if b["input_ids"][i, :len(want)].tolist() == want]
    assert len(rows) == 1, "the kept edit is one training sequence"
    b, i = rows[0]
    assert (b["labels"][i] == IGNORE).all()  # nothing to learn from it...
    n_prompt = len(tok(FIRST.prompt)["input_ids"])  # ...the positions that predict the target keep their predictions
    assert b["kl_mask"][i].nonzero().flatten().tolist() == list(range(n_prompt - 1, len(want) - 1))
    assert torch.allclose(b["kl_ref"].exp().sum(-1), torch.ones(b["kl_ref"].shape[0]))


def test_without_the_locality_term_nothing_is_kept(llama, monkeypatch):
    model, tok = llama
    seen = _spy_batches(monkeypatch)
    train_edit(model, tok, [SECOND], config=FAST, settings=EditSettings(prefixes=0, kl_weight=0.0), earlier=[FIRST])
    assert sum(len(b["input_ids"]) for b in seen) == 1
    with pytest.raises(InputError, match=r"--keep-edits 4: needs the locality term \(--kl-weight > 0\)"):
        EditSettings(kl_weight=0.0, keep_edits=4)
    with pytest.raises(InputError, match="--keep-edits -1: must be a whole number >= 0"):
        EditSettings(keep_edits=-1)


def test_pinned_kl_texts_keep_the_base_models_predictions(llama, monkeypatch):
    model, tok = llama
    settings = replace(KL, kl_texts=2, pin_kl_texts=True)
    pinned = pin_kl_texts(model, tok, FAST, settings)
    assert list(pinned.texts) == [2] and len(pinned.reference) == 1  # the two texts form one micro-batch
    want = {k: v.clone() for k, v in pinned.reference.items()}
    weight = model.model.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    seen = _spy_batches(monkeypatch)
    with torch.no_grad():
        weight.mul_(1.5)  # another model now: its own predictions on the texts differ
    try:
        train_edit(model, tok, [SECOND], config=FAST, settings=settings, pinned=pinned)
        text_batch = seen[-1]
        own = torch.log_softmax(model(input_ids=text_batch["input_ids"],
                                      attention_mask=text_batch["attention_mask"]).logits[text_batch["kl_mask"]], -1)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    (ref,) = want.values()
    assert torch.equal(text_batch["kl_ref"], ref)  # the edit trained toward the base's predictions...
    assert not torch.allclose(own, ref, atol=1e-3)  # ...which are not the changed model's


def _ledger_with(root: Path, requests) -> None:
    entry = Entry(sha256="0" * 64, content_sha256="1" * 64, nnz=1, tensors=["w"], applied_at="2026-12-02T00:00:00",
                  provenance={"kind": "adapter", "roselora": {"requests": requests}}, file="first.patch")
    write_ledger(Ledger([entry], {}), root)


def test_recorded_requests_come_from_the_ledger_and_a_bad_one_is_named(tmp_path):
    assert recorded_requests(tmp_path) == []  # no ledger: no earlier edits
    _ledger_with(tmp_path, [FIRST.to_dict()])
    assert recorded_requests(tmp_path) == [FIRST]
    _ledger_with(tmp_path, [{"prompt": "x", "subject": 3, "target_new": "y"}])
    with pytest.raises(InputError, match=r"roselora-ledger.json: patch first.patch .*request 1: field 'subject' must be a string"):
        recorded_requests(tmp_path)


def test_edit_on_a_patched_directory_keeps_the_edits_its_ledger_records(tiny_model_dirs, tmp_path):
    base = tiny_model_dirs["llama"]
    small = ["--steps", "3", "--t-init", "1", "--t-final", "2", "--rank", "2", "--no-progress", "--no-answers"]
    for name, req in (("first", FIRST), ("second", SECOND)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(req.to_dict()) + "\n")
    assert run("edit", "--model", base, "--requests", tmp_path / "first.jsonl", "--out", tmp_path / "a1", *small).exit_code == 0
    assert run("merge", "--base", base, "--adapter", tmp_path / "a1", "--out", tmp_path / "m1").exit_code == 0
    assert recorded_requests(tmp_path / "m1") == [FIRST]
    r = run("edit", "--model", tmp_path / "m1", "--requests", tmp_path / "second.jsonl", "--out", tmp_path / "a2",
            "--keep-edits", "8", *small)
    assert r.exit_code == 0, r.output
    assert ("note: the model carries 1 patch(es) (its ledger): locality term weight 16 on 16 KL text(s), "
            "keeping 1 of 1 earlier edit(s)") in r.stderr
    assert json.loads((tmp_path / "a2" / "roselora.json").read_text())["settings"]["keep_edits"] == 8


def test_an_edited_model_trains_with_the_settings_for_one(llama):
    settings = EditSettings(prefixes=0, kl_weight=1.0, kl_weight_when_edited=16.0, kl_texts_when_edited=2)
    edited = settings.when_edited()
    assert (edited.kl_weight, edited.kl_texts, edited.kl_weight_when_edited) == (16.0, 2, None)
    assert EditSettings(kl_weight=3.0).when_edited().kl_weight == 3.0  # unset: the same as for a fresh model
    model, tok = llama
    fresh = train_edit(model, tok, [FIRST], config=FAST, settings=settings)
    later = train_edit(model, tok, [SECOND], config=FAST, settings=settings, carries_edits=True)
    assert fresh.settings.kl_weight == 1.0 and later.settings.kl_weight == 16.0 and later.settings.kl_texts == 2


def test_a_kl_weight_given_on_the_command_line_holds_on_an_edited_model_too(tiny_model_dirs, tmp_path):
    base = tiny_model_dirs["llama"]
    small = ["--steps", "3", "--t-init", "1", "--t-final", "2", "--rank", "2", "--no-progress", "--no-answers"]
    (tmp_path / "first.jsonl").write_text(json.dumps(FIRST.to_dict()) + "\n")
    (tmp_path / "second.jsonl").write_text(json.dumps(SECOND.to_dict()) + "\n")
    assert run("edit", "--model", base, "--requests", tmp_path / "first.jsonl", "--out", tmp_path / "a1", *small).exit_code == 0
    assert run("merge", "--base", base, "--adapter", tmp_path / "a1", "--out", tmp_path / "m1").exit_code == 0
    r = run("edit", "--model", tmp_path / "m1", "--requests", tmp_path / "second.jsonl", "--out", tmp_path / "a2",
            "--kl-weight", "2", *small)
    assert r.exit_code == 0, r.output
    assert "locality term weight 2 on 16 KL text(s)" in r.stderr  # each field on its own: --kl-texts not given
    assert json.loads((tmp_path / "a2" / "roselora.json").read_text())["settings"]["kl_weight"] == 2.0


def _spy_loads(monkeypatch) -> list:
    """Each model load as (its directory, the earlier loaded models still alive at that moment)."""
    import gc
    import weakref

    from roselora_export import models

    loads, loaded, real = [], [], models.load_model

    def spy(path, *args, **kwargs):
        gc.collect()
        loads.append((Path(path), [p for p, ref in loaded if ref() is not None]))
        model = real(path, *args, **kwargs)
        loaded.append((Path(path), weakref.ref(model)))
        return model

    monkeypatch.setattr(models, "load_model", spy)
    return loads


def test_edit_pins_the_kl_texts_to_the_chains_base_and_says_when_it_is_gone(tiny_model_dirs, tmp_path, monkeypatch):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dirs["llama"], base)
    small = ["--steps", "3", "--t-init", "1", "--t-final", "2", "--rank", "2", "--no-progress", "--no-answers"]
    (tmp_path / "first.jsonl").write_text(json.dumps(FIRST.to_dict()) + "\n")
    (tmp_path / "second.jsonl").write_text(json.dumps(SECOND.to_dict()) + "\n")
    assert run("edit", "--model", base, "--requests", tmp_path / "first.jsonl", "--out", tmp_path / "a1", *small).exit_code == 0
    assert run("merge", "--base", base, "--adapter", tmp_path / "a1", "--out", tmp_path / "m1").exit_code == 0
    second = ["edit", "--model", tmp_path / "m1", "--requests", tmp_path / "second.jsonl", "--pin-kl-texts", *small]
    loads = _spy_loads(monkeypatch)
    r = run(*second, "--out", tmp_path / "a2")
    assert r.exit_code == 0, r.output
    assert f"note: KL texts pinned to the predictions of {base.resolve()}, the base of the edits it carries" in r.stderr
    # the base is loaded first and freed before the edited model loads: one model in memory at a time
    assert loads == [(base.resolve(), []), (tmp_path / "m1", [])]
    shutil.rmtree(base)
    r = run(*second, "--out", tmp_path / "a3")
    assert r.exit_code == 0, r.output
    assert "note: KL texts not pinned: the base the ledger's first edit was trained on" in r.stderr


def test_edit_on_a_directory_with_a_damaged_ledger_is_refused_before_training(tiny_model_dirs, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], model)
    (model / "roselora-ledger.json").write_text('{"format": "roselora-ledger", "version": 1, "patc')
    (tmp_path / "req.jsonl").write_text(json.dumps(FIRST.to_dict()) + "\n")
    r = run("edit", "--model", model, "--requests", tmp_path / "req.jsonl", "--out", tmp_path / "a", "--no-progress")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "roselora-ledger.json: is not valid JSON (truncated or damaged); the ledger cannot be trusted" in r.stderr
    assert not (tmp_path / "a").exists()


def test_the_help_says_an_unset_setting_for_an_edited_model_follows_the_fresh_one():
    from roselora_export.cli.edit_commands import _preset_help

    assert _preset_help("kl_weight_when_edited", "h").endswith("[default: 16.0; paper: as --kl-weight]")
    assert _preset_help("kl_texts_when_edited", "h").endswith("[default: 16; paper: as --kl-texts]")
    assert _preset_help("layers", "h").endswith("paper: all]")
