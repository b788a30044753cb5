"""The one in-memory form every adapter format is normalised to.

Every later feature (search features, compose, merge, generation) works on
`CanonicalAdapter` and never on a file format: a LoRA module is the update
ΔW = scale · B @ A (optionally re-normalised by a DoRA magnitude vector).
Pure Python + torch: nothing here imports Django.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .errors import FormatError


class LowRankFactors:
    """rank and shape of an update ΔW = scale · B @ A, for dataclasses with fields
    A (r × in_features) and B (out_features × r)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the base weight this update changes."""
        return int(self.B.shape[0]), int(self.A.shape[1])


@dataclass
class LoraModule(LowRankFactors):
    """One adapted module.

    A: r × in_features (conv kernels flattened to r × (in·kh·kw)).
    B: out_features × r.
    scale: the factor in ΔW = scale · B @ A (alpha/r, alpha/√r for rsLoRA,
        after rank_pattern / alpha_pattern).
    magnitude: DoRA magnitude vector (out_features,), or None for plain LoRA.
    kind: "linear", "conv" or "embedding" (PEFT embeddings store ΔWᵀ).
    conv_shape: original A weight shape for conv LoRAs (to write them back).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    kind: str = "linear"
    conv_shape: tuple[int, ...] | None = None

    # ------------------------------------------------------------------
    # Helpers added for the parsers and later features (merge, compose).

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's own layout, as PEFT's get_delta_weight:
        (out, in) for linear, (out, in, kh, kw) for conv, and
        (num_embeddings, dim) for embeddings (PEFT stores those transposed)."""
        delta = (self.B.float() @ self.A.float()) * self.scale
        if self.kind == "embedding":
            return delta.T
        if self.kind == "conv" and self.conv_shape is not None:
            return delta.reshape(int(self.B.shape[0]), *self.conv_shape[1:])
        return delta

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """The base weight with this module merged in (float32). DoRA
        re-normalises each output row of W + ΔW to the magnitude vector,
        exactly as PEFT's DoRA merge does; only linear DoRA is supported."""
        merged = base_weight.float() + self.delta_weight()
        if self.magnitude is None:
            return merged
        if self.kind != "linear":
            raise NotImplementedError("DoRA merge is only implemented for linear modules")
        row_norm = torch.linalg.norm(merged, dim=1)
        return (self.magnitude.float() / row_norm).view(-1, 1) * merged


@dataclass
class CanonicalAdapter:
    """A parsed adapter: module path (base-model state-dict name without
    ".weight") → LoraModule, plus what the source format said about itself.

    Module paths are the base model's own names whenever the parser was given
    the base's shapes; without them, single-file adapters keep the names the
    file uses ("lora_te_..._q_proj" for kohya, "text_encoder.<path>" for
    diffusers) and PEFT adapters the name PEFT saved (prefix stripped)."""

    format: str  # "peft" | "kohya" | "diffusers"
    peft_type: str  # "LORA" (DoRA / rsLoRA are LORA with flags, as in PEFT)
    modules: dict[str, LoraModule]
    rank: int
    alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    target_modules: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # Full tensors PEFT saves for modules_to_save (key as in the base model).
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    dtype: str = "float32"
    config: dict = field(default_factory=dict)  # source config, as uploaded


# ----------------------------------------------------------------------
# Invariants shared by every parser (PEFT, kohya, diffusers), so that the
# formats differ only in how they name tensors, never in what they accept.

_KOHYA_PREFIX = re.compile(r"^lora_(?:te\d?|unet)_")
_LAYER_INDEX = re.compile(r"_\d+_")


def short_module_name(path: str) -> str:
    """The module's own name: "model.layers.0.self_attn.q_proj" → "q_proj".

    Unresolved kohya names
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj") have lost their
    dots, so take what follows the last "_<index>_" ("self_attn_q_proj")."""
    if "." in path:
        return path.rsplit(".", 1)[-1]
    core = _KOHYA_PREFIX.sub("", path)
    pieces = _LAYER_INDEX.split(core)
    return pieces[-1] if pieces[-1] else core


