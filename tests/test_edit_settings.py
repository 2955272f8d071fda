"""Edit settings: presets, context prefixes, the locality (KL) term and training against the deploy dtype."""
import json

import pytest
import torch
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.edit.data import encode_edit_examples
from roselora_export.edit.deploy_rounding import round_weights_, rounded_lora_forward
from roselora_export.edit import prefixes as prefixes_module
from roselora_export.edit.prefixes import context_prefixes
from roselora_export.edit.requests import EditRequest
from roselora_export.edit.settings import EditSettings, preset
from roselora_export.edit.train import _losses, _micro_batches, train_edit
from roselora_export.errors import InputError
from roselora_export.method import RoseLoraConfig, wrap_with_lora
from roselora_export.models import load_model, load_tokenizer

from tiny_models import save_model_dir, tiny_bert, tiny_llama

REQ = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome",
                  locality=[{"prompt": "The sun rises in the", "answer": "sky"}], line=1)
FAST = dict(rank=4, tau=0.25, t_init=2, t_final=8, steps=10, lr=5e-2, clamp=None, early_stop_loss=None)


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    return load_model(path), load_tokenizer(path)


def test_the_paper_preset_is_the_authors_setup():
    config, settings = preset("paper")
    assert (config.rank, config.alpha, config.tau, config.beta, config.t_init, config.t_final) == (8, 32, 0.05, 0.8, 3, 20)
    assert (config.steps, config.lr, config.clamp, config.early_stop_loss) == (25, 5e-4, 3e-3, 0.1)
    assert settings.prefixes == 0 and settings.kl_weight == 0


def test_an_unknown_preset_is_an_input_error():
    with pytest.raises(InputError, match="--preset fast: choose one of default, paper"):
        preset("fast")


def test_prefixes_are_generated_by_the_model_the_same_way_every_time(llama):
    model, tok = llama
    first = context_prefixes(model, tok, 3, 4, seed=7)
    assert len(first) == 3 and all(p.endswith(". ") for p in first)
    assert first[0].startswith("The") and first[1].startswith("Therefore")  # one seed word after another
    prefixes_module._CACHE.clear()
    assert context_prefixes(model, tok, 3, 4, seed=7) == first


def test_prefixes_need_a_model_that_generates():
    model = tiny_bert()
    with pytest.raises(InputError, match="--prefixes 2: context prefixes need a model that generates text"):
        context_prefixes(model, None, 2, 5)


def test_each_prefix_adds_a_training_example_whose_prefix_carries_the_kl_term(llama):
    _, tok = llama
    prefixes = ["I went home. ", "You know. "]
    plain = encode_edit_examples([REQ], tok, 64, prefixes=prefixes)
    assert len(plain) == 3 and all(e.kl_len == 0 for e in plain)
    assert plain[1].labels[-2:] == plain[0].labels[-2:]  # the same target tokens after each context
    with_kl = encode_edit_examples([REQ], tok, 64, prefixes=prefixes, kl_prefixes=True, kl_on_locality=True)
    assert with_kl[0].kl_len == 0 and with_kl[1].kl_len == len(tok("I went home.")["input_ids"])
    loc = with_kl[-1]  # the locality prompt: KL only, nothing to predict
    assert loc.kl_len == len(loc.input_ids) and set(loc.labels) == {-100}


def test_kl_texts_are_sequences_that_carry_only_the_kl_term(llama):
    from roselora_export.edit.data import kl_only_sequences

    _, tok = llama
    seqs = kl_only_sequences(["I went home. ", "You know what I mean"], tok, 4)
    assert [len(e.input_ids) for e in seqs] == [len(tok("I went home.")["input_ids"]), 4]  # cut at max_len
    assert all(e.kl_len == len(e.input_ids) and set(e.labels) == {-100} for e in seqs)


def test_an_edit_with_kl_texts_trains_on_the_models_own_texts_with_their_own_seed(llama, monkeypatch):
    from roselora_export.edit import train as train_module

    model, tok = llama
    calls = []
    real = train_module.kl_only_sequences
    monkeypatch.setattr(train_module, "kl_only_sequences", lambda texts, *a: calls.append(texts) or real(texts, *a))
    config = RoseLoraConfig(steps=2, t_init=1, t_final=1)
    train_edit(model, tok, [REQ], config=config, settings=EditSettings(prefixes=1, prefix_length=3, kl_weight=1.0,
                                                                       kl_texts=2))
    assert len(calls) == 1 and len(calls[0]) == 2
    assert calls[0] == context_prefixes(model, tok, 2, train_module.KL_TEXT_LENGTH, config.seed + 1)
    assert calls[0][0] != context_prefixes(model, tok, 1, 3, config.seed)[0]
    calls.clear()
    train_edit(model, tok, [REQ], config=config, settings=EditSettings(prefixes=1, prefix_length=3, kl_weight=0.0,
                                                                       kl_texts=2))
    assert calls == []  # no locality term, no texts for it


