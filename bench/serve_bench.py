"""Serving benchmark: request latency with and without live apply/revert churn, and the time from a
patch upload to the first answer carrying it, against restarting the server on the merged checkpoint.

    .venv/bin/python bench/serve_bench.py                    # CPU, writes section "serve"
    .venv/bin/python bench/serve_bench.py --device cuda --section serve-gpu   # what bench/gpu.sh runs

SmolLM2-135M-Instruct (converted once) is served by `roselora-export serve` in a child process, as a
user runs it, with an admin token and a trusted key. The patch is a real edit made by the CLI (`edit` on
examples/requests/landmark.jsonl, then `merge`), signed; it changes the greedy answers of the edit's prompt
and its rephrasing, so an answer from the wrong or a mixed weight state shows. N clients (the `openai`
client, one thread each, greedy, max_tokens tokens) send requests back to back, first without changes,
then while an admin thread applies and reverts the patch on a fixed period. Every answer is checked
against the base or the patched greedy answer, as its `system_fingerprint` names its weight state.
The load average is recorded at the start and end of each phase (the machine may be shared).

A write waits for the answers in flight (one weight state per answer), so the phases run once per
server setting compared (--concurrency): by default one answer at a time with every core's torch
threads, then no bound with one torch thread per answer (each answer on its own thread).

Patch to first patched answer, two measures of "the first answer carrying the patch", each round:
the whole answer (from starting the POST of the signed patch to receiving a non-streamed completion
that carries it), and the first streamed token (from starting the POST to the first chunk, with text, of
a `"stream": true` completion whose chunks all name the patched state and whose pieces join to the
patched greedy answer). Under churn: from each POST to the first client answer carrying that patch.
Restart, what a user does without live patches: from stopping the server to the whole first answer, or
to the first streamed token, of a fresh `serve` on the merged checkpoint (process start, imports, model
load, a GET /health, the answer); each restart stops the previous one's server, and the time until
/health answers 200 is kept apart.
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

# The edit's prompt and its rephrasing (answers the patch changes), and two it must leave alone.
PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of Germany is",
           "The city where the Eiffel Tower stands is", "Water boils at a temperature of"]
REQUESTS = ROOT / "examples" / "requests" / "landmark.jsonl"
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

    def __init__(self, model: Path, files: Path, device: str, threads: int | None, concurrency: int | None) -> None:
        cmd = [*CLI, "serve", "--model", str(model), "--port", "0", "--device", device, "--log-level", "warning",
               "--admin-token-file", str(files / "token"), "--trusted-key", str(files / "key.pub.pem")]
        if threads:
            cmd += ["--threads", str(threads)]
        if concurrency:
            cmd += ["--concurrency", str(concurrency)]
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


def stream_timed(c, prompt: str, max_tokens: int) -> dict:
    """A streamed greedy completion: perf_counter at its first chunk with text ("first") and at its end
    ("end"; "first" is "end" when no chunk had text), the joined text, and the system_fingerprints of its
    chunks ("states")."""
    first, pieces, states = None, [], set()
    for ch in c.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True):
        states.add(ch.system_fingerprint)
        text = ch.choices[0].text if ch.choices else ""
        if text and first is None:
            first = time.perf_counter()
        pieces.append(text)
    end = time.perf_counter()
    return {"first": first or end, "end": end, "text": "".join(pieces), "states": states}


def wait_health(url: str, limit: float = 120.0) -> None:
    """Return once GET /health answers 200."""
    import urllib.error
    import urllib.request

    deadline = time.perf_counter() + limit
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            if time.perf_counter() > deadline:
                raise
        time.sleep(0.01)


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


def make_patch(base: Path, tmp: Path, device: str, real: bool) -> tuple[Path, Path, str]:
    """A signed edit patch of base and its merged checkpoint, made by the CLI as a user makes them:
    (merged dir, signed patch, what the patch is). On SmolLM2: `edit` (examples/requests/landmark.jsonl,
    the Eiffel Tower moved to Rome, default preset) then `merge`; on the stand-in random model, which no
    edit can be trained on meaningfully, a merged synthetic RoseLoRA adapter at the editing clamp."""
    from roselora_export.signing import sign_patch

    if real:
        subprocess.run([*CLI, "edit", "--model", str(base), "--requests", str(REQUESTS), "--out", str(tmp / "adapter"),
                        "--device", device, "--no-progress"], check=True, capture_output=True)
        what = "a RoseLoRA edit trained by `roselora-export edit` on examples/requests/landmark.jsonl (Eiffel Tower -> Rome), merged"
    else:
        import bench.synthetic_adapter as synthetic

        synthetic.CLAMP = 3e-2  # the clamp at which edits take on SmolLM2's shape, so answers may change
        write_synthetic_adapter(base, tmp / "adapter")
        what = "a merged synthetic RoseLoRA adapter (bench/synthetic_adapter.py, q/v, entries at +-3e-2)"
    subprocess.run([*CLI, "merge", "--base", str(base), "--adapter", str(tmp / "adapter"), "--out", str(tmp / "merged")],
                   check=True, capture_output=True)
    patch = tmp / "merged.patch.safetensors"
    sign_patch(patch, tmp / "key.pem")
    return tmp / "merged", patch, what


SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=1)


def model_dir_or_synthetic(tmp: Path) -> tuple[Path, str, bool]:
    """(directory, label, is SmolLM2): the converted SmolLM2 (converted now from the embedded GGUF if need be),
    or, where it cannot be had, a random model of its shape with a word-level tokenizer built here (timings
    depend on shapes)."""
    from roselora_export.errors import InputError
    from roselora_export.models import demo_model_dir

    try:
        return demo_model_dir(), "SmolLM2-135M-Instruct", True
    except (InputError, ImportError, OSError) as err:
        say(f"no SmolLM2 ({err}); a random model of its shape instead")
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
    return out, "a random model of SmolLM2-135M's shape (no SmolLM2 here), word-level tokenizer", False


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
    ap.add_argument("--period", type=float, default=5.0, help="seconds per apply+revert cycle under churn (default 5: 12 cycles/min)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the patch-vs-restart timing (default 3)")
    ap.add_argument("--concurrency", default="1,0",
                    help="server --concurrency settings to compare, comma-separated; 0 = unbounded (default 1,0)")
    ap.add_argument("--threads", type=int, default=None,
                    help="the server's torch threads (default on CPU: all cores with --concurrency 1, else 1)")
    ap.add_argument("--section", default="serve", help="section of docs/benchmarks.md to write (default serve)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    args = ap.parse_args()
    settings = []
    for c in args.concurrency.split(","):
        conc = int(c) or None
        threads = args.threads or (None if args.device != "cpu" else (os.cpu_count() or 1) if conc == 1 else 1)
        settings.append((conc, threads))
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench_", dir="/tmp"))
    try:
        fig = measure(args, tmp, settings)
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


def expected_answers(url: str, admin, patch: Path, max_tokens: int) -> dict:
    """Each prompt's greedy answer from this server, on the base and with the patch."""
    c = client(url)
    expected = {"base": {p: complete(c, p, max_tokens)[0] for p in PROMPTS}}
    entry = admin.push(patch)
    expected["patched"] = {p: complete(c, p, max_tokens)[0] for p in PROMPTS}
    admin.revert(entry["id"])
    return expected