def lora_module_from_tensors(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scale_for_rank,
    module: str,
    filename: str,
    kind: str | None = None,
    magnitude: torch.Tensor | None = None,
    expected_rank: int | None = None,
) -> LoraModule:
    """Check one stored A/B pair and bring it to canonical form.

    A: r × in (conv: r × in × kh × kw), B: out × r (conv: out × r × 1 × 1).
    kind: None infers linear / conv from A's number of dimensions.
    scale_for_rank: rank → scale; each format derives the scale differently
        (config alpha, rank_pattern, rsLoRA, a stored .alpha).
    expected_rank: the rank the format's config promises for this module.
    """

    def refuse(code: str, what: str) -> FormatError:
        return FormatError(code, f"{filename}: module '{module}' {what}.", filename)

    if kind is None:
        kind = "conv" if A.ndim > 2 else "linear"
    conv_shape = None
    if kind == "conv":
        if A.ndim < 3 or B.ndim != A.ndim or any(dim != 1 for dim in B.shape[2:]):
            raise refuse("shape_mismatch", f"has conv LoRA shapes A {list(A.shape)} and B {list(B.shape)}; "
                         "expected A r×in×k… and B out×r×1…")
        conv_shape = tuple(int(dim) for dim in A.shape)
        A = A.reshape(A.shape[0], -1)
        B = B.reshape(B.shape[0], B.shape[1])
    elif A.ndim != 2 or B.ndim != 2:
        raise refuse("shape_mismatch", f"has A {list(A.shape)} and B {list(B.shape)}; both must be matrices")

    rank = int(A.shape[0])
    if int(B.shape[1]) != rank:
        raise refuse("rank_mismatch", f"has A with {rank} rows (rank) but B with {int(B.shape[1])} columns")
    if rank == 0:
        raise refuse("rank_mismatch", "has rank 0")
    if expected_rank is not None and rank != expected_rank:
        raise refuse("rank_mismatch", f"has rank {rank} but the config says r={expected_rank} for it")
    if magnitude is not None:
        magnitude = magnitude.reshape(-1)  # conv DoRA stores 1×out×1×1
        if magnitude.numel() != B.shape[0]:
            raise refuse("shape_mismatch", f"has a DoRA magnitude of {magnitude.numel()} values for "
                         f"{int(B.shape[0])} output features")
    return LoraModule(
        A=A, B=B, scale=float(scale_for_rank(rank)), magnitude=magnitude, kind=kind, conv_shape=conv_shape
    )


