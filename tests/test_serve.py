"""`roselora-export serve`: OpenAI-compatible answers from a live model, signed patches applied and reverted
over HTTP (loopback only), every refusal leaving the model bit-identical, and a churn test under load."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from roselora_export.cli import main
from roselora_export.serve import ServerThread
from roselora_export.serve.client import Admin, AdminError
from roselora_export.signing import sign_patch, signature_path
from serve_helpers import (MAX_TOKENS, PROMPTS, TOKEN, admin, answers, client, complete, files, refused,  # noqa: F401
                           server)
from test_runtime_helpers import state_hash
from tiny_models import tiny_llama


# ---- answering ------------------------------------------------------------------------------------
def test_health_and_models_answer_once_loaded(server):
    c = client(server["url"])
    assert [m.id for m in c.models.list().data] == [server["served"].engine.name]
    with urllib.request.urlopen(server["url"] + "/health", timeout=30) as resp:
        assert resp.status == 200
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["patches"] == 0 and health["device"] == "cpu"


def test_greedy_completions_and_chat_through_the_openai_client(server):
    c = client(server["url"])
    first, state = complete(c, PROMPTS[0])
    assert state == "base" and first == complete(c, PROMPTS[0])[0]
    r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert r.usage.completion_tokens <= MAX_TOKENS and r.choices[0].finish_reason in ("length", "stop")
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
                                     temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4
    assert chat.system_fingerprint == "base"


def test_stop_sequences_cut_the_answer_and_finish_it_with_stop(server):
    c = client(server["url"])
    full, _ = complete(c, PROMPTS[1])
    stop = full[len(full) // 2:len(full) // 2 + 2]
    r = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_sampling_above_temperature_zero_answers_too(server):
    r = client(server["url"]).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0.8,
                                                 top_p=0.9)
    assert r.usage.completion_tokens <= 3 and r.system_fingerprint == "base"


def test_a_request_beyond_the_context_is_a_400(server):
    import openai

    with pytest.raises(openai.BadRequestError, match="context"):
        client(server["url"]).completions.create(model="tiny", prompt="Hi", max_tokens=1000, temperature=0)


@pytest.mark.parametrize("concurrency", [1, None])
def test_concurrency_bounds_the_answers_generated_at_once(files, concurrency):
    from roselora_export.models import load_tokenizer
    from roselora_export.serve.engine import Engine

    engine = Engine(tiny_llama(vocab_size=49152), load_tokenizer(files["model"]), "tiny", concurrency=concurrency)
    ids = engine.encode_text(PROMPTS[0])
    inside, go, entered = threading.Event(), threading.Event(), []

    def held(state: str) -> None:
        entered.append("first")
        inside.set()
        go.wait(30)

    first = threading.Thread(target=lambda: engine.generate([ids], max_tokens=2, on_state=held))
    second = threading.Thread(target=lambda: engine.generate([ids], max_tokens=2,
                                                             on_state=lambda s: entered.append("second")))
    first.start()
    assert inside.wait(30)
    second.start()
    second.join(1.0)
    assert entered == (["first"] if concurrency == 1 else ["first", "second"])
    go.set()
    first.join(30)
    second.join(30)
    assert entered == ["first", "second"]


def test_queued_answers_get_their_slot_in_arrival_order():
    from roselora_export.serve.engine import FifoSlots

    slots, order, go = FifoSlots(1), [], threading.Event()
    holder = threading.Thread(target=lambda: (slots.__enter__(), go.wait(30), slots.__exit__(None, None, None)))
    holder.start()
    waiters = []
    for k in range(5):
        def wait_turn(k=k):
            with slots:
                order.append(k)
        waiters.append(threading.Thread(target=wait_turn))
        waiters[-1].start()
        deadline = time.monotonic() + 30
        while len(slots._waiting) < k + 1 and time.monotonic() < deadline:  # queued before the next arrives
            time.sleep(0.001)
    go.set()
    for t in [holder, *waiters]:
        t.join(30)
    assert order == [0, 1, 2, 3, 4]


# ---- patches --------------------------------------------------------------------------------------
def test_post_applies_a_signed_patch_and_delete_restores_every_bit(server, files, admin):
    c = client(server["url"])
    base = answers(c)
    entry = admin.push(files["a"])
    assert entry["sha256"] == hashlib.sha256(files["a"].read_bytes()).hexdigest()
    assert entry["nnz"] > 0 and entry["provenance"]["base_model"] == files["model"].name
    assert [e["id"] for e in admin.list()] == [entry["id"]]
    patched = answers(c)
    assert patched != base
    assert complete(c, PROMPTS[0])[1] == f"patches:{entry['id']}"
    admin.revert(entry["id"])
    assert answers(c) == base


def test_a_reverted_patch_can_be_posted_again(server, files, admin):
    first = admin.push(files["a"])
    admin.revert(first["id"])
    second = admin.push(files["a"])
    assert second["id"] != first["id"] and second["sha256"] == first["sha256"]
    admin.revert(second["id"])


def test_delete_is_409_naming_the_later_overlapping_patch(server, files, admin):
    a = admin.push(files["a"])
    c = admin.push(files["c"])  # built on top of A: it applies only with A in place
    model = server["served"].engine.model
    stacked = state_hash(model)
    with pytest.raises(AdminError) as err:
        admin.revert(a["id"])
    assert err.value.status == 409 and f"patch {c['id']}" in err.value.message
    assert [e["id"] for e in admin.list()] == [a["id"], c["id"]] and state_hash(model) == stacked
    admin.revert(c["id"])
    admin.revert(a["id"])


def test_missing_or_wrong_admin_token_is_401(server, files, admin):
    for token in (None, "wrong-token-wrong-token-wrong"):
        other = Admin(server["url"], token)
        refused(server, 401, lambda: other.push(files["a"]))
        refused(server, 401, lambda: other.list())
        refused(server, 401, lambda: other.revert("1"))


def test_an_unauthorized_delete_leaves_the_applied_patch_in_place(server, files, admin):
    """No token, a wrong token, and the right token under another scheme than Bearer: 401, patch still on."""
    import base64
    import urllib.error

    entry = admin.push(files["a"])
    model = server["served"].engine.model
    patched = state_hash(model)
    try:
        for other in (Admin(server["url"], None), Admin(server["url"], "wrong-token-wrong-token-wrong")):
            with pytest.raises(AdminError) as err:
                other.revert(entry["id"])
            assert err.value.status == 401
        basic = "Basic " + base64.b64encode(TOKEN.encode()).decode()
        req = urllib.request.Request(f"{server['url']}/v1/patches/{entry['id']}", method="DELETE",
                                     headers={"Authorization": basic})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 401
        assert state_hash(model) == patched and [e["id"] for e in admin.list()] == [entry["id"]]
    finally:
        admin.revert(entry["id"])


def test_unsigned_patch_is_403(server, files, admin, tmp_path):
    unsigned = tmp_path / "a.patch.safetensors"
    shutil.copy(files["a"], unsigned)
    assert "unsigned" in refused(server, 403, lambda: admin.push(unsigned))


def test_patch_signed_by_an_untrusted_key_is_403(server, files, admin, tmp_path):
    patch = tmp_path / "a.patch.safetensors"
    shutil.copy(files["a"], patch)
    sign_patch(patch, files["stranger"])
    assert "does not verify" in refused(server, 403, lambda: admin.push(patch))


def test_patch_changed_after_signing_is_403(server, files, admin, tmp_path):
    patch = tmp_path / "a.patch.safetensors"
    shutil.copy(files["corrupt"], patch)  # the corrupt bytes under A's genuine signature
    shutil.copy(signature_path(files["a"]), signature_path(patch))
    assert "does not verify" in refused(server, 403, lambda: admin.push(patch))


def test_a_signature_part_that_is_not_a_signature_is_403(server, files, admin):
    for junk in (b"not a signature", b"{}", bytes(range(256))):
        assert "does not verify" in refused(server, 403, lambda: admin.push_bytes(files["a"].read_bytes(), junk,
                                                                               files["a"].name))


def test_corrupt_signed_patch_is_400(server, files, admin):
    assert "corrupt" in refused(server, 400, lambda: admin.push(files["corrupt"]))


def test_patch_for_another_base_is_409(server, files, admin):
    """Same shapes, other weights (the touched base bits do not match), and another config altogether."""
    refused(server, 409, lambda: admin.push(files["other"]))
    assert "config" in refused(server, 409, lambda: admin.push(files["other_config"]))


def test_patch_already_applied_is_409(server, files, admin):
    a = admin.push(files["a"])
    try:
        with pytest.raises(AdminError) as err:
            admin.push(files["a"])
        assert err.value.status == 409 and "already applied" in err.value.message
    finally:
        admin.revert(a["id"])


def test_unknown_patch_id_is_404(server, admin):
    refused(server, 404, lambda: admin.revert("999"))


def test_post_without_a_patch_part_is_400(server, admin):
    refused(server, 400, lambda: admin.request("POST", "/v1/patches", b"{}", "application/json"))


def test_without_an_admin_token_file_the_patch_endpoints_are_off(files, tiny_model_dirs):
    from roselora_export.models import load_tokenizer
    from roselora_export.serve.app import create_app
    from roselora_export.serve.engine import Engine
    from roselora_export.serve.patches import PatchStore

    engine = Engine(tiny_llama(vocab_size=49152), load_tokenizer(files["model"]), "tiny")
    before = state_hash(engine.model)
    with ServerThread(create_app(engine, PatchStore(engine.runtime), None)) as url:
        with pytest.raises(AdminError) as err:
            Admin(url, TOKEN).push(files["a"])
    assert err.value.status == 403 and "--admin-token-file" in err.value.message
    assert state_hash(engine.model) == before


# ---- churn ----------------------------------------------------------------------------------------
CLIENTS, CYCLES = 4, 24


def streamed(c, prompt: str) -> tuple[str, str]:
    """A streamed greedy completion: (joined text, the one state every chunk names)."""
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True))
    states = {ch.system_fingerprint for ch in chunks}
    assert len(states) == 1, states
    return "".join(ch.choices[0].text for ch in chunks), states.pop()


def test_churn_four_clients_while_a_patch_is_applied_and_reverted_dozens_of_times(server, files, admin):
    """Zero failed requests; each answer (client 0's streamed) is the base or the patched greedy answer, as its
    state says; the bits are the base's after the last revert."""
    c = client(server["url"])
    base = answers(c)
    entry = admin.push(files["a"])
    patched = answers(c)
    admin.revert(entry["id"])
    assert base != patched

    stop = threading.Event()
    results: list[tuple[str, str, str]] = []  # (prompt, text, state)
    errors: list[BaseException] = []
    answered = threading.Condition()

    def ask(k: int) -> None:
        me, rng = client(server["url"]), random.Random(k)
        while not stop.is_set():
            prompt = rng.choice(PROMPTS)
            try:
                text, state = (streamed if k == 0 else complete)(me, prompt)  # client 0 streams
            except BaseException as err:  # a failed request fails the test
                errors.append(err)
                return
            with answered:
                results.append((prompt, text, state))
                answered.notify_all()

    def answered_from(state: str, since: int) -> bool:
        """Wait until a request completed after `since` results was answered from `state`."""
        with answered:
            return answered.wait_for(lambda: errors or any(s == state for _, _, s in results[since:]), timeout=30)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    applied_ids = []
    try:
        for _ in range(CYCLES):
            # Each state is held until some client was answered from it, so the states really interleave.
            since = len(results)
            applied_ids.append(admin.push(files["a"])["id"])
            assert answered_from(f"patches:{applied_ids[-1]}", since)
            since = len(results)
            admin.revert(applied_ids[-1])
            assert answered_from("base", since)
    finally:
        stop.set()
        for t in threads:
            t.join(60)

    assert errors == []
    states = {s for _, _, s in results}
    assert states == {"base"} | {f"patches:{i}" for i in applied_ids}
    for prompt, text, state in results:
        assert text == (base if state == "base" else patched)[prompt], (prompt, state)
    assert len(results) >= 2 * CYCLES
    assert state_hash(server["served"].engine.model) == server["base_hash"]


# ---- the command ----------------------------------------------------------------------------------
def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        h.update(p.read_bytes() if p.is_file() else b"/")
    return h.hexdigest()


def test_serve_refuses_a_short_admin_token_before_loading_the_model(files, tmp_path):
    (tmp_path / "token").write_text("short\n")
    result = CliRunner().invoke(main, ["serve", "--model", str(files["model"]), "--port", "0", "--device", "cpu",
                                       "--admin-token-file", str(tmp_path / "token")])
    assert result.exit_code == 2 and "at least 16 characters" in result.output


def _quietly(call) -> None:
    try:
        call()
    except Exception:  # the server may be killed under it
        pass


def test_serve_refuses_to_start_with_an_unsigned_startup_patch(files, tmp_path):
    unsigned = tmp_path / "a.patch.safetensors"
    shutil.copy(files["a"], unsigned)
    result = CliRunner().invoke(main, ["serve", "--model", str(files["model"]), "--port", "0", "--device", "cpu",
                                       "--trusted-key", str(files["pub"]), "--patch", str(unsigned)])
    assert result.exit_code == 2 and "no signature" in result.output


@pytest.mark.slow
def test_a_killed_server_leaves_the_model_directory_as_it_was(files, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(files["model"], model)
    before = tree_hash(model)
    cli = Path(sys.executable).with_name("roselora-export")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(cli), "serve", "--model", str(model), "--port", "0", "--device", "cpu",
                             "--admin-token-file", str(files["token"]), "--trusted-key", str(files["pub"]),
                             "--patch", str(files["a"]), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 180
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "serving" in line, "the server did not start"
        url = line.split(" on ")[1].split()[0]
        c = client(url)
        assert complete(c, PROMPTS[0])[1] == "patches:1"  # the start-up patch, signed beside it
        entry = Admin(url, TOKEN).push(files["c"])
        assert complete(c, PROMPTS[0])[1] == f"patches:1,{entry['id']}"
        # Killed with a revert and a request possibly in flight.
        for call in (lambda: Admin(url, TOKEN).revert(entry["id"]), lambda: complete(client(url), PROMPTS[1])):
            threading.Thread(target=_quietly, args=(call,), daemon=True).start()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert tree_hash(model) == before
