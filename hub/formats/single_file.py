"""Single-file LoRAs from the Stable Diffusion world (no adapter_config.json).

kohya-ss / A1111 style: "lora_unet_<path>" / "lora_te_<path>" (SDXL:
"lora_te1_", "lora_te2_") where <path> is the module path with every '.'
replaced by '_', and suffixes ".lora_down.weight" (A), ".lora_up.weight" (B)
and a scalar ".alpha".

diffusers style: "<component>.<module path>" with component unet,
transformer or text_encoder[_N], and suffixes ".lora.down.weight" /
".lora.up.weight", ".lora_linear_layer.down.weight" / ".up.weight" (what
diffusers' training scripts write for text encoders), or PEFT's
".lora_A.weight" / ".lora_B.weight" (what current diffusers writes for
transformer models), plus optional ".alpha" and ".lora_magnitude_vector".

Both: scale = alpha / r, with alpha = r when the file stores none. diffusers
≥ 0.33 may embed the PEFT LoraConfig in the safetensors metadata
("lora_adapter_metadata", keys prefixed per component, e.g.
"text_encoder.lora_alpha"); when present it decides rank and scale (with
PEFT's rank_pattern / alpha_pattern / rsLoRA rules) unless a module stores
its own ".alpha".
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from .canonical import (
    CanonicalAdapter,
    align_modules_to_base,
    group_lora_tensors,
    lora_module_from_group,
    most_common_dtype,
    short_module_name,
)
from .errors import FormatError
from .peft import LoraSettings, lora_settings
from .safetensors_header import ADAPTER_DTYPES, SafetensorsHeader, load_tensors, read_safetensors_header

KOHYA_PREFIX = re.compile(r"^lora_(?:unet|te\d?)_")
DIFFUSERS_PREFIX = re.compile(r"^(?:unet|transformer|text_encoder(?:_\d+)?)\.")
DIFFUSERS_CONFIG_METADATA = "lora_adapter_metadata"

KOHYA_SUFFIX_ROLES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
DIFFUSERS_SUFFIX_ROLES = {
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A",
    ".lora_linear_layer.up.weight": "B",
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".alpha": "alpha",
    ".lora_magnitude_vector": "magnitude",
}
# LyCORIS algorithms share kohya's naming but are not low-rank B@A products.
# The part after a kohya module name tells them apart.
LYCORIS_SUFFIX = re.compile(
    r"^(?P<algorithm>hada_[tw]\d.*|lokr_[tw]\d.*|oft_.*|lora_mid\..*|dora_scale|diff|diff_b)$"
)
LYCORIS_NAMES = {"hada": "LoHa", "lokr": "LoKr", "oft": "OFT", "lora": "LoCon (Tucker)", "dora": "kohya DoRA",
                 "diff": "full weight difference"}


def _lycoris_algorithm(key: str) -> str | None:
    if not KOHYA_PREFIX.match(key) or "." not in key:
        return None
    match = LYCORIS_SUFFIX.match(key.split(".", 1)[1])
    return LYCORIS_NAMES[match["algorithm"].split("_")[0]] if match else None


def classify_single_file(header: SafetensorsHeader) -> str:
    """Tell kohya from diffusers by the tensor names alone (no data read)."""
    names = list(header.tensors)
    name = header.filename
    if any(key.startswith("base_model.model.") for key in names):
        raise FormatError(
            "missing_file",
            f"{name} holds PEFT adapter tensors; upload it together with its adapter_config.json.",
            name,
        )
    for key in names:
        algorithm = _lycoris_algorithm(key)
        if algorithm:
            raise FormatError(
                "unsupported_peft_type",
                f"{name}: tensor '{key}' belongs to a {algorithm} (LyCORIS) adapter; only LoRA is supported.",
                name,
            )
    if names and all(KOHYA_PREFIX.match(key) for key in names):
        return "kohya"
    if names and all(DIFFUSERS_PREFIX.match(key) for key in names):
        return "diffusers"
    raise FormatError(
        "unknown_format",
        f"{name} is not a LoRA format the hub understands: expected PEFT (adapter_config.json + "
        "adapter_model.safetensors), kohya (lora_unet_/lora_te_ keys) or diffusers (unet./text_encoder./"
        "transformer. keys) naming.",
        name,
    )


def _alpha_of(parts: dict, filename: str) -> float | None:
    if "alpha" not in parts:
        return None
    key, tensor = parts["alpha"]
    if tensor.numel() != 1:
        raise FormatError(
            "shape_mismatch", f"{filename}: '{key}' must be a single number, found shape {list(tensor.shape)}.", filename
        )
    return float(tensor.reshape(()).item())


def _embedded_lora_configs(metadata: dict[str, str], filename: str) -> dict[str, LoraSettings]:
    """component ("" when unprefixed) → LoraSettings from diffusers' embedded LoraConfig."""
    raw = metadata.get(DIFFUSERS_CONFIG_METADATA)
    if not raw:
        return {}
    try:
        blob = json.loads(raw)
    except ValueError:
        blob = None
    if not isinstance(blob, dict):
        raise FormatError("invalid_config", f"{filename}: {DIFFUSERS_CONFIG_METADATA} metadata is not a JSON object.", filename)
    per_component: dict[str, dict] = {}
    for key, value in blob.items():
        component, _, field = key.rpartition(".")
        per_component.setdefault(component, {})[field] = value
    return {component: lora_settings(config, filename) for component, config in per_component.items()}


