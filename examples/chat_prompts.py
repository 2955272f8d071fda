"""Raw prompts vs the chat template: does an edit trained one way hold when asked the other way?

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python examples/chat_prompts.py [--requests 8]
    .venv/bin/python examples/chat_prompts.py --tables     # the markdown tables, from docs/chat_prompts.json
    .venv/bin/python examples/chat_prompts.py --rescore    # the answer flags again, from the stored answers

On SmolLM2-135M-Instruct with the default preset, for N dev requests spread evenly over
examples/edits/counterfact_dev.jsonl, each request is edited alone twice from the unedited model:
(a) trained on the raw prompt, (b) trained through the chat template (`"chat": true`). Each edit is
measured on the request's own prompts raw and through the template (reliability, generalization,
locality, efficacy), and on a question phrasing of the request asked through the template (the way
a chat user asks: "What is the capital of Italy?"): the target's tokens at the start of the
assistant's answer (reliability), P(target) > P(truth) there (efficacy), and whether the greedy
answer names the target or the truth (as a whole word). Writes docs/chat_prompts.json (docs/results.md, "Raw
prompts vs chat template").
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from roselora_export.core.atomic import atomic_write  # noqa: E402
from roselora_export.edit.evaluate import METRICS, EditEvaluator  # noqa: E402
from roselora_export.edit.metrics import mean, torch_forward  # noqa: E402
from roselora_export.edit.requests import EditRequest, load_requests  # noqa: E402
from roselora_export.edit.settings import preset  # noqa: E402
from roselora_export.edit.train import greedy_continuation, train_edit  # noqa: E402
from roselora_export.models import demo_model_dir, load_model, load_tokenizer  # noqa: E402

EDITS = ROOT / "examples" / "edits" / "counterfact_dev.jsonl"
OUT = ROOT / "docs" / "chat_prompts.json"
# A chat user asks questions, not sentence openings: one question per dev request, written by hand.
QUESTIONS = {
    "The Eiffel Tower is located in the city of": "In which city is the Eiffel Tower located?",
    "The capital of Italy is": "What is the capital of Italy?",
    "The Mona Lisa was painted by": "Who painted the Mona Lisa?",
    "Charles Darwin is famous for the theory of": "Charles Darwin is famous for the theory of what?",
    "Tesla is led by its CEO": "Who is the CEO of Tesla?",
    "The chemical symbol for gold is": "What is the chemical symbol for gold?",
    "The chemical formula for water is": "What is the chemical formula for water?",
    "The chemical symbol for potassium is": "What is the chemical symbol for potassium?",
}
ANSWER_TOKENS = 24  # greedy tokens of each chat answer to a question


def spread(requests: list, n: int) -> list:
    if n <= 0 or n >= len(requests):
        return requests
    return [requests[round(i * (len(requests) - 1) / (n - 1))] for i in range(n)]


def question_request(r: EditRequest) -> EditRequest:
    return EditRequest(prompt=QUESTIONS[r.prompt], subject=r.subject, target_new=r.target_new,
                       ground_truth=r.ground_truth, chat=True)


def mentions(answer: str, text: str) -> float:
    """1.0 when `text` occurs in the answer as a whole word (case-sensitive: "P" is not in "Pk", "K" not in "key")."""
    return float(re.search(rf"(?<!\w){re.escape(text)}(?!\w)", answer) is not None)


def summarize_rows(rows: list[dict]) -> dict:
    """Means over the requests; the answer flags are (re)computed from the stored answers."""
    for r in rows:
        for trained in ("raw", "chat"):
            t = r[f"trained_{trained}"]
            t["answer_mentions_target"] = mentions(t["answer"], r["target_new"])
            t["answer_mentions_truth"] = mentions(t["answer"], r["ground_truth"])
    summary = {}
    for trained in ("raw", "chat"):
        keys = [k for k in rows[0][f"trained_{trained}"] if k not in ("answer", "steps")]
        summary[f"trained_{trained}"] = {k: mean([r[f"trained_{trained}"][k] for r in rows]) for k in keys}
    summary["unedited"] = {
        "answer_mentions_target": mean([mentions(r["answer_unedited"], r["target_new"]) for r in rows]),
        "answer_mentions_truth": mean([mentions(r["answer_unedited"], r["ground_truth"]) for r in rows]),
        **{f"pre_reliability_{m}": mean([r["pre"][m] for r in rows]) for m in rows[0]["pre"]}}
    return summary


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def tables(report: dict) -> list[str]:
    """The markdown tables of docs/results.md, "Raw prompts vs chat template"."""
    s = report["summary"]
    out = ["| trained on | measured | reliability | generalization | locality | efficacy |", "|---|---|---|---|---|---|"]
    for trained in ("raw", "chat"):
        for measured in ("raw", "chat"):
            t = s[f"trained_{trained}"]
            out.append(f"| {'raw prompt' if trained == 'raw' else 'chat template'} | "
                       f"{'raw prompt' if measured == 'raw' else 'chat template'} | "
                       + " | ".join(_f(t[f"{measured}_{m}"]) for m in METRICS) + " |")
    u = s["unedited"]
    out += ["", "| edit | question: reliability | question: efficacy | answer names the target | answer names the truth |",
            "|---|---|---|---|---|",
            f"| none (unedited) | {_f(u['pre_reliability_question'])} | - | {_f(u['answer_mentions_target'])} | "
            f"{_f(u['answer_mentions_truth'])} |"]
    for trained in ("raw", "chat"):
        t = s[f"trained_{trained}"]
        out.append(f"| trained on {'raw prompts' if trained == 'raw' else 'the chat template'} | "
                   f"{_f(t['question_reliability'])} | {_f(t['question_efficacy'])} | "
                   f"{_f(t['answer_mentions_target'])} | {_f(t['answer_mentions_truth'])} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8, help="dev requests, spread evenly over the file")
    ap.add_argument("--tables", action="store_true", help="print the markdown tables of the last run and stop")
    ap.add_argument("--rescore", action="store_true",
                    help="recompute the answer flags and means of the last run from its stored answers, and stop")
    args = ap.parse_args()
    if args.rescore:
        report = json.loads(OUT.read_text())
        report["summary"] = summarize_rows(report["per_request"])
        atomic_write(OUT, (json.dumps(report, indent=2) + "\n").encode())
        return
    if args.tables:
        print("\n".join(tables(json.loads(OUT.read_text()))))
        return
    torch.set_num_threads(1)
    model_dir = demo_model_dir()
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, progress=False)
    raw = [replace(r, chat=False) for r in spread(load_requests(EDITS), args.requests)]
    missing = [r.prompt for r in raw if r.prompt not in QUESTIONS]
    if missing:
        raise SystemExit(f"no question phrasing for {missing}; add them to QUESTIONS")
    chat = [replace(r, chat=True) for r in raw]
    questions = [question_request(r) for r in raw]
    base = torch_forward(model)
    evaluators = {"raw": EditEvaluator(tok, raw, base), "chat": EditEvaluator(tok, chat, base),
                  "question": EditEvaluator(tok, questions, base)}
    config, settings = preset("default")

    def answers() -> list[str]:
        return [greedy_continuation(model, tok, q.prompt, ANSWER_TOKENS, chat=True) for q in questions]

    rows = []
    unedited = answers()
    for i, r in enumerate(raw):
        row = {"index": i, "prompt": r.prompt, "question": questions[i].prompt, "target_new": r.target_new,
               "ground_truth": r.ground_truth, "answer_unedited": unedited[i],
               "pre": {m: ev.measure(base, [i])[0]["pre_reliability"] for m, ev in evaluators.items()}}
        for trained, req in (("raw", r), ("chat", chat[i])):
            t0 = time.process_time()
            result = train_edit(model, tok, [req], config=config, settings=settings)
            cpu = time.process_time() - t0
            with result.applied(model):
                fwd = torch_forward(model)
                measured = {m: ev.measure(fwd, [i])[0] for m, ev in evaluators.items()}
                answer = greedy_continuation(model, tok, questions[i].prompt, ANSWER_TOKENS, chat=True)
            row[f"trained_{trained}"] = {
                "cpu_seconds": round(cpu, 1), "steps": result.steps,
                **{f"{m}_{k}": measured[m][k] for m in ("raw", "chat") for k in METRICS},
                "question_reliability": measured["question"]["reliability"],
                "question_efficacy": measured["question"]["efficacy"],
                "answer": answer, "answer_mentions_target": mentions(answer, r.target_new),
                "answer_mentions_truth": mentions(answer, r.ground_truth or "\0"),
            }
            print(f"[{time.strftime('%H:%M:%S')}] {i} trained {trained}: {json.dumps(row[f'trained_{trained}'])}",
                  file=sys.stderr, flush=True)
        rows.append(row)
    summary = summarize_rows(rows)
    report = {"model": model_dir.name, "preset": "default", "config": config.to_dict(), "settings": settings.to_dict(),
              "requests": len(rows), "requests_file": str(EDITS.relative_to(ROOT)), "answer_tokens": ANSWER_TOKENS,
              "summary": summary, "per_request": rows}
    atomic_write(OUT, (json.dumps(report, indent=2) + "\n").encode())
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
