"""How an edit is trained beyond the RoseLoRA knobs: context prefixes, the locality term, the deploy dtype.

One dataclass whose fields carry their help text, as `method.config.RoseLoraConfig` does, and the
named presets (`default`, `paper`) that set both. docs/results.md explains how the defaults were chosen.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import InputError

DEPLOY_DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class EditSettings:
    prefixes: int = field(
        default=10,
        metadata={"help": "Context prefixes (ROME/MEMIT-style): N short texts the model itself generates from seed "
                          "words; each is put before the prompt as an extra training example. 0 = off."})
    prefix_length: int = field(default=10, metadata={"help": "Length of each context prefix, in tokens."})
    kl_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the locality term: KL(unedited || edited) of the next-token distributions "
                          "on the context prefixes (or on --kl-prompts). 0 = off."})
    kl_texts: int = field(
        default=0,
        metadata={"help": "Also N texts of 16 tokens the model generates itself (seeded), each a sequence that "
                          "carries only the locality term: more of the model's own text kept as it was. 0 = off."})
    kl_weight_when_edited: float | None = field(
        default=None,
        metadata={"help": "The locality term's weight on a model that already carries edits (its ledger records "
                          "some, or earlier edits of the same sequence). Default: --kl-weight."})
    kl_texts_when_edited: int | None = field(
        default=None,
        metadata={"help": "The KL-only texts on a model that already carries edits. Default: --kl-texts."})
    keep_edits: int = field(
        default=0,
        metadata={"help": "On a model that carries earlier edits: up to N of them (drawn at random when there are "
                          "more) each become a sequence that carries only the locality term, so the new edit keeps "
                          "them as the model answers them now. Needs --kl-weight > 0. 0 = off."})
    pin_kl_texts: bool = field(
        default=False,
        metadata={"help": "On a model that carries edits: the KL texts keep the predictions of the base those edits "
                          "were made on (read from the ledger; a sequence's first model), not this model's, so drift "
                          "does not add up over many edits."})
    kl_on_locality: bool = field(
        default=False,
        metadata={"help": "Also use each request's own 'locality' prompts for the locality term (they are "
                          "evaluation data: only if you mean to)."})
    deploy_dtype: str | None = field(
        default=None,
        metadata={"help": "The dtype the edit ships in (fp32, fp16, bf16): train against round(W0 + BA) in it "
                          "(straight-through), so the edit survives merge. Default: the checkpoint's stored dtype."})

    def __post_init__(self) -> None:
        if int(self.prefixes) != self.prefixes or self.prefixes < 0:
            raise InputError(f"--prefixes {self.prefixes}: must be a whole number >= 0")
        if int(self.prefix_length) != self.prefix_length or self.prefix_length < 1:
            raise InputError(f"--prefix-length {self.prefix_length}: must be a whole number >= 1")
        if int(self.kl_texts) != self.kl_texts or self.kl_texts < 0:
            raise InputError(f"--kl-texts {self.kl_texts}: must be a whole number >= 0")
        if self.kl_texts_when_edited is not None and (int(self.kl_texts_when_edited) != self.kl_texts_when_edited
                                                      or self.kl_texts_when_edited < 0):
            raise InputError(f"--kl-texts-when-edited {self.kl_texts_when_edited}: must be a whole number >= 0")
        if self.kl_weight_when_edited is not None and not self.kl_weight_when_edited >= 0:
            raise InputError(f"--kl-weight-when-edited {self.kl_weight_when_edited}: must be >= 0")
        if int(self.keep_edits) != self.keep_edits or self.keep_edits < 0:
            raise InputError(f"--keep-edits {self.keep_edits}: must be a whole number >= 0")
        if not self.kl_weight >= 0:
            raise InputError(f"--kl-weight {self.kl_weight}: must be >= 0")
        if self.keep_edits and not (self.kl_weight or self.kl_weight_when_edited):
            raise InputError(f"--keep-edits {self.keep_edits}: needs the locality term (--kl-weight > 0)")
        if self.deploy_dtype is not None and self.deploy_dtype not in DEPLOY_DTYPES:
            raise InputError(f"--deploy-dtype {self.deploy_dtype}: choose one of {', '.join(DEPLOY_DTYPES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def when_edited(self) -> EditSettings:
        """The settings that train an edit on a model that already carries edits."""
        return replace(self, kl_weight=_given(self.kl_weight_when_edited, self.kl_weight),
                       kl_texts=_given(self.kl_texts_when_edited, self.kl_texts),
                       kl_weight_when_edited=None, kl_texts_when_edited=None)

    def overridden(self, given: dict) -> EditSettings:
        """These settings with the `given` fields; a KL weight or text count given alone holds on an edited model too."""
        given = dict(given)
        for name in ("kl_weight", "kl_texts"):
            if name in given:
                given.setdefault(f"{name}_when_edited", None)
        return replace(self, **given)

    def kept(self, earlier: list, seed: int) -> list:
        """The earlier edits an edit keeps: all of them up to keep_edits, else a seeded draw of keep_edits."""
        import random

        if not (self.kl_weight and self.keep_edits):
            return []
        earlier = list(earlier)
        return earlier if len(earlier) <= self.keep_edits else random.Random(seed).sample(earlier, self.keep_edits)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


# Each preset: RoseLoraConfig fields, then EditSettings fields. `paper` is the RoseLoRA authors'
# knowledge-editing setup, tuned for LLaMA-2-7B (../shared/METHOD.md); `default` was chosen by the
# sweep in examples/results.py on the dev requests (docs/results.md, "How the defaults were chosen"); its
# settings for an edited model by its sequential runs, as the candidate best over every goal at once.
PRESETS: dict[str, tuple[dict, dict]] = {
    "default": (dict(rank=8, alpha=32, dropout=0.1, targets=("mlp",), tau=0.03, beta=0.8, t_init=3, t_final=12,
                     steps=25, lr=2e-3, weight_decay=0.0, clamp=None, early_stop_loss=0.1),
                dict(prefixes=3, prefix_length=5, kl_weight=1.0, kl_weight_when_edited=16.0, kl_texts_when_edited=16,
                     keep_edits=16, pin_kl_texts=True)),
    "paper": (dict(rank=8, alpha=32, dropout=0.1, targets=("auto",), tau=0.05, beta=0.8, t_init=3, t_final=20,
                   steps=25, lr=5e-4, weight_decay=0.0, clamp=3e-3, early_stop_loss=0.1),
              dict(prefixes=0, kl_weight=0.0)),
}


def _given(value, otherwise):
    return otherwise if value is None else value


def preset(name: str):
    """(RoseLoraConfig, EditSettings) of a named preset; InputError naming the choices otherwise."""
    from ..method.config import RoseLoraConfig

    if name not in PRESETS:
        raise InputError(f"--preset {name}: choose one of {', '.join(PRESETS)}")
    config_kw, settings_kw = PRESETS[name]
    return RoseLoraConfig(**config_kw), EditSettings(**settings_kw)


def edit_settings(config=None, settings: EditSettings | None = None):
    """(config, settings) to train with: the `default` preset for what is not given, except that a config
    given without settings trains on the requests alone (no prefixes, no KL), as before presets existed."""
    default_config, default_settings = preset("default")
    if settings is None:
        settings = default_settings if config is None else EditSettings(prefixes=0, kl_weight=0.0)
    return config or default_config, settings


def stored_dtype(model_dir) -> str | None:
    """fp32, fp16 or bf16: the one dtype a checkpoint stores its floating-point weights in (None if mixed or other)."""
    from ..checkpoint import open_model_dir
    from ..core.dtypes import SHORT_NAMES

    names = {SHORT_NAMES.get(info.dtype) for _, info in open_model_dir(model_dir).locations.values()
             if info.dtype in ("F64", "F32", "F16", "BF16")}
    return names.pop() if len(names) == 1 else None


def resolve_deploy_dtype(settings: EditSettings, model_dir, method: str) -> tuple[EditSettings, bool, str | None]:
    """(settings with deploy_dtype set, whether the loaded fp32 weights must first be rounded to it, a note).

    Without --deploy-dtype an fp16/bf16 checkpoint ships in its own dtype, so the edit trains against that;
    an fp32 one needs nothing. Given, it may differ from the stored dtype (merge --dtype converts): the
    loaded weights are then rounded to it, since the unedited shipped model is that rounded one.
    """
    from dataclasses import replace

    stored = stored_dtype(model_dir)
    requested = settings.deploy_dtype
    if method == "ft-l":
        if requested not in (None, "fp32"):
            raise InputError(f"--deploy-dtype {requested}: ft-l stores whole new weights; the option applies to "
                             "roselora and lora (their merged deltas are what rounding can erase)")
        return settings, False, None
    if requested is None:
        if stored in ("fp16", "bf16"):
            return (replace(settings, deploy_dtype=stored), False,
                    f"the checkpoint stores {stored}: training against the edit as merged in {stored} (--deploy-dtype)")
        return settings, False, None
    if requested == "fp32":
        return replace(settings, deploy_dtype=None), False, None
    return settings, requested != stored, None
