"""Context prefixes: short texts the model generates itself, put before an edit's prompt while training.

ROME, MEMIT and WISE train the new fact after such prefixes so the edit holds in context and under
paraphrase rather than only after the exact prompt. Generation is seeded (top-k 5 sampling, as
ROME's `generate_fast`), so the same model and settings give the same prefixes on every run.
"""
from __future__ import annotations

import torch

from ..errors import InputError

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")  # ROME's seeds
TOP_K = 5
_CACHE: dict[tuple, list[str]] = {}


def can_generate(model: torch.nn.Module) -> bool:
    """Whether the model is a causal LM that `generate` can sample from."""
    from transformers import GenerationMixin

    return isinstance(model, GenerationMixin) and not getattr(model.config, "is_encoder_decoder", False) \
        and type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


@torch.no_grad()
def context_prefixes(model: torch.nn.Module, tokenizer, n: int, length: int, seed: int = 0) -> list[str]:
    """n prefixes of `length` new tokens each, one seed word after another; each ends with '. '.

    Cached per (model, n, length, seed): a benchmark of many edits generates them once, from the
    unedited model. InputError if the model cannot generate text.
    """
    if n == 0:
        return []
    if not can_generate(model):
        raise InputError(f"--prefixes {n}: context prefixes need a model that generates text "
                         f"({type(model).__name__} does not); pass --prefixes 0")
    key = (id(model), getattr(model.config, "_name_or_path", ""), n, length, seed)
    if key not in _CACHE:
        _CACHE[key] = [_generate(model, tokenizer, SEED_WORDS[i % len(SEED_WORDS)], length, seed * 1009 + i)
                       for i in range(n)]
    return list(_CACHE[key])


def _generate(model: torch.nn.Module, tokenizer, seed_word: str, length: int, seed: int) -> str:
    from .data import pad_id_of

    device = next(model.parameters()).device
    enc = tokenizer(seed_word, return_tensors="pt").to(device)
    was_training = model.training
    model.eval()
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = model.generate(**enc, max_new_tokens=length, min_new_tokens=length, do_sample=True, top_k=TOP_K,
                             top_p=1.0, temperature=1.0, pad_token_id=pad_id_of(tokenizer))
    finally:
        torch.random.set_rng_state(rng_state)
        model.train(was_training)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    # Brace-free and on one line, as ROME's templates; a full stop separates it from the prompt.
    text = " ".join(text.replace("{", " ").replace("}", " ").split())
    return text.rstrip(".") + ". "
