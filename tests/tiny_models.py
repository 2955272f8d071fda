"""Tiny random models built from configs, saved as local Hugging Face directories (no hub)."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers


def tiny_llama(seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               tie_word_embeddings=True)
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cfg.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def tiny_bert(seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64, num_labels=2)
    cfg.update(overrides)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**cfg)).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def save_model_dir(model: transformers.PreTrainedModel, path: Path, *, tokenizer_from: Path | None = None) -> Path:
    """Write `model` as a safetensors model directory (optionally with a tokenizer copied from another dir)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer_from is not None:
        transformers.AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(str(path))
    return path
