"""Metrics equal hand-computed values for constructed logits (EasyEdit definitions)."""
from __future__ import annotations

import math

import pytest
import torch

from roselora_export.edit.data import IGNORE
from roselora_export.edit.evaluate import EditEvaluator, summarize
from roselora_export.edit.metrics import agreement, answer_predictions, token_accuracy
from roselora_export.edit.requests import EditRequest

V = 49152  # SmolLM2's vocabulary: the evaluator tokenizes with the real tokenizer


def test_answer_predictions_read_the_position_before_each_answer_token():
    logits = torch.zeros(1, 4, 5)
    logits[0, 1, 3] = 2.0  # predicts token 3 for position 2 (correct)
    logits[0, 2, 1] = 2.0  # predicts token 1 for position 3 (the answer is 4: wrong)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4]])
    (score,) = answer_predictions(logits, labels)
    assert score.target.tolist() == [3, 4]
    assert score.pred.tolist() == [3, 1]
    assert score.accuracy == 0.5
    p_right = math.exp(2) / (math.exp(2) + 4)
    assert score.logprob[0].item() == pytest.approx(math.log(p_right), rel=1e-6)
    assert score.logprob[1].item() == pytest.approx(math.log(1 / (math.exp(2) + 4)), rel=1e-6)


def test_token_accuracy_and_agreement_count_matching_positions():
    assert token_accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5
    assert agreement(torch.tensor([5, 5, 5]), torch.tensor([5, 6, 5])) == pytest.approx(2 / 3)


def oracle_forward(input_ids, attention_mask):
    """A model that always predicts the true next token (the 'unedited' model here)."""
    logits = torch.zeros(*input_ids.shape, V)
    nxt = torch.roll(input_ids, -1, dims=1)
    logits.scatter_(2, nxt[..., None], 10.0)
    return logits


def constant_forward(token: int):
    def forward(input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, V)
        logits[..., token] = 10.0
        return logits
    return forward


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    from roselora_export.models import load_tokenizer

    return load_tokenizer(smollm_dir)


@pytest.fixture(scope="module")
def request_():
    return EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower",
                       target_new="Rome", ground_truth="Paris",
                       rephrase_prompts=["The city that is home to the Eiffel Tower is"],
                       locality=[{"prompt": "The capital of Japan is", "answer": "Tokyo."},
                                 {"prompt": "The sun rises in the", "answer": "east"}])


def test_unedited_model_measured_against_itself_has_full_locality(tokenizer, request_):
    ev = EditEvaluator(tokenizer, [request_], oracle_forward)
    (row,) = ev.measure(oracle_forward)
    assert row["reliability"] == 1.0 and row["generalization"] == 1.0
    assert row["locality"] == 1.0
    assert row["efficacy"] == 0.0  # both answers equally likely: not strictly more


def test_model_that_always_says_the_new_target_gets_known_values(tokenizer, request_):
    (rome,) = tokenizer(" Rome", add_special_tokens=False)["input_ids"]  # one token
    ev = EditEvaluator(tokenizer, [request_], oracle_forward)
    (row,) = ev.measure(constant_forward(rome))
    assert row["reliability"] == 1.0
    assert row["generalization"] == 1.0
    assert row["locality"] == 0.0  # every locality answer token now differs from the oracle's
    assert row["efficacy"] == 1.0
    assert row["pre_reliability"] == 1.0  # the oracle predicts whatever is teacher-forced


def test_partial_locality_is_the_mean_over_locality_prompts(tokenizer, request_):
    east = tokenizer(" east", add_special_tokens=False)["input_ids"]
    assert len(east) == 1
    ev = EditEvaluator(tokenizer, [request_], oracle_forward)
    (row,) = ev.measure(constant_forward(east[0]))
    # 'Tokyo.' tokens all change (0), ' east' is still predicted (1): mean 0.5.
    assert row["locality"] == pytest.approx(0.5)


def test_summary_has_the_issue_schema_and_fraction():
    rows = [{"reliability": 1.0, "generalization": 0.5, "locality": 1.0, "efficacy": 1.0, "pre_reliability": 0.0},
            {"reliability": 0.0, "generalization": 0.5, "locality": 0.5, "efficacy": 0.0, "pre_reliability": 0.0}]
    out = summarize(rows, params_modified=50, base_params=1000)
    assert out["reliability"] == 0.5 and out["generalization"] == 0.5 and out["locality"] == 0.75
    assert out["efficacy"] == 0.5 and out["params_modified"] == 50 and out["params_modified_fraction"] == 0.05
    assert out["per_request"] == rows
