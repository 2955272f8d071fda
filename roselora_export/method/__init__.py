"""RoseLoRA itself: config, importance EMA + row/column pruning, cubic schedule, Prop. 1 bound, trainer hooks."""
from .config import RoseLoraConfig
from .bound import density_bound, prop1_sparsity_bound, sparsity
from .pruner import LoraPair, RoseLoraPruner, base_key_of, lora_pairs
from .schedule import kept_fraction
from .peft_setup import lora_config, resolve_targets, wrap_with_lora

__all__ = [
    "RoseLoraConfig", "RoseLoraPruner", "LoraPair", "lora_pairs", "base_key_of", "kept_fraction",
    "prop1_sparsity_bound", "sparsity", "density_bound", "lora_config", "resolve_targets", "wrap_with_lora",
]
