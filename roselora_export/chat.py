"""Chat prompts for instruct models: a prompt asked as one user turn through the tokenizer's chat template.

    ids = prompt_ids(tokenizer, "What is the capital of Japan?", chat=True)
    # = tokens of apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True),
    #   so what follows them is the assistant's answer

A raw prompt (chat=False) is tokenized as is, with the tokenizer's special tokens. The templated text
already carries its special tokens, so it is tokenized without adding them again. A tokenizer
without a chat template and chat=True is an InputError. Used by edit (training and measuring) and
by `try`, so that an edit is trained and asked in the same form.
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


def answer_sep(chat: bool) -> str:
    """What joins a prompt and its answer: nothing after a chat turn, one space after a raw prompt."""
    return CHAT_SEP if chat else RAW_SEP