def phases(args, url: str, admin, patch: Path, expected: dict) -> dict:
    """The load phase without churn, then with it: figures of both, and the admin's timings."""
    loadavg = {"start": os.getloadavg()[0]}
    say("load without churn")
    quiet = load(url, args.clients, args.seconds, args.max_tokens, expected)
    cycles, posted, admin_failed, post_load, delete_load = [0], {}, [0], [], []

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
                delete_load.append(time.perf_counter() - t1)
                cycles[0] += 1
                time.sleep(max(0.0, args.period / 2 - (time.perf_counter() - t1)))
            except Exception as err:
                print(f"admin error: {err}", file=sys.stderr)
                admin_failed[0] += 1
                return

    loadavg["between"] = os.getloadavg()[0]
    say("load with churn")
    churned = load(url, args.clients, args.seconds, args.max_tokens, expected, churn)
    loadavg["end"] = os.getloadavg()[0]
    churned["cycles_per_min"] = cycles[0] / churned["wall_s"] * 60
    # Under load: from each POST's start to the first client answer carrying that patch.
    first = {}
    for t, state in churned.pop("answered"):
        first[state] = min(first.get(state, t), t)
    quiet.pop("answered")
    return {"quiet": quiet, "churn": churned, "admin_failed": admin_failed[0], "leftover_patches": len(admin.list()),
            "post_under_load_s": post_load, "delete_under_load_s": delete_load, "loadavg_1min": loadavg,
            "live_under_load_s": [first[s] - t0 for s, t0 in posted.items() if s in first],
            "patches_posted_under_load": len(posted)}


