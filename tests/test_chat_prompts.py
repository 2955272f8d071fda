"""Chat prompts: --chat and the per-request "chat" field put each prompt through the model's chat template
(edit, evaluate, try), the target starting the assistant's turn; a model without a template is one error line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.edit.data import IGNORE, encode_edit_examples, encode_pair
from roselora_export.edit.evaluate import EditEvaluator
from roselora_export.edit.requests import EditRequest, load_requests
from roselora_export.errors import InputError

GOOD = {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
        "ground_truth": "Paris", "rephrase_prompts": ["The city of the Eiffel Tower is"],
        "locality": [{"prompt": "The sun rises in the", "answer": "east"}]}
FAST = ["--steps", "6", "--t-init", "1", "--t-final", "4", "--rank", "2", "--prefixes", "0", "--no-progress"]


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _requests(tmp_path, *objs, name="req.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def _templated(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tok(tiny_model_dirs):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_model_dirs["llama"]))


@pytest.fixture(scope="module")
def no_template_dir(tiny_model_dirs, tmp_path_factory) -> Path:
    """The tiny Llama with its chat template removed (a base model, not an instruct one)."""
    out = tmp_path_factory.mktemp("plain") / "llama"
    shutil.copytree(tiny_model_dirs["llama"], out)
    (out / "chat_template.jinja").unlink()
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert not transformers.AutoTokenizer.from_pretrained(str(out)).chat_template
    return out


@pytest.fixture(scope="module")
def patch_file(tiny_model_dirs, tmp_path_factory) -> Path:
    """A patch that rewrites a third of every matrix of the tiny Llama: answers change."""
    from test_runtime_cli import _scrambled_patch

    return _scrambled_patch(tiny_model_dirs["llama"], tmp_path_factory.mktemp("patch") / "edit.patch.safetensors")


# ----------------------------------------------------------------------------- the library

def test_a_chat_pair_is_the_templated_prompt_then_the_target_with_no_space(tok):
    enc = encode_pair(tok, "The capital of Japan is", "Seoul", chat=True)
    prompt = _templated(tok, "The capital of Japan is")
    target = tok("Seoul", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == prompt + target
    assert enc.labels == [IGNORE] * len(prompt) + target


def test_a_raw_pair_is_unchanged_by_the_chat_option(tok):
    enc = encode_pair(tok, "The capital of Japan is", "Seoul")
    assert enc.input_ids == tok("The capital of Japan is")["input_ids"] + tok(" Seoul", add_special_tokens=False)["input_ids"]


def test_the_chat_field_of_a_request_and_the_flag_default(tmp_path):
    path = _requests(tmp_path, {**GOOD, "chat": True}, GOOD, {**GOOD, "chat": False})
    assert [r.chat for r in load_requests(path)] == [True, False, False]
    assert [r.chat for r in load_requests(path, chat=True)] == [True, True, False]  # a line's own field wins
    assert load_requests(path)[0].to_dict()["chat"] is True and "chat" not in load_requests(path)[1].to_dict()


def test_a_chat_field_that_is_not_a_boolean(tmp_path):
    with pytest.raises(InputError, match=r"line 1: field 'chat' must be true or false"):
        load_requests(_requests(tmp_path, {**GOOD, "chat": "yes"}))


def test_chat_training_puts_each_prefix_inside_the_user_turn_and_keeps_the_kl_up_to_its_end(tok):
    req = EditRequest(prompt=GOOD["prompt"], subject="Eiffel Tower", target_new="Rome", chat=True,
                      locality=[{"prompt": "The sun rises in the", "answer": "east"}])
    prefix = "It was a sunny day. "
    plain, prefixed, locality = encode_edit_examples([req], tok, None, prefixes=[prefix], kl_prefixes=True,
                                                     kl_on_locality=True)
    assert plain.input_ids == _templated(tok, req.prompt) + tok("Rome", add_special_tokens=False)["input_ids"]
    assert prefixed.input_ids[:-len(tok("Rome", add_special_tokens=False)["input_ids"])] == _templated(tok, prefix + req.prompt)
    head = tok.decode(prefixed.input_ids[:prefixed.kl_len])
    assert head.endswith("It was a sunny day.") and "<|im_start|>user" in head
    assert locality.input_ids == _templated(tok, "The sun rises in the") + tok("east", add_special_tokens=False)["input_ids"]
    assert locality.kl_len == len(locality.input_ids) and all(x == IGNORE for x in locality.labels)


def test_the_evaluator_asks_every_prompt_of_a_chat_request_through_the_template(tok):
    req = EditRequest(**{k: v for k, v in GOOD.items()}, chat=True)
    seen: list[list[int]] = []

    def recording_forward(input_ids, attention_mask):
        seen.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
        return torch.zeros(*input_ids.shape, len(tok))

    EditEvaluator(tok, [req], recording_forward)
    expected = [_templated(tok, p) for p in (req.prompt, *req.rephrase_prompts, "The sun rises in the", req.prompt)]
    assert len(seen) == len(expected)
    for prompt_ids in expected:
        assert any(ids[:len(prompt_ids)] == prompt_ids for ids in seen)


# ----------------------------------------------------------------------------- the commands

def test_edit_with_chat_trains_through_the_template_and_records_it(tiny_model_dirs, tmp_path):
    out = tmp_path / "adapter"
    result = _run(["edit", "--model", tiny_model_dirs["llama"], "--requests", _requests(tmp_path, GOOD), "--out", out,
                   "--chat", "--json", *FAST])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["answers"][0]["chat"] is True
    assert json.loads((out / "roselora.json").read_text())["requests"][0]["chat"] is True


def test_an_edit_trained_through_the_template_holds_when_evaluated_through_it(tiny_model_dirs, tmp_path):
    req = _requests(tmp_path, {**GOOD, "chat": True})  # the per-request field, without --chat
    out = tmp_path / "adapter"
    strong = ["--steps", "30", "--lr", "0.05", "--clamp", "none", "--early-stop-loss", "none", "--rank", "4",
              "--tau", "1", "--prefixes", "0", "--no-progress", "--no-answers"]
    result = _run(["edit", "--model", tiny_model_dirs["llama"], "--requests", req, "--out", out, *strong])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "roselora.json").read_text())["requests"][0]["chat"] is True
    plain = _requests(tmp_path, GOOD, name="plain.jsonl")
    chat = _run(["evaluate", "--model", tiny_model_dirs["llama"], "--requests", plain, "--adapter", out, "--chat",
                 "--json", "--device", "cpu"])
    assert chat.exit_code == 0, chat.output
    report = json.loads(chat.stdout)
    assert report["chat_requests"] == 1 and report["per_request"][0]["chat"] is True
    assert report["reliability"] == 1.0 and report["pre_reliability"] < 1.0


def test_evaluate_chat_flag_equals_the_per_request_field(tiny_model_dirs, tmp_path, patch_file):
    flag = _run(["evaluate", "--model", tiny_model_dirs["llama"], "--requests", _requests(tmp_path, GOOD),
                 "--patch", patch_file, "--chat", "--json", "--device", "cpu"])
    field = _run(["evaluate", "--model", tiny_model_dirs["llama"], "--requests",
                  _requests(tmp_path, {**GOOD, "chat": True}, name="f.jsonl"), "--patch", patch_file, "--json",
                  "--device", "cpu"])
    assert flag.exit_code == 0 and field.exit_code == 0, flag.output + field.output
    a, b = json.loads(flag.stdout), json.loads(field.stdout)
    assert a["per_request"] == b["per_request"] and a["per_request"][0]["chat"] is True


def test_try_with_chat_answers_the_templated_prompt(tiny_model_dirs, tmp_path, patch_file, tok):
    model_dir = tiny_model_dirs["llama"]
    prompt = "What is the capital of Japan?"
    result = _run(["try", "--model", model_dir, "--patch", patch_file, "--prompt", prompt, "--chat",
                   "--max-new-tokens", "4", "--json", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    [answer] = json.loads(result.stdout)["answers"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = torch.tensor([_templated(tok, prompt)])
    with torch.no_grad():
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    assert answer["chat"] is True
    assert answer["base"] == tok.decode(new[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_try_takes_the_chat_field_from_a_requests_file(tiny_model_dirs, tmp_path, patch_file):
    req = _requests(tmp_path, {**GOOD, "chat": True}, GOOD)
    result = _run(["try", "--model", tiny_model_dirs["llama"], "--patch", patch_file, "--requests", req,
                   "--max-new-tokens", "2", "--json", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert [a["chat"] for a in json.loads(result.stdout)["answers"]] == [True, False]


def _assert_no_template_error(result, pattern="no chat template"):
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and pattern in last, result.stderr
    assert "Traceback" not in result.stderr


def test_edit_with_chat_on_a_model_without_a_template_is_one_error_and_writes_nothing(no_template_dir, tmp_path):
    out = tmp_path / "o"
    result = _run(["edit", "--model", no_template_dir, "--requests", _requests(tmp_path, GOOD), "--out", out,
                   "--chat", *FAST])
    _assert_no_template_error(result)
    assert "--chat" in result.stderr and not out.exists()


def test_a_chat_request_on_a_model_without_a_template_names_the_field(no_template_dir, tmp_path):
    out = tmp_path / "o"
    result = _run(["edit", "--model", no_template_dir, "--requests", _requests(tmp_path, {**GOOD, "chat": True}),
                   "--out", out, *FAST])
    _assert_no_template_error(result)
    assert "field 'chat'" in result.stderr and not out.exists()


def test_evaluate_with_chat_on_a_model_without_a_template(no_template_dir, tmp_path):
    result = _run(["evaluate", "--model", no_template_dir, "--requests", _requests(tmp_path, GOOD), "--chat",
                   "--device", "cpu"])
    _assert_no_template_error(result)


def test_try_with_chat_on_a_model_without_a_template(no_template_dir, patch_file):
    result = _run(["try", "--model", no_template_dir, "--patch", patch_file, "--prompt", "Hello", "--chat",
                   "--device", "cpu", "--no-progress"])
    _assert_no_template_error(result)


def test_onnx_generate_with_chat_continues_the_templated_prompt(tiny_model_dirs, tmp_path, tok):
    from roselora_export.onnx.export import export_onnx
    from roselora_export.onnx.session import create_session, generate_greedy

    art = tmp_path / "onnx"
    export_onnx(tiny_model_dirs["llama"], art, check_runtime=False)
    prompt = "What is the capital of Japan?"
    result = _run(["onnx-generate", "--onnx", art, "--prompt", prompt, "--chat", "--max-new-tokens", "3",
                   "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    [r] = json.loads(result.stdout)["results"]
    assert r["new_token_ids"] == generate_greedy(create_session(art), _templated(tok, prompt), 3, tok.eos_token_id)
