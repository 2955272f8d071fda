"""Serving benchmark: request latency with and without live apply/revert churn, and the time from a
patch upload to the first answer carrying it, against restarting the server on the merged checkpoint.

    .venv/bin/python bench/serve_bench.py                    # CPU, writes section "serve"
    .venv/bin/python bench/serve_bench.py --device cuda --section serve-gpu   # what bench/gpu.sh runs

SmolLM2-135M-Instruct (converted once) is served by `roselora-export serve` in a child process, as a
user runs it, with an admin token and a trusted key. The patch is a merged synthetic RoseLoRA edit
(bench/synthetic_adapter.py: q_proj/v_proj, tau 0.05, entries at ±3e-2 so answers change), signed. N clients (the `openai` client, one
thread each, greedy, max_tokens tokens) send requests back to back, first without changes, then while
an admin thread applies and reverts the patch on a fixed period. Every answer is checked against the
base or the patched greedy answer, as its `system_fingerprint` names its weight state.

Patch to first patched answer: the wall time from starting the POST of the signed patch to receiving
a completion that carries it (idle server; and under churn, the admin thread's own completion after
its POST). Restart: from stopping the server to the first answer of a fresh `serve` on the merged
checkpoint (process start, imports, model load, first answer), what a user does without live patches.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import shutil
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine_line, write_section  # noqa: E402
from bench.synthetic_adapter import write_synthetic_adapter  # noqa: E402

PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of Germany is",
           "The largest planet in the solar system is", "Water boils at a temperature of"]
TOKEN = "bench-admin-token-0123456789abcdef"
CLI = [sys.executable, "-m", "roselora_export.cli"]  # this interpreter's, whatever its environment


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


class Server:
    """`roselora-export serve` in a child process; `url` once it printed its address."""

    started: list["Server"] = []  # every one, stopped at exit whatever happens

    def __init__(self, model: Path, files: Path, device: str, threads: int | None) -> None:
        cmd = [*CLI, "serve", "--model", str(model), "--port", "0", "--device", device, "--log-level", "warning",
               "--admin-token-file", str(files / "token"), "--trusted-key", str(files / "key.pub.pem")]
        if threads:
            cmd += ["--threads", str(threads)]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        Server.started.append(self)
        line = ""
        while "serving" not in line:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
        self.url = line.split(" on ")[1].split()[0]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def complete(c, prompt: str, max_tokens: int) -> tuple[str, str]:
    r = c.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text, r.system_fingerprint


def load(url: str, clients: int, seconds: float, max_tokens: int, expected: dict, churn=None) -> dict:
    """`clients` threads completing back to back for `seconds` (plus `churn()` on a thread): latencies and checks."""
    stop = threading.Event()
    lat: list[float] = []
    answered: list[tuple[float, str]] = []  # (perf_counter at the answer, its state)
    failed, mixed, states = [0], [0], set()
    lock = threading.Lock()

    def ask(k: int) -> None:
        c, i = client(url), k
        while not stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            i += 1
            t0 = time.perf_counter()
            try:
                text, state = complete(c, prompt, max_tokens)
            except Exception:
                with lock:
                    failed[0] += 1
                continue
            t1 = time.perf_counter()
            with lock:
                lat.append(t1 - t0)
                answered.append((t1, state))
                states.add(state)
                if text != expected["base" if state == "base" else "patched"][prompt]:
                    mixed[0] += 1

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(clients)]
    extra = threading.Thread(target=churn, args=(stop,)) if churn else None
    t0 = time.perf_counter()
    for t in threads + ([extra] if extra else []):
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads + ([extra] if extra else []):
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "failed": failed[0], "mixed": mixed[0], "wall_s": wall,
            "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99), "max_s": max(lat), "states": len(states),
            "rps": len(lat) / wall, "answered": answered}


def make_patch(base: Path, tmp: Path) -> tuple[Path, Path]:
    """Merge a synthetic RoseLoRA adapter into base (a child process): (merged dir, signed patch)."""
    from roselora_export.signing import sign_patch

    import bench.synthetic_adapter as synthetic

    # Entries at ±3e-2 (the clamp at which edits take on SmolLM2, README) rather than the authors' 3e-3,
    # so the patch changes answers and a mixed answer would show.
    synthetic.CLAMP = 3e-2
    adapter = write_synthetic_adapter(base, tmp / "adapter")
    subprocess.run([*CLI, "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp / "merged")],
                   check=True, capture_output=True)
    patch = tmp / "merged.patch.safetensors"
    sign_patch(patch, tmp / "key.pem")
    return tmp / "merged", patch


SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=1)


def model_dir_or_synthetic(tmp: Path) -> tuple[Path, str]:
    """The converted SmolLM2 directory, or (where it cannot be had, e.g. on a bare GPU machine without the
    package) a random model of its shape with a word-level tokenizer built here: timings depend on shapes."""
    default = Path.home() / ".cache" / "roselora-export" / "SmolLM2-135M-Instruct"
    if (default / "model.safetensors").is_file():
        return default, "SmolLM2-135M-Instruct"
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp / "smollm2-shape"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_SHAPE)).save_pretrained(str(out))
    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = {"<unk>": 0, "</s>": 1, **{w: i for i, w in enumerate(words, 2)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), SMOLLM2_SHAPE["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(
        str(out))
    return out, "a random model of SmolLM2-135M's shape (no SmolLM2 here), word-level tokenizer"


def write_keys(tmp: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                                    serialization.NoEncryption()))
    (tmp / "key.pub.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp / "token").write_text(TOKEN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    ap.add_argument("--seconds", type=float, default=45, help="length of each load phase (default 45)")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens per answer (default 8)")
    ap.add_argument("--period", type=float, default=3.0, help="seconds per apply+revert cycle under churn (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the patch-vs-restart timing (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads (default 1 on CPU)")
    ap.add_argument("--section", default="serve", help="section of docs/benchmarks.md to write (default serve)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    args = ap.parse_args()
    threads = args.threads or (1 if args.device == "cpu" else None)
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench_", dir="/tmp"))
    try:
        fig = measure(args, tmp, threads)
    finally:
        for server in Server.started:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    body = report(fig, args)
    print(body)
    if not args.no_write:
        write_section(args.section, body)


def measure(args, tmp: Path, threads: int | None) -> dict:
    from roselora_export.serve.client import Admin

    base, label = model_dir_or_synthetic(tmp)
    write_keys(tmp)
    merged, patch = make_patch(base, tmp)
    say(f"merged {merged}; starting the server")

    server = Server(base, tmp, args.device, threads)
    url, admin = server.url, Admin(server.url, TOKEN)
    c = client(url)
    expected = {"base": {p: complete(c, p, args.max_tokens)[0] for p in PROMPTS}}
    entry = admin.push(patch)
    expected["patched"] = {p: complete(c, p, args.max_tokens)[0] for p in PROMPTS}
    admin.revert(entry["id"])
    differ = sum(expected["base"][p] != expected["patched"][p] for p in PROMPTS)

    say(f"serving on {url}; the patch changes {differ} of {len(PROMPTS)} answers; idle patch-to-answer rounds")
    # Patch to first patched answer, idle server.
    live, post = [], []
    for _ in range(args.rounds + 1):
        t0 = time.perf_counter()
        entry = admin.push(patch)
        post.append(time.perf_counter() - t0)
        state = complete(c, PROMPTS[0], args.max_tokens)[1]
        live.append(time.perf_counter() - t0)
        assert state == f"patches:{entry['id']}", state
        admin.revert(entry["id"])
    live, post = live[1:], post[1:]  # the first upload also loads and stages the patch

    say("load without churn")
    quiet = load(url, args.clients, args.seconds, args.max_tokens, expected)
    cycles, posted, admin_failed, post_load = [0], {}, [0], []

    def churn(stop: threading.Event) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                entry = admin.push(patch)
                post_load.append(time.perf_counter() - t0)
                posted[f"patches:{entry['id']}"] = t0
                time.sleep(max(0.0, args.period / 2 - (time.perf_counter() - t0)))
                t1 = time.perf_counter()
                admin.revert(entry["id"])
                cycles[0] += 1
                time.sleep(max(0.0, args.period / 2 - (time.perf_counter() - t1)))
            except Exception as err:
                print(f"admin error: {err}", file=sys.stderr)
                admin_failed[0] += 1
                return

    say("load with churn")
    churned = load(url, args.clients, args.seconds, args.max_tokens, expected, churn)
    churned["cycles_per_min"] = cycles[0] / churned["wall_s"] * 60
    # Under load: from each POST's start to the first client answer carrying that patch.
    first = {}
    for t, state in churned.pop("answered"):
        first[state] = min(first.get(state, t), t)
    under_load = [first[s] - t0 for s, t0 in posted.items() if s in first]
    quiet.pop("answered")
    leftover = admin.list()
    server.stop()

    # Restart on the merged checkpoint: from stopping the server to the first answer of the new one.
    restart = []
    for i in range(args.rounds):
        say(f"restart round {i + 1}")
        old = Server(base, tmp, args.device, threads)
        t0 = time.perf_counter()
        old.stop()
        new = Server(merged, tmp, args.device, threads)
        complete(client(new.url), PROMPTS[0], args.max_tokens)
        restart.append(time.perf_counter() - t0)
        new.stop()

    return {"model": label, "device": args.device, "clients": args.clients, "max_tokens": args.max_tokens,
            "threads": threads, "quiet": quiet, "churn": churned, "admin_failed": admin_failed[0],
            "leftover_patches": len(leftover), "patch_nnz": entry["nnz"],
            "prompts_whose_answer_the_patch_changes": differ, "post_idle_s": post, "post_under_load_s": post_load,
            "live_idle_s": live, "live_under_load_s": under_load, "patches_posted_under_load": len(posted),
            "restart_s": restart}


def report(f: dict, args) -> str:
    q, ch = f["quiet"], f["churn"]
    med_post, med_post_load, med_live, med_load, med_restart = (
        statistics.median(f[k]) if f[k] else float("nan")
        for k in ("post_idle_s", "post_under_load_s", "live_idle_s", "live_under_load_s", "restart_s"))
    cmd = "bench/serve_bench.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    lines = [
        f"Machine: {machine_line()}; device {f['device']}; server torch threads: {f['threads'] or 'default'}.",
        "",
        f"Command: `nice -n 15 .venv/bin/python {cmd}` ({args.seconds:.0f} s per load phase, "
        f"{args.clients} clients, greedy, max_tokens {args.max_tokens})",
        "",
        f"`roselora-export serve` on {f['model']} (fp32) in a child process; {args.clients} `openai` clients "
        f"back to back; the patch: a merged synthetic RoseLoRA edit, {f['patch_nnz']:,} weights, signed and checked on "
        f"every upload. It changes the greedy answer of {f['prompts_whose_answer_the_patch_changes']} of "
        f"{len(PROMPTS)} prompts; every answer was checked against the base or patched answer its "
        f"`system_fingerprint` names.",
        "",
        "| load | requests | failed | wrong or mixed answers | req/s | p50 s | p99 s | max s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| no churn | {q['requests']} | {q['failed']} | {q['mixed']} | {q['rps']:.2f} | {q['p50_s']:.3f} | "
        f"{q['p99_s']:.3f} | {q['max_s']:.3f} |",
        f"| apply/revert churn, {ch['cycles_per_min']:.1f} cycles/min | {ch['requests']} | {ch['failed']} | "
        f"{ch['mixed']} | {ch['rps']:.2f} | {ch['p50_s']:.3f} | {ch['p99_s']:.3f} | {ch['max_s']:.3f} |",
        "",
        "| getting an edit into a running server | median s | rounds |",
        "|---|---:|---:|",
        f"| POST the signed patch until 201 (idle server) | {med_post:.3f} | {len(f['post_idle_s'])} |",
        f"| POST, then one request: its answer carries the patch (idle server) | {med_live:.3f} | "
        f"{len(f['live_idle_s'])} |",
        f"| POST until 201 under {args.clients}-client load | {med_post_load:.3f} | {len(f['post_under_load_s'])} |",
        f"| POST start to the first client answer carrying the patch, under load | {med_load:.3f} | "
        f"{len(f['live_under_load_s'])} of {f['patches_posted_under_load']} |",
        f"| stop the server, start `serve` on the merged checkpoint, first answer | {med_restart:.3f} | "
        f"{len(f['restart_s'])} |",
        "",
        f"Goals: 0 failed and 0 mixed answers under {args.clients} clients and >= 10 cycles/min: "
        f"{ch['failed']} failed, {ch['mixed']} mixed at {ch['cycles_per_min']:.1f} cycles/min. "
        f"p99 under churn <= 1.5x p99 without: {ch['p99_s'] / q['p99_s']:.2f}x. "
        f"Patch to first patched answer >= 20x faster than a restart: {med_restart / med_live:.0f}x idle, "
        f"{med_restart / med_load:.0f}x under load. Admin errors: {f['admin_failed']}; patches left applied: "
        f"{f['leftover_patches']}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