def measure(args, tmp: Path, settings: list[tuple[int | None, int | None]]) -> dict:
    from roselora_export.serve.client import Admin

    base, label, real = model_dir_or_synthetic(tmp)
    write_keys(tmp)
    say(f"making the patch ({'edit + merge' if real else 'synthetic adapter + merge'})")
    merged, patch, what = make_patch(base, tmp, args.device, real)
    runs, differ = [], 0
    idle = {"post_s": [], "answer_s": [], "post_stream_s": [], "first_token_s": [], "stream_end_s": []}
    for n, (conc, threads) in enumerate(settings):
        say(f"starting the server (--concurrency {conc or 'unbounded'}, --threads {threads or 'default'})")
        server = Server(base, tmp, args.device, threads, conc)
        admin = Admin(server.url, TOKEN)
        expected = expected_answers(server.url, admin, patch, args.max_tokens)
        differ = max(differ, sum(expected["base"][p] != expected["patched"][p] for p in PROMPTS))
        if n == 0:
            say(f"the patch changes {differ} of {len(PROMPTS)} answers; idle patch-to-answer rounds")
            want = expected["patched"][PROMPTS[0]]
            c = client(server.url)
            for _ in range(args.rounds + 1):  # patch to first patched answer, idle server, both measures
                t0 = time.perf_counter()
                entry = admin.push(patch)
                idle["post_s"].append(time.perf_counter() - t0)
                text, state = complete(c, PROMPTS[0], args.max_tokens)
                idle["answer_s"].append(time.perf_counter() - t0)
                assert state == f"patches:{entry['id']}" and text == want, (state, text)
                admin.revert(entry["id"])
                t0 = time.perf_counter()
                entry = admin.push(patch)
                idle["post_stream_s"].append(time.perf_counter() - t0)
                s = stream_timed(c, PROMPTS[0], args.max_tokens)
                idle["first_token_s"].append(s["first"] - t0)
                idle["stream_end_s"].append(s["end"] - t0)
                assert s["states"] == {f"patches:{entry['id']}"} and s["text"] == want, (s["states"], s["text"])
                admin.revert(entry["id"])
            idle = {k: v[1:] for k, v in idle.items()}  # the first upload also loads and stages the patch
        runs.append({"concurrency": conc, "threads": threads, **phases(args, server.url, admin, patch, expected)})
        server.stop()

    # Restart on the merged checkpoint: from stopping the server to the first answer (whole, or its first
    # streamed token) of a fresh one; each restart stops the server the previous one started.
    conc, threads = settings[0]
    restart = []
    old = Server(base, tmp, args.device, threads, conc)
    for i in range(args.rounds):
        for how in ("answer", "stream"):
            say(f"restart round {i + 1}, {how}")
            t0 = time.perf_counter()
            old.stop()
            new = Server(merged, tmp, args.device, threads, conc)
            t_serving = time.perf_counter()
            wait_health(new.url)
            t_health = time.perf_counter()
            if how == "answer":
                text, state = complete(client(new.url), PROMPTS[0], args.max_tokens)
                first = end = time.perf_counter()
            else:
                s = stream_timed(client(new.url), PROMPTS[0], args.max_tokens)
                text, state, first, end = s["text"], ",".join(sorted(s["states"])), s["first"], s["end"]
            restart.append({"how": how, "serving_s": t_serving - t0, "health_s": t_health - t0,
                            "first_s": first - t0, "end_s": end - t0, "state": state,
                            "patched_answer": text == expected["patched"][PROMPTS[0]]})
            old = new
    old.stop()

    return {"model": label, "device": args.device, "clients": args.clients, "max_tokens": args.max_tokens,
            "period_s": args.period, "runs": runs, "patch_nnz": entry["nnz"], "patch": what,
            "prompts_whose_answer_the_patch_changes": differ, "idle": idle, "restart": restart,
            "loadavg_1min_end": os.getloadavg()[0]}


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _name(run: dict) -> str:
    return (f"--concurrency {run['concurrency'] or 'unbounded'}, {run['threads'] or 'default'} torch "
            f"thread{'s' if (run['threads'] or 2) > 1 else ''}")


