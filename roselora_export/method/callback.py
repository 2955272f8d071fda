"""RoseLoRA as a `transformers.TrainerCallback`: add it to any HF `Trainer` run on a PEFT LoRA model."""
from __future__ import annotations

from transformers import TrainerCallback

from .config import RoseLoraConfig
from .pruner import RoseLoraPruner


class RoseLoraCallback(TrainerCallback):
    """Prunes the LoRA A rows and B columns after every optimizer step, and once more at the end.

    t_init / t_final below 1 are fractions of the Trainer's max_steps. The model given to the
    Trainer must already be a PEFT LoRA model (see `roselora_export.method.lora_config`).
    """

    def __init__(self, config: RoseLoraConfig):
        self.config = config
        self.pruner: RoseLoraPruner | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.pruner = RoseLoraPruner(model, self.config, total_steps=state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Called after optimizer.step() and before zero_grad, so the gradients are still there.
        self.pruner.step()

    def on_train_end(self, args, state, control, **kwargs):
        self.pruner.finalize()
