"""`make demo`: one knowledge edit on SmolLM2, end to end, through the real CLI.

Each step is the command a user would type; its output is shown as it runs. Outputs go to
out/demo/ (recreated each run).
"""
from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "demo"
CLI = [str(Path(sys.executable).parent / "roselora-export")]
REQUESTS = ROOT / "examples" / "requests" / "landmark.jsonl"


def run(*args: str, capture: bool = False) -> str:
    cmd = CLI + [str(a) for a in args]
    print(f"\n$ roselora-export {shlex.join(cmd[1:])}", flush=True)
    if capture:
        done = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE)
        print(done.stdout, end="", flush=True)
        return done.stdout
    subprocess.run(cmd, check=True)
    return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(what: str, a: Path, b: Path) -> None:
    same = _sha256(a) == _sha256(b)
    print(f"{what}: {'yes' if same else 'NO'}", flush=True)
    if not same:
        sys.exit(f"demo failed: {what}: no")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    model = run("demo-model", capture=True).strip().splitlines()[-1]
    prompt = json.loads(REQUESTS.read_text().splitlines()[0])["prompt"]
    # 1. Train one RoseLoRA edit with the default settings (prints the answer before/after and how
    #    many weights changed); docs/results.md says how the defaults were chosen.
    run("edit", "--model", model, "--requests", REQUESTS, "--out", OUT / "adapter")
    # 2. Export: merge into a full checkpoint and write the tiny patch beside it.
    run("merge", "--base", model, "--adapter", OUT / "adapter", "--out", OUT / "merged",
        "--patch", OUT / "edit.patch.safetensors")
    run("inspect", OUT / "edit.patch.safetensors")
    # 3. Ship only the patch: apply it to a copy of the base checkpoint, then take it back exactly.
    applied = OUT / "applied" / "model.safetensors"
    run("apply", "--base", model, "--patch", OUT / "edit.patch.safetensors", "--out", OUT / "applied")
    _check("applied checkpoint bit-identical to the merged one", applied, OUT / "merged" / "model.safetensors")
    run("apply", "--base", OUT / "applied", "--patch", OUT / "edit.patch.safetensors", "--revert", "--in-place")
    _check("reverted checkpoint bit-identical to the base", applied, Path(model) / "model.safetensors")
    # 4. Deploy: apply the patch to a live model, answer, revert, check the bits.
    run("try", "--model", model, "--patch", OUT / "edit.patch.safetensors", "--prompt", prompt)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as err:
        sys.exit(f"demo step failed (exit {err.returncode}): {shlex.join(err.cmd)}")