def test_the_kl_term_is_zero_for_the_unedited_model_and_grows_with_the_edit(llama):
    model, tok = llama
    enc = encode_edit_examples([REQ], tok, 64, prefixes=["I went home. "], kl_prefixes=True)
    batch = _micro_batches(enc, 0, 8)[0]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    batch["kl_ref"] = torch.log_softmax(logits[batch["kl_mask"]].float(), dim=-1)
    _, _, kl = _losses(model, batch)
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(3.0)
        try:
            _, _, kl = _losses(model, batch)
        finally:
            model.model.layers[0].self_attn.v_proj.weight.div_(3.0)
    assert float(kl) > 1e-4


def test_training_against_bf16_computes_with_the_weights_merge_writes(llama):
    model, tok = llama
    state = {k: v.clone() for k, v in model.state_dict().items()}
    round_weights_(model, "bf16")  # a bf16 checkpoint, loaded in fp32
    peft_model = wrap_with_lora(model, RoseLoraConfig(rank=2, targets=("q_proj", "v_proj"), dropout=0.0))
    try:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        ids = torch.tensor([tok(REQ.prompt)["input_ids"]])
        with torch.no_grad(), rounded_lora_forward(peft_model, "bf16"):
            ours = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()  # fp32 merge; then round as merge --dtype bf16 stores it
        with torch.no_grad():
            for p in merged.parameters():
                p.copy_(p.to(torch.bfloat16).float())
            shipped = merged(input_ids=ids).logits
        assert torch.equal(ours, shipped)
    finally:
        model.load_state_dict(state)


def test_the_rounded_forward_passes_the_gradient_straight_through(llama):
    model, tok = llama
    peft_model = wrap_with_lora(model, RoseLoraConfig(rank=2, targets=("q_proj",), dropout=0.0))
    try:
        ids = torch.tensor([tok(REQ.prompt)["input_ids"]])
        with rounded_lora_forward(peft_model, "bf16"):
            peft_model(input_ids=ids).logits.sum().backward()
        grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        peft_model.unload()


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _requests(tmp_path):
    path = tmp_path / "req.jsonl"
    path.write_text(json.dumps(REQ.to_dict()) + "\n")
    return path


SMALL = ["--steps", "3", "--t-init", "1", "--t-final", "2", "--prefixes", "2", "--prefix-length", "3", "--no-progress",
         "--no-answers"]


def test_edit_records_its_preset_and_settings(tiny_model_dirs, tmp_path):
    out = tmp_path / "a"
    result = _cli(["edit", "--model", tiny_model_dirs["llama"], "--requests", _requests(tmp_path), "--out", out,
                   "--preset", "paper", "--kl-weight", "0.5", *SMALL])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "roselora.json").read_text())
    assert summary["config"]["clamp"] == 3e-3 and summary["config"]["lr"] == 5e-4  # from the preset
    assert summary["config"]["steps"] == 3  # the option overrides the preset
    assert summary["settings"] == {"prefixes": 2, "prefix_length": 3, "kl_weight": 0.5, "kl_texts": 0, "kl_weight_when_edited": None,
                                   "kl_texts_when_edited": None, "keep_edits": 0,
                                   "pin_kl_texts": False, "kl_on_locality": False, "deploy_dtype": None}


def test_edit_on_a_bf16_checkpoint_trains_against_bf16(tmp_path, smollm_dir):
    path = save_model_dir(tiny_llama(vocab_size=49152).to(torch.bfloat16), tmp_path / "bf16", tokenizer_from=smollm_dir)
    out = tmp_path / "a"
    result = _cli(["edit", "--model", path, "--requests", _requests(tmp_path), "--out", out, *SMALL])
    assert result.exit_code == 0, result.output
    assert "the checkpoint stores bf16" in result.stderr
    assert json.loads((out / "roselora.json").read_text())["settings"]["deploy_dtype"] == "bf16"


@pytest.mark.parametrize("args, pattern", [
    (["--preset", "fast"], r"--preset fast: choose one of default, paper"),
    (["--kl-texts", "-2"], r"--kl-texts -2: must be a whole number >= 0"),
    (["--method", "ft-l", "--deploy-dtype", "bf16"], r"--deploy-dtype bf16: ft-l stores whole new weights"),
    (["--prefixes", "-1"], r"--prefixes -1: must be a whole number >= 0"),
    (["--kl-weight", "-1"], r"--kl-weight -1.0: must be >= 0"),
    (["--layers", "7"], r"--layers 7: the model has layers 0\.\.1$"),
    (["--layers", "two"], r"--layers two: give layer numbers such as 2-6"),
])
def test_bad_edit_settings_are_one_line_errors(tiny_model_dirs, tmp_path, args, pattern):
    import re

    out = tmp_path / "a"
    result = _cli(["edit", "--model", tiny_model_dirs["llama"], "--requests", _requests(tmp_path), "--out", out,
                   *SMALL, *args])
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(pattern, last), result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


