"""Write a CanonicalAdapter as PEFT files (for composed / generated adapters).

The canonical form allows every module its own rank and scale. PEFT says
that with one global r / lora_alpha plus rank_pattern / alpha_pattern, so
the most common rank and alpha become the globals and every other module
gets a pattern entry: its full path, regex-escaped, which PEFT's
`get_pattern_key` matches only for that module. target_modules lists full
module paths too, so PEFT adds LoRA layers exactly where the adapter has
weights and nowhere else.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file

from .canonical import CanonicalAdapter
from .errors import FormatError
from .peft import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_KEY_PREFIX


def _alpha_for(scale: float, rank: int, use_rslora: bool) -> float:
    """The lora_alpha that makes PEFT compute `scale` for this rank."""
    return scale * (math.sqrt(rank) if use_rslora else rank)


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _check_exportable(adapter: CanonicalAdapter) -> None:
    unsupported = sorted(path for path, module in adapter.modules.items() if module.kind != "linear")
    if unsupported:
        raise FormatError(
            "unsupported_feature",
            f"PEFT export supports linear LoRA modules only; '{unsupported[0]}' is "
            f"{adapter.modules[unsupported[0]].kind}.",
            None,
        )
    if adapter.extra_tensors:
        raise FormatError(
            "unsupported_feature",
            f"PEFT export does not write full tensors (modules_to_save), found '{sorted(adapter.extra_tensors)[0]}'.",
            None,
        )
    with_magnitude = {module.magnitude is not None for module in adapter.modules.values()}
    if len(with_magnitude) > 1:
        raise FormatError(
            "unsupported_feature", "PEFT cannot mix DoRA and plain LoRA modules in one adapter.", None
        )


def peft_config_for(adapter: CanonicalAdapter, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json that reproduces every module's rank and scale."""
    _check_exportable(adapter)
    ranks = {path: module.rank for path, module in adapter.modules.items()}
    alphas = {
        path: _alpha_for(module.scale, module.rank, adapter.use_rslora) for path, module in adapter.modules.items()
    }
    # Most common values become the globals (ties: the larger rank, the first alpha).
    rank_counts = Counter(ranks.values())
    global_rank = max(rank_counts, key=lambda rank: (rank_counts[rank], rank))
    global_alpha = Counter(round(alpha, 9) for alpha in alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": global_rank,
        "lora_alpha": _plain_number(global_alpha),
        "use_rslora": bool(adapter.use_rslora),
        "use_dora": any(module.magnitude is not None for module in adapter.modules.values()),
        "target_modules": sorted(adapter.modules),
        "rank_pattern": {re.escape(path): rank for path, rank in sorted(ranks.items()) if rank != global_rank},
        "alpha_pattern": {
            re.escape(path): _plain_number(alpha)
            for path, alpha in sorted(alphas.items())
            if round(alpha, 9) != global_alpha
        },
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_peft_adapter(
    adapter: CanonicalAdapter, out_dir: Path, *, base_model_name_or_path: str | None = None
) -> list[Path]:
    """Write adapter_config.json + adapter_model.safetensors into out_dir;
    returns both paths. Linear modules (and DoRA magnitudes) only. Module
    paths must be the base model's own (parse single-file adapters with
    base_shapes first), since PEFT finds the layers to wrap by those names."""
    config = peft_config_for(adapter, base_model_name_or_path)
    tensors = {}
    for path, module in sorted(adapter.modules.items()):
        prefix = f"{PEFT_KEY_PREFIX}{path}"
        tensors[f"{prefix}.lora_A.weight"] = module.A.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = module.B.contiguous()
        if module.magnitude is not None:
            tensors[f"{prefix}.lora_magnitude_vector"] = module.magnitude.reshape(-1).contiguous()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / ADAPTER_CONFIG_NAME
    weights_path = out_dir / ADAPTER_WEIGHTS_NAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    return [config_path, weights_path]
