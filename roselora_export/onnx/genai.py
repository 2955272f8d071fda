"""onnxruntime-genai artifacts: build one with its model builder, run greedy generation through it.

    build_genai(hf_dir, out_dir, precision="fp32")  -> seconds (the builder in a child process)
    genai_generate(onnx_dir, prompt, max_new_tokens) -> (new token ids, text)
    genai_logits(onnx_dir, token_ids)                -> logits of the prompt, [tokens, vocab] float32

The artifacts are patched like any other (`map-onnx`, then `apply --base DIR`); these helpers only
build and run them. onnxruntime-genai is an optional dependency (the `genai` extra).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import InputError

PRECISIONS = ("fp32", "fp16", "int4")


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise InputError("--runtime genai needs onnxruntime-genai: pip install 'roselora-export[genai]'") from None
    return og


def build_genai(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "fp32", provider: str = "cpu",
                cache_dir: str | os.PathLike | None = None, log: str | os.PathLike | None = None) -> float:
    """Run onnxruntime-genai's model builder on a local HF directory; returns its wall time in seconds."""
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    _og()
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else out_dir.parent / f".{out_dir.name}.cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", provider, "-c", str(cache_dir)]
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        raise RuntimeError(f"onnxruntime-genai builder failed (exit {proc.returncode}); see {log or 'its output'}")
    return time.perf_counter() - t0


def _model(onnx_dir: str | os.PathLike):
    from .journal import recover

    og = _og()
    if Path(onnx_dir).is_dir():
        recover(onnx_dir)  # an interrupted in-place apply is rolled back before the model is loaded
    if not (Path(onnx_dir) / "genai_config.json").is_file():
        raise InputError(f"--onnx {onnx_dir}: no genai_config.json; --runtime genai runs artifacts of "
                         "onnxruntime-genai's model builder (use --runtime ort for export-onnx's)")
    return og, og.Model(str(onnx_dir))


def genai_generate(onnx_dir: str | os.PathLike, prompt: str, max_new_tokens: int = 8) -> tuple[list[int], str]:
    """Greedy continuation of `prompt` by onnxruntime-genai (its tokenizer); new token ids and their text."""
    og, model = _model(onnx_dir)
    tok = og.Tokenizer(model)
    ids = np.asarray(tok.encode(prompt), dtype=np.int32)
    gen = _generator(og, model, ids, max_new_tokens)
    while not gen.is_done():
        gen.generate_next_token()
    new = [int(t) for t in gen.get_sequence(0)[ids.size:]]
    return new, tok.decode(np.asarray(new, dtype=np.int32)) if new else ""


def genai_logits(onnx_dir: str | os.PathLike, token_ids) -> np.ndarray:
    """The artifact's logits for every position of `token_ids` (one forward pass), as float32 [tokens, vocab]."""
    og, model = _model(onnx_dir)
    ids = np.asarray(list(token_ids), dtype=np.int32)
    return np.asarray(_generator(og, model, ids, 1).get_output("logits"), dtype=np.float32).reshape(ids.size, -1)


def _generator(og, model, ids: np.ndarray, new_tokens: int):
    """A greedy og.Generator fed `ids`, with room for `new_tokens` more."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(ids.size) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    return gen


def genai_results(onnx_dir: str | os.PathLike, patch_files: list, pairs: list[tuple[str, object]],
                  max_new_tokens: int) -> list[dict]:
    """onnx-generate through onnxruntime-genai: one result per (prompt, target) pair. Patch files are applied
    to a copy in a temporary directory (onnxruntime-genai takes no initializer overrides)."""
    import tempfile

    from ..patch import load_patch
    from .mapping import apply_mapped

    _model(onnx_dir)  # a genai artifact, and the package is there: checked before any copy
    with tempfile.TemporaryDirectory(prefix="roselora-genai-", ignore_cleanup_errors=True) as tmp:
        run_dir = Path(onnx_dir)
        if patch_files:
            run_dir = Path(tmp) / "patched"
            apply_mapped(Path(onnx_dir), [load_patch(p) for p in patch_files], run_dir, base_model=None)
        out = []
        for prompt, target in pairs:
            new, text = genai_generate(run_dir, prompt, max_new_tokens)
            out.append({"prompt": prompt, "continuation": text, "new_token_ids": new, "target": target})
        return out