def base_module_shapes(base_shapes: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """State-dict weight shapes keyed by module path (".weight" stripped)."""
    suffix = ".weight"
    return {name[: -len(suffix)]: tuple(shape) for name, shape in base_shapes.items() if name.endswith(suffix)}


def expected_lora_shape(base_shape: tuple[int, ...], kind: str, fan_in_fan_out: bool = False) -> tuple[int, int] | None:
    """The (out, in) a LoRA module must have to update a base weight, or None
    if no LoRA fits it (1-D weights). Conv weights compare flattened;
    embeddings transposed (PEFT's lora_embedding_A is r × num_embeddings);
    fan_in_fan_out bases (GPT-2 Conv1D) store weights as in × out."""
    if len(base_shape) < 2:
        return None
    if kind == "embedding":
        return (base_shape[1], base_shape[0]) if len(base_shape) == 2 else None
    if fan_in_fan_out and len(base_shape) == 2:
        return (base_shape[1], base_shape[0])
    return (base_shape[0], math.prod(base_shape[1:]))


def resolve_name(name: str, index: dict[str, list[str]], separator: str) -> tuple[str | None, list[str]]:
    """Find the base name `name` refers to in `index` (comparable form →
    real base names). An exact match wins; otherwise a prefix difference on
    either side is accepted ("model.layers.0.q" vs "layers.0.q" and back)
    only when exactly one base name fits. Returns (match or None, candidates)."""
    exact = index.get(name, [])
    if len(exact) == 1:
        return exact[0], exact
    if exact:
        return None, exact
    candidates = sorted(
        {
            real
            for comparable, reals in index.items()
            if name.endswith(separator + comparable) or comparable.endswith(separator + name)
            for real in reals
        }
    )
    return (candidates[0] if len(candidates) == 1 else None), candidates


def align_modules_to_base(
    modules: dict[str, LoraModule],
    base_shapes: dict[str, list[int]],
    *,
    filename: str,
    adapter_key=lambda name: name,
    base_key=lambda name: name,
    separator: str = ".",
    fan_in_fan_out: bool = False,
) -> dict[str, LoraModule]:
    """Rename every module to the base model's module path and check its
    (out, in) against the base weight. Modules that are not in the base, or
    match several base modules, are shape mismatches: the adapter was not
    made for this base. adapter_key / base_key map both sides to a common
    comparable spelling (kohya mangles '.' to '_')."""
    index: dict[str, list[str]] = {}
    base_modules = base_module_shapes(base_shapes)
    for base_name in base_modules:
        index.setdefault(base_key(base_name), []).append(base_name)

    aligned: dict[str, LoraModule] = {}
    for name, module in modules.items():
        base_name, candidates = resolve_name(adapter_key(name), index, separator)
        if base_name is None:
            detail = (
                f"matches several base modules ({', '.join(candidates[:4])})" if candidates
                else "does not exist in the base model"
            )
            raise FormatError("shape_mismatch", f"{filename}: module '{name}' {detail}.", filename)
        base_shape = base_modules[base_name]
        expected = expected_lora_shape(base_shape, module.kind, fan_in_fan_out)
        if expected != module.shape:
            raise FormatError(
                "shape_mismatch",
                f"{filename}: module '{name}' has (out, in) = {list(module.shape)} but base weight "
                f"'{base_name}.weight' has shape {list(base_shape)}"
                + (f" (needs {list(expected)})" if expected and list(expected) != list(base_shape) else "")
                + ".",
                filename,
            )
        if base_name in aligned:
            raise FormatError(
                "shape_mismatch", f"{filename}: two adapter modules both map to base module '{base_name}'.", filename
            )
        aligned[base_name] = module
    return aligned


def group_lora_tensors(
    tensors: dict[str, torch.Tensor], suffix_roles: dict[str, str]
) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Split stored keys into module → role → (key, tensor) using each
    format's suffix table (longest suffix wins, so ".lora_A.weight" is not
    mistaken for ".weight"). Keys with no LoRA suffix come back unchanged as
    leftovers for the caller to classify."""
    suffixes = sorted(suffix_roles, key=len, reverse=True)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    leftovers: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(s) and len(key) > len(s)), None)
        if suffix is None:
            leftovers[key] = tensor
            continue
        groups.setdefault(key[: -len(suffix)], {})[suffix_roles[suffix]] = (key, tensor)
    return groups, leftovers


def lora_module_from_group(
    module: str,
    parts: dict[str, tuple[str, torch.Tensor]],
    *,
    filename: str,
    scale_for_rank,
    expected_rank: int | None = None,
) -> LoraModule:
    """Build one module from its grouped tensors (roles "A"/"B", or
    "embedding_A"/"embedding_B", optional "magnitude")."""
    is_embedding = "embedding_A" in parts or "embedding_B" in parts
    a_role, b_role = ("embedding_A", "embedding_B") if is_embedding else ("A", "B")
    for present, missing in ((a_role, b_role), (b_role, a_role)):
        if present in parts and missing not in parts:
            raise FormatError(
                "missing_tensor",
                f"{filename}: '{parts[present][0]}' has no matching {missing.replace('embedding_', '')} tensor "
                f"for module '{module}'.",
                filename,
            )
    if a_role not in parts:
        stray = next(iter(parts.values()))[0]
        raise FormatError("missing_tensor", f"{filename}: '{stray}' belongs to no LoRA A/B pair.", filename)
    A, B = parts[a_role][1], parts[b_role][1]
    magnitude = parts["magnitude"][1] if "magnitude" in parts else None
    return lora_module_from_tensors(
        A, B, scale_for_rank=scale_for_rank, module=module, filename=filename,
        kind="embedding" if is_embedding else None, magnitude=magnitude, expected_rank=expected_rank,
    )


def most_common_dtype(tensors) -> str:
    """torch dtype name ("float32") most tensors use; ties go to the first seen."""
    counts: dict[str, int] = {}
    for tensor in tensors:
        name = str(tensor.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + 1
    return max(counts, key=counts.get) if counts else "float32"


def summarize_adapter(adapter: CanonicalAdapter) -> dict:
    """JSON-able metadata for the hub's database and API."""
    stored = [t for m in adapter.modules.values() for t in (m.A, m.B, m.magnitude) if t is not None]
    stored += list(adapter.extra_tensors.values())
    return {
        "format": adapter.format,
        "peft_type": adapter.peft_type,
        "rank": int(adapter.rank),
        "alpha": float(adapter.alpha),
        "use_rslora": bool(adapter.use_rslora),
        "use_dora": bool(adapter.use_dora),
        "target_modules": sorted({short_module_name(path) for path in adapter.modules}),
        "rank_pattern": {str(k): int(v) for k, v in adapter.rank_pattern.items()},
        "alpha_pattern": {str(k): float(v) for k, v in adapter.alpha_pattern.items()},
        "module_shapes": {path: list(module.shape) for path, module in sorted(adapter.modules.items())},
        "dtype": adapter.dtype,
        "parameter_count": int(sum(t.numel() for t in stored)),
        "module_count": len(adapter.modules),
        "extra_tensors": sorted(adapter.extra_tensors),
    }
