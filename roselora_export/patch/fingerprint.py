"""A fingerprint of a model's shape-defining configuration, equal for config.json on disk and
`model.config.to_dict()` of the loaded model (it ignores dtype, paths, versions and runtime flags)."""
from __future__ import annotations

import hashlib
import json

# Canonical key -> the names it goes by across architectures (GPT-2 uses its own).
SHAPE_KEYS: dict[str, tuple[str, ...]] = {
    "model_type": ("model_type",),
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads",),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "head_dim": ("head_dim",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    "type_vocab_size": ("type_vocab_size",),
    "tie_word_embeddings": ("tie_word_embeddings",),
}


def shape_config(config: dict) -> dict:
    """The shape-defining keys of a config dict, under canonical names; absent or None keys are left out."""
    out = {}
    for canon, names in SHAPE_KEYS.items():
        for n in names:
            if config.get(n) is not None:
                out[canon] = config[n]
                break
    return out


def config_fingerprint(config: dict) -> str:
    """sha256 (hex) of the canonical JSON of `shape_config(config)`."""
    blob = json.dumps(shape_config(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