def _module_scaling(module: str, parts: dict, configs: dict[str, LoraSettings], filename: str):
    """(expected rank or None, rank → scale) for one module: a stored .alpha
    wins, then an embedded LoraConfig, else alpha = r (scale 1)."""
    component, _, inner = module.partition(".")
    settings = configs.get(component) or configs.get("")
    if not inner or settings is None:
        inner = module
    stored_alpha = _alpha_of(parts, filename)
    expected_rank = settings.rank_for(inner) if settings else None
    if stored_alpha is not None:
        return expected_rank, lambda rank: stored_alpha / rank
    if settings is not None:
        return expected_rank, lambda rank: settings.scale_for(inner, rank)
    return None, lambda rank: 1.0


def parse_single_file_adapter(
    path: Path, *, base_shapes: dict[str, list[int]] | None = None, filename: str | None = None
) -> CanonicalAdapter:
    header = read_safetensors_header(path, allowed_dtypes=ADAPTER_DTYPES, filename=filename)
    name = header.filename
    format_name = classify_single_file(header)
    suffix_roles = KOHYA_SUFFIX_ROLES if format_name == "kohya" else DIFFUSERS_SUFFIX_ROLES
    configs = _embedded_lora_configs(header.metadata, name) if format_name == "diffusers" else {}
    groups, leftovers = group_lora_tensors(load_tensors(header), suffix_roles)
    if leftovers:
        key = sorted(leftovers)[0]
        raise FormatError("unexpected_tensor", f"{name}: tensor '{key}' is not part of a {format_name} LoRA.", name)

    modules = {}
    for module, parts in groups.items():
        expected_rank, scale_for_rank = _module_scaling(module, parts, configs, name)
        modules[module] = lora_module_from_group(
            module, parts, filename=name, scale_for_rank=scale_for_rank, expected_rank=expected_rank
        )
    if not modules:
        raise FormatError("missing_tensor", f"{name} contains no LoRA tensors.", name)

    if base_shapes is not None:
        if format_name == "kohya":
            # kohya names lost their dots: compare with the base's names mangled the same way.
            modules = align_modules_to_base(
                modules, base_shapes, filename=name,
                adapter_key=lambda n: KOHYA_PREFIX.sub("", n), base_key=lambda n: n.replace(".", "_"), separator="_",
            )
        else:
            modules = align_modules_to_base(modules, base_shapes, filename=name)
    return _single_file_adapter(format_name, modules, header.metadata)


def _single_file_adapter(format_name: str, modules: dict, metadata: dict) -> CanonicalAdapter:
    """Adapter-level fields a single file does not state: rank is the largest
    module rank, alpha (= scale·r) the most common one; modules that differ
    are listed in rank_pattern / alpha_pattern by their full path."""
    alphas = {path: round(module.scale * module.rank, 6) for path, module in modules.items()}
    rank = max(module.rank for module in modules.values())
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return CanonicalAdapter(
        format=format_name,
        peft_type="LORA",
        modules=modules,
        rank=rank,
        alpha=alpha,
        use_dora=any(module.magnitude is not None for module in modules.values()),
        target_modules=sorted({short_module_name(path) for path in modules}),
        rank_pattern={path: m.rank for path, m in modules.items() if m.rank != rank},
        alpha_pattern={path: a for path, a in alphas.items() if a != alpha},
        dtype=most_common_dtype(m.A for m in modules.values()),
        config=dict(metadata),  # kohya keeps its training settings (ss_*) here
    )
