"""Shared fixtures: tiny random models (Llama, GPT-2, BERT) and the real SmolLM2 directory."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import BUILDERS, save_model_dir  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread per test: on a shared 2-core machine two OpenMP threads under load run many
    times slower (measured up to 13x), and the DDP test runs two processes at once anyway."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (converted once per machine, then cached)."""
    from roselora_export.models import demo_model_dir

    return demo_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, smollm_dir) -> dict[str, Path]:
    """Saved tiny models by architecture; the causal LMs carry SmolLM2's tokenizer so text prompts work."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for arch, build in BUILDERS.items():
        vocab = 49152 if arch in ("llama", "gpt2") else 128
        model = build(vocab_size=vocab)
        dirs[arch] = save_model_dir(model, root / arch, tokenizer_from=smollm_dir if arch != "bert" else None)
    return dirs
