"""PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors.

Follows what PEFT 0.21 writes and how it reads it back:

* keys are "base_model.model.<module>.lora_A.weight" / ".lora_B.weight",
  "<module>.lora_embedding_A" / "_B" for embeddings (stored so that
  ΔW = (B @ A)ᵀ), and "<module>.lora_magnitude_vector" for DoRA (older PEFT
  releases wrote ".lora_magnitude_vector.weight"; both are accepted);
* modules_to_save are stored as full tensors under their own names, and
  embedding layers PEFT decides to save as "<module>.base_layer.weight";
* per-module rank / alpha come from rank_pattern / alpha_pattern using
  PEFT's own matching rule (`get_pattern_key`): the first pattern key K for
  which re.match(rf"(.*\\.)?({K})$", module) succeeds, in config order;
* scale = alpha / r, or alpha / √r with use_rslora.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import regex
import torch

from .canonical import (
    CanonicalAdapter,
    align_modules_to_base,
    group_lora_tensors,
    lora_module_from_group,
    most_common_dtype,
    resolve_name,
    short_module_name,
)
from .errors import FormatError
from .safetensors_header import ADAPTER_DTYPES, load_tensors, read_json_object, read_safetensors_header

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"  # PEFT's shorthand; saved configs normally hold the expanded list
# Patterns in adapter_config.json are regular expressions from an untrusted
# upload. They run under the `regex` module (re-compatible, a transformers
# dependency) with a time limit, so a pathological pattern cannot stall a worker.
PATTERN_TIMEOUT_S = 0.25

PEFT_SUFFIX_ROLES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "embedding_A",
    ".lora_embedding_B": "embedding_B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}

# LoRA options whose update is not ΔW = s·B@A on the module's own weight
# (extra bias, parameter targets, replicated layers, token deltas, pooled or
# block-diagonal inputs, expert routing). Refused rather than misrepresented.
UNSUPPORTED_OPTIONS = {
    "lora_bias": "a trained bias on lora_B",
    "target_parameters": "LoRA on raw parameters",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trainable token deltas",
    "use_qalora": "QA-LoRA pooled inputs",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow expert routing",
}


@dataclass
class LoraSettings:
    """The validated parts of adapter_config.json that decide what ΔW is."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"

    def rank_for(self, module: str) -> int:
        return self.rank_pattern.get(get_pattern_key(self.rank_pattern, module), self.r)

    def alpha_for(self, module: str) -> float:
        return self.alpha_pattern.get(get_pattern_key(self.alpha_pattern, module), self.lora_alpha)

    def scale_for(self, module: str, rank: int) -> float:
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str) -> bool:
        """PEFT's target_modules rule: a string is a full-match regex, a list
        matches a module named exactly so or ending in ".<entry>"."""
        if self.target_modules is None or self.target_modules == ALL_LINEAR:
            return True
        if isinstance(self.target_modules, str):
            return _matches(self.target_modules, module, full=True)
        return module in self.target_modules or any(module.endswith("." + t) for t in self.target_modules)

    def saves_module(self, tensor_key: str) -> bool:
        """PEFT's modules_to_save rule, applied to a stored tensor name."""
        return any(_matches(rf"(^|.*\.){name}($|\..*)", tensor_key) for name in self.modules_to_save)


def _matches(pattern: str, text: str, *, full: bool = False) -> bool:
    try:
        match = (regex.fullmatch if full else regex.match)(pattern, text, timeout=PATTERN_TIMEOUT_S)
    except TimeoutError:
        raise FormatError(
            "invalid_config",
            f"{ADAPTER_CONFIG_NAME}: the pattern {pattern!r} takes too long to match module names.",
            ADAPTER_CONFIG_NAME,
        ) from None
    return match is not None


def get_pattern_key(patterns, module: str) -> str:
    """Same rule as peft.utils.other.get_pattern_key (first match, in order)."""
    for key in patterns:
        if _matches(rf"(.*\.)?({key})$", module):
            return key
    return module


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _compiles(pattern: str) -> bool:
    try:
        regex.compile(pattern)
    except regex.error:
        return False
    return True


# field → (check, what a valid value looks like); defaults are PEFT's.
_CONFIG_SCHEMA = {
    "r": (_is_positive_int, "a positive integer"),
    "lora_alpha": (_is_number, "a finite number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "target_modules": (
        lambda v: v is None or (isinstance(v, str) and _compiles(v)) or _is_str_list(v),
        "a list of module names or a regular expression",
    ),
    "modules_to_save": (lambda v: v is None or _is_str_list(v), "a list of module names"),
    "rank_pattern": (
        lambda v: v is None or (isinstance(v, dict) and all(_is_positive_int(x) and _compiles(k) for k, x in v.items())),
        "an object mapping module patterns to positive integers",
    ),
    "alpha_pattern": (
        lambda v: v is None or (isinstance(v, dict) and all(_is_number(x) and _compiles(k) for k, x in v.items())),
        "an object mapping module patterns to numbers",
    ),
    "bias": (lambda v: v in ("none", "all", "lora_only"), '"none", "all" or "lora_only"'),
}


def validate_lora_config(config: dict, filename: str = ADAPTER_CONFIG_NAME) -> LoraSettings:
    """Check adapter_config.json: peft_type LORA plus the schema above."""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise FormatError("invalid_config", f"{filename}: peft_type must be a string such as \"LORA\".", filename)
    if peft_type.upper() != "LORA":
        raise FormatError(
            "unsupported_peft_type",
            f"{filename}: peft_type {peft_type!r} is not supported; only LoRA adapters (peft_type \"LORA\") are.",
            filename,
        )
    return lora_settings(config, filename)


