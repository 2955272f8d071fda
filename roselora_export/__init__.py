"""roselora-export: sparse, revertible RoseLoRA edits, from training to a live model."""

__version__ = "0.1.0"
