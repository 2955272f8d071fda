"""`roselora-export train`: fine-tuning data, one process and two (torchrun, DDP over gloo on CPU)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from roselora_export.cli import main
from roselora_export.edit.data import IGNORE, load_train_data
from roselora_export.edit.finetune import batch_indices
from roselora_export.errors import InputError
from roselora_export.models import load_tokenizer



FAST = ["--steps", "8", "--t-init", "0.25", "--t-final", "0.75", "--rank", "4", "--tau", "0.1",
        "--batch-size", "2", "--lr", "1e-2", "--no-progress"]


def _data(tmp_path, n=12):
    path = tmp_path / "data.jsonl"
    lines = []
    for i in range(n):
        if i % 3 == 0:
            lines.append({"text": f"Fact number {i}: the sky over city {i} is green."})
        else:
            lines.append({"prompt": f"Question {i}: what colour is the sky over city {i}?", "completion": "Green."})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_prompt_completion_lines_put_the_loss_on_the_completion_only(tiny_model_dirs, tmp_path):
    tok = load_tokenizer(tiny_model_dirs["llama"])
    examples = load_train_data(_data(tmp_path, 3), tok, 64)
    text, pair = examples[0], examples[1]
    assert text.labels == text.input_ids
    n_prompt = len(tok("Question 1: what colour is the sky over city 1?")["input_ids"])
    assert pair.labels[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in pair.labels[n_prompt:]


def test_a_data_line_without_text_or_prompt_names_the_line(tiny_model_dirs, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "this line is fine"}\n{"answer": "x"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl line 2: missing field 'text'"):
        load_train_data(path, load_tokenizer(tiny_model_dirs["llama"]), 64)


def test_each_rank_takes_a_disjoint_share_of_every_global_batch():
    for step in (1, 2, 7):
        a = batch_indices(12, step, 3, 0, 2, seed=0)
        b = batch_indices(12, step, 3, 1, 2, seed=0)
        assert len(a) == len(b) == 3 and not set(a) & set(b)


def test_train_writes_a_sparse_adapter_in_one_process(tiny_model_dirs, tmp_path):
    out = tmp_path / "ft"
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model_dirs["llama"]), "--data", str(_data(tmp_path)),
                                       "--out", str(out), "--json", *FAST])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["steps_run"] == 8 and info["examples"] == 12 and info["world_size"] == 1
    assert info["config"]["t_init"] == 0.25
    for m in info["modules"].values():
        assert m["max_nnz_row_A"] <= m["kept_per_row_A"] and m["max_nnz_col_B"] <= m["kept_per_col_B"]
    assert (out / "adapter_config.json").is_file()


WORKER = textwrap.dedent('''
    """Runs the unchanged `train` CLI under torchrun and dumps this rank's final adapter and masks."""
    import os, sys
    import torch
    from safetensors.torch import save_file
    import roselora_export.edit.finetune as ft
    from roselora_export.cli import main

    captured = {}
    original = ft.train_finetune
    def capture(*args, **kwargs):
        captured["result"] = result = original(*args, **kwargs)
        return result
    ft.train_finetune = capture
    try:
        main(sys.argv[2:], standalone_mode=False)
    finally:
        result = captured["result"]
        state = {}
        for m in result.modules:
            state[m.base_key + ".A"] = m.A.contiguous()
            state[m.base_key + ".B"] = m.B.contiguous()
        state["losses"] = torch.tensor(result.losses)
        save_file(state, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.safetensors"))
''')


def test_two_process_ddp_training_gives_identical_masks_and_weights_on_every_rank(tiny_model_dirs, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(tmp_path),
           "train", "--model", str(tiny_model_dirs["llama"]), "--data", str(_data(tmp_path)), "--out", str(out), *FAST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and len(r0) == 9  # 4 modules x (A, B) + losses
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
        if key.endswith(".A"):
            assert int((r0[key] != 0).sum(dim=1).max()) <= 4  # ceil(0.1 * 32)
    # The adapter written by rank 0 is the one both ranks hold, and records the world size.
    saved = load_file(str(out / "adapter_model.safetensors"))
    a_key = next(k for k in saved if "layers.0.self_attn.q_proj.lora_A" in k)
    assert torch.equal(saved[a_key], r0["model.layers.0.self_attn.q_proj.weight.A"])
    assert json.loads((out / "roselora.json").read_text())["world_size"] == 2
    assert proc.stdout.count("saved:") == 1  # only rank 0 prints


def test_train_with_bad_data_exits_2_and_writes_nothing(tiny_model_dirs, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Q?", "completion": "A."}\n{"prompt": "Q?"}\n')
    out = tmp_path / "ft"
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model_dirs["llama"]), "--data", str(data),
                                       "--out", str(out), *FAST])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == "error: bad.jsonl line 2: missing field 'completion' (use {\"prompt\", \"completion\"} or {\"text\"})"
    assert not out.exists()


def test_train_lora_baseline_is_dense(tiny_model_dirs, tmp_path):
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model_dirs["llama"]), "--data", str(_data(tmp_path)),
                                       "--out", str(tmp_path / "l"), "--method", "lora", "--json", *FAST])
    assert result.exit_code == 0, result.output
    assert all(m["sparsity_BA"] < 0.01 for m in json.loads(result.stdout)["modules"].values())


def test_train_shows_answers_to_the_first_prompts_before_and_after(tiny_model_dirs, tmp_path):
    args = ["train", "--model", str(tiny_model_dirs["llama"]), "--data", str(_data(tmp_path)), *FAST]
    shown = json.loads(CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--json"]).stdout)["answers"]
    assert 1 <= len(shown) <= 3 and all({"prompt", "completion", "before", "after"} <= set(a) for a in shown)
    text = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b")]).stdout
    assert f"prompt: {shown[0]['prompt']}" in text and "before:" in text and "after:" in text
    quiet = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "c"), "--json", "--no-answers"]).stdout
    assert json.loads(quiet)["answers"] == []
