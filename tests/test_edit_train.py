"""train_edit on tiny models: the edit takes, the base model is left as found, saved outputs reload."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from roselora_export.edit.requests import EditRequest
from roselora_export.edit.train import ft_l_target, save_edit, train_edit
from roselora_export.errors import InputError
from roselora_export.method import RoseLoraConfig
from roselora_export.models import load_model, load_tokenizer



REQ = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome", line=1)
# Strong settings so a tiny random model moves visibly in a few steps.
FAST = dict(rank=4, tau=0.25, t_init=2, t_final=8, steps=16, lr=5e-2, clamp=None, early_stop_loss=None)


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    return load_model(path), load_tokenizer(path)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_bits(model, snap):
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


@torch.no_grad()
def _target_logprob(model, tok, req=REQ):
    p = tok(req.prompt)["input_ids"]
    t = tok(" " + req.target_new, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + t])
    logp = model(input_ids=ids).logits[0, len(p) - 1:-1].log_softmax(-1)
    return float(logp.gather(1, torch.tensor(t)[:, None]).sum())


@pytest.mark.parametrize("method", ["roselora", "lora", "ft-l"])
def test_an_edit_raises_the_target_probability(llama, method):
    model, tok = llama
    before = _target_logprob(model, tok)
    result = train_edit(model, tok, [REQ], method=method, config=RoseLoraConfig(**FAST))
    with result.applied(model):
        after = _target_logprob(model, tok)
    assert after > before + 0.3  # the target's probability grows by more than a third
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("method", ["roselora", "lora", "ft-l"])
def test_train_edit_leaves_the_base_model_bit_identical(llama, method):
    model, tok = llama
    snap = _snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    result = train_edit(model, tok, [REQ], method=method, config=RoseLoraConfig(**FAST))
    assert _same_bits(model, snap)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model, "peft_config")
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    with result.applied(model):
        assert not _same_bits(model, snap)
    assert _same_bits(model, snap)


def test_roselora_deltas_are_keyed_by_base_state_dict_keys_and_sparse(llama):
    model, tok = llama
    result = train_edit(model, tok, [REQ], config=RoseLoraConfig(**FAST))
    deltas = result.deltas()
    assert set(deltas) == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}
    state = model.state_dict()
    for key, d in deltas.items():
        assert d.shape == state[key].shape
        assert 0 < int(torch.count_nonzero(d)) <= result.config.rank * result.config.kept_count(d.shape[1]) * result.config.kept_count(d.shape[0])


def test_lora_baseline_is_dense(llama):
    model, tok = llama
    result = train_edit(model, tok, [REQ], method="lora", config=RoseLoraConfig(**FAST))
    summary = result.summary()
    assert all(m["sparsity_BA"] < 0.01 for m in summary["modules"].values())


def test_saved_adapter_reloaded_through_peft_gives_the_same_logits(llama, tiny_model_dirs, tmp_path):
    model, tok = llama
    trained = load_model(tiny_model_dirs["llama"])
    result = train_edit(trained, tok, [REQ], config=RoseLoraConfig(**FAST), keep_peft=True)
    ids = torch.tensor([tok(REQ.prompt)["input_ids"]])
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits
    save_edit(result, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(tiny_model_dirs["llama"]), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.equal(got, model(input_ids=ids).logits)


def test_saved_roselora_json_records_settings_and_per_module_figures(llama, tmp_path):
    model, tok = llama
    out = save_edit(train_edit(model, tok, [REQ], config=RoseLoraConfig(**FAST)), tmp_path / "a")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "roselora.json"]
    info = json.loads((out / "roselora.json").read_text())
    assert info["method"] == "roselora" and info["config"]["tau"] == 0.25 and info["base_model"] == "llama"
    for m in info["modules"].values():
        assert {"nnz_A", "nnz_B", "nnz_BA", "prop1_sparsity_bound", "sparsity_BA"} <= set(m)
        assert m["sparsity_BA"] >= m["prop1_sparsity_bound"]
        assert m["max_nnz_row_A"] <= m["kept_per_row_A"] and m["max_nnz_col_B"] <= m["kept_per_col_B"]
    assert info["weights_modified"] == sum(m["nnz_BA"] for m in info["modules"].values())
    assert info["fraction_modified"] == pytest.approx(info["weights_modified"] / info["base_weights"])


def test_ft_l_saves_the_new_weight_under_its_base_key(llama, tmp_path):
    model, tok = llama
    result = train_edit(model, tok, [REQ], method="ft-l", config=RoseLoraConfig(**{**FAST, "clamp": 1e-2}))
    out = save_edit(result, tmp_path / "f")
    tensors = load_file(str(out / "ft_l.safetensors"))
    assert list(tensors) == ["model.layers.1.mlp.down_proj.weight"]  # ROME's layer 5 does not exist: the last one
    delta = tensors["model.layers.1.mlp.down_proj.weight"] - model.get_parameter("model.layers.1.mlp.down_proj.weight").detach()
    assert 0 < float(delta.abs().max()) <= 1e-2 + 1e-6
    assert json.loads((out / "roselora.json").read_text())["method"] == "ft-l"


def test_ft_l_target_finds_the_mlp_down_projection_of_each_architecture():
    from tiny_models import tiny_gpt2, tiny_llama

    assert ft_l_target(tiny_llama(num_hidden_layers=8)) == "model.layers.5.mlp.down_proj.weight"
    assert ft_l_target(tiny_gpt2(), layer=0) == "transformer.h.0.mlp.c_proj.weight"
    with pytest.raises(InputError, match="--layer 7"):
        ft_l_target(tiny_llama(), layer=7)


def test_unknown_targets_are_an_input_error_listing_the_modules(llama):
    model, tok = llama
    with pytest.raises(InputError, match=r"--targets c_attn: no module named c_attn.*q_proj"):
        train_edit(model, tok, [REQ], config=RoseLoraConfig(**{**FAST, "targets": ("c_attn",)}))


def test_a_prompt_longer_than_the_model_accepts_names_the_line(llama):
    model, tok = llama
    long = EditRequest(prompt="word " * 80, subject="word", target_new="Rome", line=4)
    with pytest.raises(InputError, match=r"line 4: field 'prompt' is too long: \d+ tokens .* at most 64"):
        train_edit(model, tok, [long])


def test_gpt2_conv1d_deltas_are_in_the_base_layout_and_match_the_peft_model(tiny_model_dirs):
    path = tiny_model_dirs["gpt2"]
    tok, base, wrapped = load_tokenizer(path), load_model(path), load_model(path)
    cfg = RoseLoraConfig(**{**FAST, "targets": ("c_attn",)})
    result = train_edit(wrapped, tok, [REQ], config=cfg, keep_peft=True)
    ids = torch.tensor([tok(REQ.prompt)["input_ids"]])
    deltas = result.deltas()
    assert set(deltas) == {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"}
    assert all(d.shape == base.get_parameter(k).shape == (32, 96) for k, d in deltas.items())
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits
        with result.applied(base):
            merged = base(input_ids=ids).logits
    assert torch.allclose(merged, expected, atol=1e-5) and not torch.allclose(merged, base(input_ids=ids).logits, atol=1e-4)
