"""Turn a RoseLoraConfig into a PEFT LoRA model (RoseLoRA trains ordinary PEFT LoRA weights)."""
from __future__ import annotations

import torch

from ..errors import InputError
from .config import RoseLoraConfig


def _adaptable_leaf_names(model: torch.nn.Module) -> dict[str, bool]:
    """Leaf name -> whether it is a GPT-2 style Conv1D (weights stored in x out), for Linear/Conv1D modules."""
    names: dict[str, bool] = {}
    for path, conv1d in _adaptable_paths(model).items():
        names.setdefault(path.rsplit(".", 1)[-1], conv1d)
    return names


def auto_targets(model: torch.nn.Module) -> list[str]:
    """PEFT's default LoRA targets for the model's architecture (q_proj,v_proj on Llama; c_attn on GPT-2; query,value on BERT)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as BY_MODEL_TYPE

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = BY_MODEL_TYPE.get(model_type)
    if not targets:
        raise InputError(f"--targets auto: no default targets known for model type {model_type!r}; "
                         f"name them, e.g. --targets {','.join(_named_attention(model)) or 'q_proj,v_proj'}")
    return list(targets)


# The MLP's input and output projections, by the names architectures give them (first match wins).
# Dotted names match the end of a module's path (PEFT's rule): GPT-2's attention also has a c_proj.
_MLP_NAMES = (("up_proj", "down_proj"), ("c_fc", "mlp.c_proj"), ("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h"),
              ("w1", "w2"), ("intermediate.dense",))


def mlp_targets(model: torch.nn.Module) -> list[str]:
    """The MLP projections to adapt ('mlp'): up_proj,down_proj on Llama-style models, c_fc,mlp.c_proj on GPT-2, ..."""
    paths = _adaptable_paths(model)
    for names in _MLP_NAMES:
        if all(any(p == n or p.endswith("." + n) for p in paths) for n in names):
            return list(names)
    raise InputError("--targets mlp: this model's MLP projections have names this tool does not know; "
                     f"name them, e.g. --targets {','.join(_named_attention(model)) or 'q_proj,v_proj'}")


def _adaptable_paths(model: torch.nn.Module) -> dict[str, bool]:
    """Module path -> whether it is a Conv1D, for every Linear/Conv1D module."""
    from transformers.pytorch_utils import Conv1D

    return {n: isinstance(m, Conv1D) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def _named_attention(model: torch.nn.Module) -> list[str]:
    leaves = _adaptable_leaf_names(model)
    return [n for n in ("q_proj", "v_proj", "query", "value", "c_attn", "qkv_proj") if n in leaves]


def resolve_targets(model: torch.nn.Module, targets) -> list[str]:
    """The target names, checked: each must name at least one Linear/Conv1D module of the model; 'auto' = auto_targets."""
    aliases = {"auto": auto_targets, "mlp": mlp_targets}
    targets = [t for name in targets for t in (aliases[name](model) if name in aliases else [name])]
    leaves = _adaptable_leaf_names(model)
    paths = _adaptable_paths(model)
    missing = [t for t in targets if t not in leaves and not ("." in t and any(p.endswith("." + t) for p in paths))]
    if missing:
        have = ",".join(sorted(n for n in leaves if n not in ("lm_head", "classifier", "score")))
        raise InputError(f"--targets {','.join(targets)}: no module named {','.join(missing)} in this model; "
                         f"pick from {have}")
    return list(targets)


def lora_config(config: RoseLoraConfig, model: torch.nn.Module, task_type: str | None = None):
    """The peft.LoraConfig with the same rank, alpha, dropout and targets (fan_in_fan_out set for Conv1D)."""
    from peft import LoraConfig

    targets = resolve_targets(model, config.targets)
    leaves = _adaptable_leaf_names(model)
    return LoraConfig(
        layers_to_transform=_checked_layers(model, config.layers),
        r=int(config.rank),
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        fan_in_fan_out=any(leaves.get(t.rsplit(".", 1)[-1], False) for t in targets),
        bias="none",
        task_type=task_type,
    )


def _checked_layers(model: torch.nn.Module, layers: tuple[int, ...] | None) -> list[int] | None:
    """The --layers list, checked against the model's layer count (None = every layer)."""
    if layers is None:
        return None
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if count is not None and max(layers) >= count:
        raise InputError(f"--layers {','.join(map(str, layers))}: the model has layers 0..{count - 1}")
    return list(layers)


def wrap_with_lora(model: torch.nn.Module, config: RoseLoraConfig, task_type: str | None = None):
    """peft.get_peft_model with the config's LoRA settings; the adapter init is seeded by config.seed."""
    from peft import get_peft_model

    torch.manual_seed(config.seed)
    return get_peft_model(model, lora_config(config, model, task_type=task_type))
