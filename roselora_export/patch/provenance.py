"""What a patch records of where it came from (its `provenance` metadata), without torch."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from .model import to_dtype_name


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def adapter_provenance(adapter, base_name: str, base_config_fp: str | None, dtype=None) -> dict:
    """Provenance of a patch merged from `adapter` (patch.adapter.Adapter); dtype: torch dtype, name or None."""
    return {
        "kind": "adapter",
        "source": str(Path(adapter.path).name),
        "method": adapter.method,
        "base_model": base_name,
        "base_config_sha256": base_config_fp,
        "dtype": to_dtype_name(dtype) if dtype else None,
        # The settings and totals, not roselora.json's per-module statistics: those are the adapter's
        # (each module's nnz is in the patch anyway), and on a small edit they were a quarter of the file.
        "roselora": {k: v for k, v in adapter.settings.items() if k != "modules"} if adapter.settings else adapter.settings,
        "lora": {k: adapter.peft_config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules", "fan_in_fan_out")
                 if k in adapter.peft_config},
        "created": now_iso(),
        "tool": "roselora-export",
    }


# The fields commands read, and the JSON types each may have (None: absent or null). Other fields pass as they are.
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("kind", "source", "method", "base_model", "base_config_sha256", "base_config_fingerprint",
                     "dtype", "created", "tool"), (str,)),
    "base_numel": (int,),
    **dict.fromkeys(("roselora", "lora"), (dict,)),
}


def provenance_problem(prov: dict) -> str | None:
    """What is wrong with a read provenance object (a field of the wrong JSON type), or None."""
    for key, types in FIELD_TYPES.items():
        v = prov.get(key)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            want = {str: "a string", int: "an integer", dict: "an object"}[types[0]]
            return f"provenance field {key!r} is {type(v).__name__} {str(v)[:40]!r}, not {want}"
    if isinstance(prov.get("base_numel"), int) and prov["base_numel"] < 0:
        return "provenance field 'base_numel' is negative"
    return None
