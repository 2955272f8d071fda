"""RoseLoRA settings: one dataclass whose fields carry their help text (the paper's symbols in brackets).

Defaults are the authors' knowledge-editing setup (../shared/METHOD.md). For fine-tuning, t_init and
t_final may be given as fractions of the total number of steps: a value below 1 is a fraction
(0.1 = 10% of the steps), a value of 1 or more is a step count.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from ..errors import InputError


@dataclass
class RoseLoraConfig:
    rank: int = field(default=8, metadata={"help": "LoRA rank r: A is r x d2, B is d1 x r."})
    alpha: float = field(default=32, metadata={"help": "LoRA alpha; the update BA is scaled by alpha / r."})
    dropout: float = field(default=0.1, metadata={"help": "LoRA dropout on the adapter input during training."})
    targets: tuple[str, ...] = field(
        default=("auto",),
        metadata={"help": "Names of the modules to adapt (PEFT target_modules), e.g. q_proj,v_proj; c_attn on GPT-2; "
                          "query,value on BERT; auto = PEFT's default for the architecture (those three); mlp = the MLP's "
                          "input and output projections (up_proj,down_proj; GPT-2 c_fc,mlp.c_proj)."},
    )
    layers: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "Adapt only these decoder layers (PEFT layers_to_transform), e.g. 2-6 or 1,3,5; "
                          "all = every layer."},
    )
    tau: float = field(default=0.05, metadata={"help": "Kept fraction [tau]: each row of A and column of B keeps ceil(tau*d) entries."})
    beta: float = field(default=0.8, metadata={"help": "EMA factor [beta] of the sensitivity importance |w * dL/dw|."})
    t_init: float = field(default=3, metadata={"help": "Steps before pruning starts [t_i]; below 1 = fraction of the total steps."})
    t_final: float = field(default=20, metadata={"help": "Step from which tau(t) = tau [t_f]; below 1 = fraction of the total steps."})
    steps: int = field(default=25, metadata={"help": "Optimizer steps (Adam)."})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay."})
    clamp: float | None = field(
        default=3e-3,
        metadata={"help": "Norm constraint: clamp every A and B entry to +-clamp after each prune (ft-l: |W - W0| <= clamp; "
                         "the dense lora baseline has none); None = off."},
    )
    early_stop_loss: float | None = field(
        default=0.1,
        metadata={"help": "Stop once the loss is below this (roselora: only once past t_f, so pruning is complete); None = off."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for the adapter initialisation, dropout and data order."})

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        self.layers = parse_layers(self.layers)
        self.validate()

    def validate(self) -> None:
        """InputError naming the option and its allowed range for any out-of-range setting."""
        def bad(name: str, why: str) -> InputError:
            return InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: {why}")

        if int(self.rank) != self.rank or self.rank < 1:
            raise bad("rank", "must be a whole number >= 1")
        if not self.alpha > 0:
            raise bad("alpha", "must be > 0")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1)")
        if not self.targets:
            raise InputError("--targets: give at least one module name, e.g. q_proj,v_proj")
        if not 0 < self.tau <= 1:
            raise bad("tau", "the kept fraction must be in (0, 1]")
        if not 0 <= self.beta < 1:
            raise bad("beta", "must be in [0, 1)")
        if self.t_init < 0 or self.t_final < 0:
            raise InputError(f"--t-init {self.t_init} / --t-final {self.t_final}: must be >= 0")
        if int(self.steps) != self.steps or self.steps < 1:
            raise bad("steps", "must be a whole number >= 1")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.clamp is not None and not self.clamp > 0:
            raise bad("clamp", "must be > 0 (or none to switch the norm constraint off)")

    def schedule_steps(self, total_steps: int | None = None) -> tuple[int, int]:
        """(t_i, t_f) in optimizer steps: fractions (< 1) are taken of total_steps (default: self.steps)."""
        total = self.steps if total_steps is None else total_steps

        def resolve(x: float) -> int:
            return int(round(x * total)) if x < 1 else int(x)

        t_i, t_f = resolve(self.t_init), resolve(self.t_final)
        return t_i, max(t_f, t_i)

    def kept_count(self, d: int, fraction: float | None = None) -> int:
        """ceil(fraction * d), the entries a row of A (d = d2) or a column of B (d = d1) keeps."""
        frac = self.tau if fraction is None else fraction
        # The small slack keeps exact products (0.05 * 200 = 10.000000000000002) from rounding up.
        return max(1, min(d, math.ceil(frac * d - 1e-9)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RoseLoraConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "targets" else v) for k, v in d.items() if k in names})

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (used for CLI help)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def parse_layers(value) -> tuple[int, ...] | None:
    """Layer indices from '2-6', '1,3,5', 'all'/'none' (every layer) or a sequence of ints; sorted, unique."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "all", "none")):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    out: set[int] = set()
    try:
        for part in parts:
            if isinstance(part, str) and "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                out.update(range(int(lo), int(hi) + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise InputError(f"--layers {value}: give layer numbers such as 2-6 or 1,3,5") from None
    if not out or min(out) < 0:
        raise InputError(f"--layers {value}: give layer numbers >= 0, such as 2-6 or 1,3,5")
    return tuple(sorted(out))
