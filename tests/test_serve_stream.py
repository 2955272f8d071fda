"""Streaming (`"stream": true`, server-sent events) through the official openai client on loopback: the
pieces join to the non-streamed answer, every chunk names one weight state, a patch posted mid-stream
waits for the stream, and a client that goes away stops its generation."""
from __future__ import annotations

import threading
import time

import openai
import pytest

from roselora_export.serve.client import Admin
from serve_helpers import MAX_TOKENS, PROMPTS, TOKEN, admin, answers, client, complete, files, server  # noqa: F401


def streamed(c, prompt: str, **kw) -> tuple[str, set[str], list]:
    """(joined text, the system_fingerprints of the chunks, the chunks) of a streamed greedy completion."""
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=kw.pop("max_tokens", MAX_TOKENS),
                                       temperature=0, stream=True, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    return text, {ch.system_fingerprint for ch in chunks}, chunks


def test_a_streamed_completion_joins_to_the_whole_answer(server):
    c = client(server["url"])
    for prompt in PROMPTS:
        whole = c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        text, states, chunks = streamed(c, prompt)
        assert text == whole.choices[0].text and states == {"base"}
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])


def test_a_streamed_completion_of_several_prompts_indexes_each_answer(server):
    c = client(server["url"])
    whole = c.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(c.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True))
    for choice in whole.choices:
        mine = [ch.choices[0] for ch in chunks if ch.choices[0].index == choice.index]
        assert "".join(m.text for m in mine) == choice.text
        assert [m.finish_reason for m in mine if m.finish_reason] == [choice.finish_reason]


def test_a_streamed_completion_stops_at_a_stop_sequence_without_sending_it(server):
    c = client(server["url"])
    full, _ = complete(c, PROMPTS[1])
    stop = full[len(full) // 2:len(full) // 2 + 2]
    text, _, chunks = streamed(c, PROMPTS[1], stop=[stop])
    assert text == full[:full.find(stop)] and chunks[-1].choices[0].finish_reason == "stop"


def test_a_streamed_chat_sends_the_role_then_the_content(server):
    c = client(server["url"])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.system_fingerprint == "base" for ch in chunks)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert content == whole.choices[0].message.content
    finished = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert [f.choices[0].finish_reason for f in finished] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stream_too_long_for_the_context_is_a_400_before_it_starts(server):
    with pytest.raises(openai.BadRequestError, match="context"):
        client(server["url"]).completions.create(model="tiny", prompt="Hi", max_tokens=1000, temperature=0,
                                                 stream=True)


def test_a_patch_posted_mid_stream_waits_for_it_and_the_stream_keeps_one_state(server, files, admin):
    """The engine is held after its first piece of text, so the POST surely arrives mid-stream."""
    c = client(server["url"])
    base, engine = answers(c), server["served"].engine
    entry = admin.push(files["a"])
    patched = answers(c)
    admin.revert(entry["id"])
    prompt = next(p for p in PROMPTS if base[p] != patched[p])

    first_piece, go = threading.Event(), threading.Event()
    real = engine.generate

    def held(*args, on_text=None, **kw):
        def hold(i, piece):
            if not first_piece.is_set():
                first_piece.set()
                go.wait(30)
            on_text(i, piece)
        return real(*args, on_text=hold if on_text is not None else None, **kw)

    engine.generate = held
    out, posted = {}, {}
    try:
        reader = threading.Thread(target=lambda: out.update(zip(("text", "states", "chunks"), streamed(c, prompt))))
        reader.start()
        assert first_piece.wait(30)
        poster = threading.Thread(target=lambda: posted.update(admin.push(files["a"])))
        poster.start()
        time.sleep(0.5)
        assert posted == {}  # the write waits for the stream in flight
        go.set()
        reader.join(60)
        poster.join(60)
    finally:
        go.set()
        engine.generate = real
    assert out["states"] == {"base"} and out["text"] == base[prompt]
    assert complete(c, prompt) == (patched[prompt], f"patches:{posted['id']}")
    text, states, _ = streamed(c, prompt)
    assert (text, states) == (patched[prompt], {f"patches:{posted['id']}"})
    admin.revert(posted["id"])


def test_a_client_that_leaves_mid_stream_stops_the_generation(server, files, admin):
    """A long stream (each piece slowed down here) abandoned after its first chunk stops generating within
    a few tokens, so it does not hold the weights: a POST then goes through."""
    engine, c = server["served"].engine, client(server["url"])
    longest = engine.context - 8
    whole = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=longest, temperature=0)
    assert whole.usage.completion_tokens > 20  # no early end of sequence: a cut short stream shows
    counted = []
    real = engine.generate

    def slow(*args, on_text=None, **kw):
        def late(i, piece):
            time.sleep(0.05)
            on_text(i, piece)
        gen = real(*args, on_text=late if on_text is not None else None, **kw)
        counted.append(gen.answers[0].completion_tokens)
        return gen

    engine.generate = slow
    try:
        stream = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=longest, temperature=0, stream=True)
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 30
        while not counted and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        engine.generate = real
    assert counted and counted[0] < whole.usage.completion_tokens // 2, counted
    entry = Admin(server["url"], TOKEN).push(files["a"])
    admin.revert(entry["id"])


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
def test_the_same_server_on_cuda_streams_patches_and_reverts_bit_for_bit(files):
    """--device cuda runs the same code: answers match the CPU server's, a POST lands between streams, and
    the bits after the revert are the base's."""
    from roselora_export.serve import ServerThread, build_app
    from test_runtime_helpers import state_hash

    served = build_app(files["model"], device="cuda", admin_token_file=files["token"], trusted_keys=[files["pub"]])
    assert served.engine.device.type == "cuda"
    base_hash = state_hash(served.engine.model)
    with ServerThread(served.app) as url:
        c, admin_ = client(url), Admin(url, TOKEN)
        base = answers(c)
        entry = admin_.push(files["a"])
        patched = answers(c)
        text, states, _ = streamed(c, PROMPTS[0])
        assert (text, states) == (patched[PROMPTS[0]], {f"patches:{entry['id']}"}) and patched != base
        admin_.revert(entry["id"])
        assert answers(c) == base
    assert state_hash(served.engine.model) == base_hash
