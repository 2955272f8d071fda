"""Chat prompts for instruct models: a prompt asked as one user turn through the tokenizer's chat template.

    ids = prompt_ids(tokenizer, "What is the capital of Japan?", chat=True)
    # = tokens of apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True),
    #   so what follows them is the assistant's answer

A raw prompt is tokenized as is, with the tokenizer's special tokens; the templated text carries its
own. chat=True without a chat template is an InputError. Shared by edit and `try`, so an edit is trained
and asked in the same form.
"""
from __future__ import annotations

from .errors import InputError

CHAT_SEP = ""  # the answer starts the assistant turn; a raw prompt's answer follows it after one space
RAW_SEP = " "


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer, where: str = "--chat") -> None:
    """InputError (one line) unless the tokenizer has a chat template."""
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise InputError(f"{where}: the tokenizer of {name} has no chat template (not an instruct/chat model); "
                         "ask with raw prompts instead")


def chat_text(tokenizer, prompt: str, where: str = "--chat") -> str:
    """The prompt as one user turn, followed by the opening of the assistant's turn."""
    require_chat_template(tokenizer, where)
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ({"role", "content"} dicts) up to the assistant's turn, through the chat
    template; a tokenizer without one gets plain 'role: content' lines and 'assistant:'."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")["input_ids"])


def prompt_ids(tokenizer, prompt: str, chat: bool = False, where: str = "--chat") -> list[int]:
    """Token ids of the prompt: raw (with the tokenizer's special tokens) or through the chat template."""
    if chat:
        require_chat_template(tokenizer, where)
        return conversation_ids(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt)["input_ids"])


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad token id, else its end-of-sequence id, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int = 8, chat: bool = False) -> str:
    """The model's greedy continuation of `prompt` (new tokens only, decoded without special tokens), run in
    eval mode; chat=True asks it as a chat turn."""
    import torch

    ids = torch.tensor([prompt_ids(tokenizer, prompt, chat)], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_id_of(tokenizer))
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def answer_sep(chat: bool) -> str:
    """What joins a prompt and its answer: nothing after a chat turn, one space after a raw prompt."""
    return CHAT_SEP if chat else RAW_SEP