@torch.no_grad()
def _target_logprob(model, tok, req=REQ):
    p = tok(req.prompt)["input_ids"]
    t = tok(" " + req.target_new, add_special_tokens=False)["input_ids"]
    logp = model(input_ids=torch.tensor([p + t])).logits[0, len(p) - 1:-1].log_softmax(-1)
    return float(logp.gather(1, torch.tensor(t)[:, None]).sum())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_default_preset_moves_every_architecture_towards_the_target(tiny_model_dirs, arch):
    # No tuning at all: targets resolve per architecture (q_proj,v_proj; GPT-2's Conv1D c_attn). A tiny
    # random model cannot make a 49,152-token argmax flip (its final norm caps every logit near 0.6),
    # so "takes" here means the target's probability rises; SmolLM2's reliability is in docs/results.md.
    model, tok = load_model(tiny_model_dirs[arch]), load_tokenizer(tiny_model_dirs[arch])
    before = _target_logprob(model, tok)
    result = train_edit(model, tok, [REQ])
    with result.applied(model):
        after = _target_logprob(model, tok)
    assert after > before + 0.05
    assert result.settings == preset("default")[1] and result.config == preset("default")[0]


def test_layers_restrict_the_edit_to_those_layers(tiny_model_dirs):
    from dataclasses import replace

    model, tok = load_model(tiny_model_dirs["llama"]), load_tokenizer(tiny_model_dirs["llama"])
    config, settings = preset("default")
    config = replace(config, steps=3, t_init=1, t_final=2)
    config.layers = (1,)
    result = train_edit(model, tok, [REQ], config=config, settings=replace(settings, prefixes=1, prefix_length=3))
    touched = [k for k, d in result.deltas().items() if d.count_nonzero()]
    assert touched and all(".layers.1.mlp." in k for k in touched), touched
    assert RoseLoraConfig.from_dict(result.config.to_dict()).layers == (1,)
    assert RoseLoraConfig(layers="3-5,1").layers == (1, 3, 4, 5) and RoseLoraConfig(layers="all").layers is None


@pytest.mark.parametrize("build, expected", [
    ("llama", ["up_proj", "down_proj"]), ("gpt2", ["c_fc", "mlp.c_proj"]), ("bert", ["intermediate.dense"])])
def test_mlp_targets_name_each_architectures_mlp_projections(build, expected):
    from roselora_export.method.peft_setup import resolve_targets
    from roselora_export.method.pruner import lora_pairs
    from tiny_models import BUILDERS

    model = BUILDERS[build]()
    assert resolve_targets(model, ("mlp",)) == expected
    adapted = [p.base_key for p in lora_pairs(wrap_with_lora(model, RoseLoraConfig(targets=("mlp",))))]
    assert adapted and all(".attn." not in k and ".attention." not in k for k in adapted)  # GPT-2's attn.c_proj is left alone


def test_sequential_editing_measures_after_the_last_edit_and_reverts_every_patch_to_the_base(tiny_model_dirs, tmp_path):
    reqs = [REQ.to_dict(), {**REQ.to_dict(), "prompt": "The capital of Japan is", "subject": "Japan", "target_new": "Seoul"},
            {**REQ.to_dict(), "prompt": "Tesla is led by its CEO", "subject": "Tesla", "target_new": "Jeff Bezos"}]
    path = tmp_path / "req.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in reqs) + "\n")
    out = tmp_path / "seq.json"
    result = _cli(["benchmark-edits", "--model", tiny_model_dirs["llama"], "--requests", path, "--sequential",
                   "--methods", "roselora,ft-l", "--steps", "4", "--t-init", "1", "--t-final", "2", "--prefixes", "1",
                   "--prefix-length", "3", "--lr", "5e-2", "--no-progress", "--out", out])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for m in report["methods"].values():
        assert m["edits"] == 3 and len(m["per_request"]) == 3 and m["bits_identical_after_reverts"] is True
        assert sorted(m["revert_order"]) == [0, 1, 2] and m["params_touched_union"] > 0
    # ft-l edits one weight again and again: every later patch overlaps an earlier one, so reverts go LIFO
    assert report["methods"]["ft-l"]["patches_overlapping_an_earlier_one"] == 2
    assert report["methods"]["ft-l"]["revert_order"] == [2, 1, 0]
    assert "bit-identical" in _cli(["benchmark-edits", "--model", tiny_model_dirs["llama"], "--requests", path,
                                    "--sequential", "--methods", "ft-l", "--steps", "2", "--prefixes", "0",
                                    "--no-progress", "--limit", "2"]).stdout