def lora_settings(config: dict, filename: str) -> LoraSettings:
    """LoraSettings from a LoraConfig dict (PEFT's adapter_config.json, or the
    one diffusers embeds in safetensors metadata), checked against the schema."""
    for name, (is_valid, expected) in _CONFIG_SCHEMA.items():
        if name in config and not is_valid(config[name]):
            raise FormatError(
                "invalid_config", f"{filename}: {name} is {config[name]!r}; it must be {expected}.", filename
            )
    for name, meaning in UNSUPPORTED_OPTIONS.items():
        if config.get(name):
            raise FormatError(
                "unsupported_feature", f"{filename}: {name} ({meaning}) is not supported by the hub.", filename
            )
    return LoraSettings(
        r=config.get("r", 8),
        lora_alpha=config.get("lora_alpha", 8),
        use_rslora=config.get("use_rslora", False),
        use_dora=config.get("use_dora", False),
        fan_in_fan_out=config.get("fan_in_fan_out", False),
        target_modules=config.get("target_modules"),
        modules_to_save=config.get("modules_to_save") or [],
        rank_pattern=config.get("rank_pattern") or {},
        alpha_pattern=config.get("alpha_pattern") or {},
        bias=config.get("bias", "none"),
    )


def _strip_peft_prefix(tensors: dict[str, torch.Tensor], filename: str) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_KEY_PREFIX):
            raise FormatError(
                "unexpected_tensor",
                f"{filename}: tensor '{key}' does not start with '{PEFT_KEY_PREFIX}' as PEFT adapter tensors do.",
                filename,
            )
        stripped[key[len(PEFT_KEY_PREFIX):]] = tensor
    return stripped


def _full_tensors(
    leftovers: dict[str, torch.Tensor], settings: LoraSettings, filename: str
) -> dict[str, torch.Tensor]:
    """Classify the non-LoRA tensors PEFT may save next to the LoRA pairs."""
    extra = {}
    for key, tensor in leftovers.items():
        if key.endswith(".base_layer.weight"):  # an embedding layer saved because its vocab may have changed
            extra[key.replace(".base_layer.weight", ".weight")] = tensor
        elif settings.saves_module(key) or (settings.bias != "none" and key.endswith(".bias")):
            extra[key] = tensor
        else:
            raise FormatError(
                "unexpected_tensor",
                f"{filename}: tensor '{PEFT_KEY_PREFIX}{key}' is neither a LoRA tensor nor a module to save.",
                filename,
            )
    return extra


def _check_extra_tensors_against_base(
    extra: dict[str, torch.Tensor], base_shapes: dict[str, list[int]], filename: str
) -> dict[str, torch.Tensor]:
    index = {name: [name] for name in base_shapes}
    aligned = {}
    for key, tensor in extra.items():
        base_key, _ = resolve_name(key, index, ".")
        if base_key is None or list(base_shapes[base_key]) != list(tensor.shape):
            found = f"has shape {list(base_shapes[base_key])}" if base_key else "does not exist"
            raise FormatError(
                "shape_mismatch",
                f"{filename}: saved tensor '{key}' has shape {list(tensor.shape)} but the base model's '{base_key or key}' "
                f"{found}.",
                filename,
            )
        aligned[base_key] = tensor
    return aligned


def parse_peft_adapter(
    config_path: Path,
    weights_path: Path,
    *,
    base_shapes: dict[str, list[int]] | None = None,
    config_filename: str = ADAPTER_CONFIG_NAME,
    weights_filename: str = ADAPTER_WEIGHTS_NAME,
) -> CanonicalAdapter:
    config = read_json_object(config_path, config_filename)
    settings = validate_lora_config(config, config_filename)
    header = read_safetensors_header(weights_path, allowed_dtypes=ADAPTER_DTYPES, filename=weights_filename)
    tensors = _strip_peft_prefix(load_tensors(header), weights_filename)
    groups, leftovers = group_lora_tensors(tensors, PEFT_SUFFIX_ROLES)
    extra = _full_tensors(leftovers, settings, weights_filename)

    modules = {}
    for module, parts in groups.items():
        if not settings.targets(module):
            raise FormatError(
                "invalid_config",
                f"{config_filename}: module '{module}' has LoRA weights but is not covered by target_modules "
                f"{settings.target_modules!r}.",
                config_filename,
            )
        if settings.use_dora != ("magnitude" in parts):
            problem = "has no lora_magnitude_vector although use_dora is true" if settings.use_dora else (
                "has a lora_magnitude_vector although use_dora is false")
            raise FormatError(
                "missing_tensor" if settings.use_dora else "unexpected_tensor",
                f"{weights_filename}: module '{module}' {problem}.",
                weights_filename,
            )
        modules[module] = lora_module_from_group(
            module,
            parts,
            filename=weights_filename,
            scale_for_rank=lambda rank, module=module: settings.scale_for(module, rank),
            expected_rank=settings.rank_for(module),
        )
    if not modules:
        raise FormatError("missing_tensor", f"{weights_filename} contains no LoRA A/B tensors.", weights_filename)

    if base_shapes is not None:
        modules = align_modules_to_base(
            modules, base_shapes, filename=weights_filename, fan_in_fan_out=settings.fan_in_fan_out
        )
        extra = _check_extra_tensors_against_base(extra, base_shapes, weights_filename)

    return CanonicalAdapter(
        format="peft",
        peft_type="LORA",
        modules=modules,
        rank=settings.r,
        alpha=float(settings.lora_alpha),
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        target_modules=sorted({short_module_name(path) for path in modules}),
        rank_pattern=dict(settings.rank_pattern),
        alpha_pattern={k: float(v) for k, v in settings.alpha_pattern.items()},
        extra_tensors=extra,
        dtype=most_common_dtype(m.A for m in modules.values()),
        config=config,
    )