def report(f: dict, args) -> str:
    cmd = "bench/serve_bench.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    loads = "; ".join(f"{_name(r)}: {r['loadavg_1min']['start']:.2f} / {r['loadavg_1min']['between']:.2f} / "
                      f"{r['loadavg_1min']['end']:.2f}" for r in f["runs"])
    lines = [
        f"Machine: {machine_line()}; device {f['device']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"1-minute load average before / between / after the load phases: {loads}; "
        f"{f['loadavg_1min_end']:.2f} at the end.",
        "",
        f"Command: `.venv/bin/python {cmd}` ({args.seconds:.0f} s per load phase, {args.clients} clients, greedy, "
        f"max_tokens {args.max_tokens}, one apply + revert every {args.period:g} s under churn)",
        "",
        f"`roselora-export serve` on {f['model']} (fp32) in a child process; {args.clients} `openai` clients "
        f"back to back; the patch: {f['patch']}, {f['patch_nnz']:,} weights, signed and checked on "
        f"every upload. It changes the greedy answer of {f['prompts_whose_answer_the_patch_changes']} of "
        f"{len(PROMPTS)} prompts; every answer was checked against the base or patched answer its "
        f"`system_fingerprint` names.",
        "",
        "| server | load | requests | failed | wrong or mixed answers | req/s | p50 s | p99 s | max s | "
        "POST / DELETE under load, median s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in f["runs"]:
        q, ch = r["quiet"], r["churn"]
        lines += [
            f"| {_name(r)} | no churn | {q['requests']} | {q['failed']} | {q['mixed']} | {q['rps']:.2f} | "
            f"{q['p50_s']:.3f} | {q['p99_s']:.3f} | {q['max_s']:.3f} | |",
            f"| | churn, {ch['cycles_per_min']:.1f} cycles/min | {ch['requests']} | {ch['failed']} | {ch['mixed']} | "
            f"{ch['rps']:.2f} | {ch['p50_s']:.3f} | {ch['p99_s']:.3f} | {ch['max_s']:.3f} | "
            f"{_med(r['post_under_load_s']):.3f} / {_med(r['delete_under_load_s']):.3f} |",
        ]
    first, idle = f["runs"][0], f["idle"]
    whole = [r for r in f["restart"] if r["how"] == "answer"]
    streamed = [r for r in f["restart"] if r["how"] == "stream"]
    live_answer, live_token = _med(idle["answer_s"]), _med(idle["first_token_s"])
    restart_answer = _med([r["end_s"] for r in whole])
    restart_token = _med([r["first_s"] for r in streamed])
    med_load = _med(first["live_under_load_s"])
    health = _med([r["health_s"] for r in f["restart"]])
    patched = sum(r["patched_answer"] for r in f["restart"])
    lines += [
        "",
        f"| getting an edit into a running server ({_name(first)}) | whole answer, median s | "
        f"first streamed token, median s | rounds |",
        "|---|---:|---:|---:|",
        f"| POST the signed patch until 201 (idle server) | {_med(idle['post_s']):.3f} | "
        f"{_med(idle['post_stream_s']):.3f} | {len(idle['post_s'])} + {len(idle['post_stream_s'])} |",
        f"| POST start, then one request: its answer carries the patch (idle server) | {live_answer:.3f} | "
        f"{live_token:.3f} | {len(idle['answer_s'])} + {len(idle['first_token_s'])} |",
        f"| POST start to the first client answer carrying the patch, under load | {med_load:.3f} | | "
        f"{len(first['live_under_load_s'])} of {first['patches_posted_under_load']} |",
        f"| restart: stop the server, start `serve` on the merged checkpoint, until GET /health is 200 | "
        f"{health:.3f} | | {len(f['restart'])} |",
        f"| restart: the same, then the first answer | {restart_answer:.3f} | {restart_token:.3f} | "
        f"{len(whole)} + {len(streamed)} |",
        f"| **restart / live patch (idle)** | **{restart_answer / live_answer:.1f}x** | "
        f"**{restart_token / live_token:.1f}x** | |",
        "",
        f"Every live answer above carried the patch in every chunk and equalled the patched greedy answer; "
        f"{patched} of {len(f['restart'])} restarted servers' first answers equalled it too. A streamed answer's "
        f"end came {_med(idle['stream_end_s']):.3f} s after the POST (live) and "
        f"{_med([r['end_s'] for r in streamed]):.3f} s after the stop (restart).",
        "",
    ]
    for r in f["runs"]:
        q, ch = r["quiet"], r["churn"]
        lines.append(
            f"Goals, {_name(r)}: 0 failed and 0 mixed under {args.clients} clients at >= 10 cycles/min: "
            f"{ch['failed']} failed, {ch['mixed']} mixed at {ch['cycles_per_min']:.1f} cycles/min; p99 under churn "
            f"<= 1.5x p99 without: {ch['p99_s'] / q['p99_s']:.2f}x; admin errors {r['admin_failed']}, patches left "
            f"applied {r['leftover_patches']}.")
    lines.append(f"Patch to first patched answer >= 20x faster than a restart: whole answer "
                 f"{restart_answer / live_answer:.0f}x idle, {restart_answer / med_load:.0f}x under load; "
                 f"first streamed token {restart_token / live_token:.0f}x idle.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
