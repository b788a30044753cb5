"""Compose N LoRA adapters into one adapter: small pure functions over tensors.

Every method is defined on the updates ΔWᵢ = sᵢ·Bᵢ·Aᵢ (sᵢ already holds
alpha/r, alpha/√r for rsLoRA, rank_pattern / alpha_pattern), so ranks may
differ between adapters, a module an adapter lacks counts as ΔWᵢ = 0, and
negative weights subtract. Factors are laid out as the canonical form keeps
them (B: out×r, A: r×in; embeddings as PEFT stores them, i.e. ΔWᵀ), and every
method below is invariant to that transpose.

DoRA. A DoRA module's effective update is W' − W with
W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ (norm of each output row, exactly as PEFT
merges DoRA and as `LoraModule.merged_weight` computes it). That depends on the
base weight W and is full-rank in general (the rescaling touches W itself), so
a DoRA module needs its `base_weight` (`ModuleUpdate.base_weight`,
`compose_adapters(base_weights=...)`); without it DoRA is refused with a
ValueError rather than silently dropping the magnitude. The effective update
is formed densely for that one module and factorised exactly
(`full_rank_factors`, SVD form, rank min(out, in)) before the low-rank methods
see it.

Methods (`METHODS`):

* ``linear`` / ``cat`` / ``task_arithmetic`` — exact: Σ wᵢ·ΔWᵢ stored
  losslessly at rank Σrᵢ as stacked factors A = [w₁s₁A₁; …; wₙsₙAₙ],
  B = [B₁ … Bₙ] (FLoRA's stacking; the weight sits on A exactly as PEFT's
  ``cat`` puts it there, A·w·s in that order, so plain equal-rank inputs give
  PEFT's ``cat`` factors bit for bit). ``task_arithmetic`` is the same
  arithmetic with the weights read as λ.
* ``svd`` — the best rank-r approximation of the linear sum (FedSVD-style
  re-factorisation), computed from the stacked factors by
  `kernels.lowrank.lowrank_svd` in O((out+in)·R²), never forming out×in.
  B = U·diag(S), A = Vh as PEFT and kohya's svd_merge_lora lay them out.
  Exact when r ≥ R = Σrᵢ; otherwise the error is √(Σ dropped σ²)/√(Σ σ²).
  r defaults to PEFT's default, the largest input rank. PEFT's ``svd_clamp``
  (a quantile clamp of the factor entries) is not reproduced: it depends on
  the signs of the singular vectors, i.e. it is not a function of ΔW.
* ``iso_c`` — isotropic merging (Iso-C, "No Task Left Behind", Marczak et al.
  2025): M = Σ wᵢ·ΔWᵢ = U·diag(σ)·Vᵀ, every singular value replaced by their
  mean, ΔW = α·σ̄·U·Vᵀ (α = ``iso_scale``, 1.0 by default; the paper tunes it
  on held-out data). The paper takes the mean over the whole spectrum of a
  full-rank task matrix; a sum of LoRAs has rank ≤ R, and the singular
  vectors of its zero singular values are arbitrary, so the mean runs over
  the numerical rank k of M (σ above the float noise floor of the factors)
  and the result lives in M's own row/column spaces. With α = 1 this keeps
  M's nuclear norm (k·σ̄ = Σσ). The SVD comes from lowrank_svd (never out×in).
  ``rank`` optionally keeps only the r leading directions (by M's σ); the
  error is then √((k−r)/k) relative to the untruncated Iso-C update.
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and their
  ``_svd`` variants — PEFT's `peft.utils.merge_utils` rules on the dense
  ΔWᵢ of ONE module at a time (the same definitions, reimplemented here
  because kernels/ imports only torch): magnitude pruning keeps the
  int(density·numel) largest |x| (PEFT's torch.topk, found here through
  torch.kthvalue, 4× faster); DARE keeps each entry with
  probability density and rescales by 1/density; TIES elects the sign per
  entry ("total": sign of the sum, "frequency": the most frequent sign, ties
  to +) over the pruned task tensors and averages the weighted entries that
  agree (divided by their count, at least 1). PEFT elects on the unweighted
  tensors; a negative weight is read as negating the task vector, so the
  task tensor is sign(wᵢ)·ΔWᵢ with weight |wᵢ| (identical to PEFT for
  wᵢ ≥ 0; PEFT would elect on +ΔWᵢ and then add entries of −ΔWᵢ that oppose
  the elected sign). DARE masks come from a torch.Generator seeded with
  ``seed``: for each present adapter in order, torch.bernoulli(full(density))
  (compose_adapters gives every module its own seed, `module_seed(seed,
  path)`). For wᵢ ≥ 0 these rules equal peft.utils.merge_utils bit for bit,
  DARE included when PEFT's global generator is seeded with the same seed.
  The plain variants return the exact dense result factorised at full rank
  min(out, in) in SVD form (`full_rank_factors`; error 0 up to float
  rounding), as PEFT's *_svd would at svd_rank = min(out, in).
  The ``_svd`` variants truncate it to ``rank`` with a randomized SVD
  (Halko–Martinsson–Tropp range finder, Gaussian test matrix from the same
  seeded generator, ``oversample`` = 16 extra columns, ``power_iters`` = 8
  power iterations with re-orthonormalisation; an exact dense SVD when rank +
  oversample ≥ min(out, in)) and report ‖D − B·A‖_F / ‖D‖_F of that step.
  Pruned sums have flat spectra (σ₁₆/σ₁₇ ≈ 1.02 on the benchmark), where the
  rank-r subspace is ill-determined: 10 / 4 already gives an error within
  0.1 % of the optimum but a ΔW 10–18 % away from the exact truncation that
  PEFT computes; 16 / 8 brings that to ≈ 0.5 % for a few hundredths of a
  second per module, small beside forming and pruning the dense ΔWᵢ.
* ``peft_linear`` — PEFT's ``add_weighted_adapter(combination_type="linear")``:
  A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ, mixing factors (so cross
  terms BᵢAⱼ appear: approximate). Requires equal ranks; computed with PEFT's
  own operations (float32 weight tensor, stack, multiply, sum) in the input
  dtype, so factors match PEFT bit for bit. DoRA is refused (factor mixing
  has no meaning for an update that is not B·A). The reported error is
  ‖B·A − Σ wᵢΔWᵢ‖_F / ‖Σ wᵢΔWᵢ‖_F, computed from factors.

Every composed module has scale 1.0: PEFT's new adapter has r = lora_alpha.
(PEFT copies use_rslora from the first adapter into the new config, so after
an rsLoRA first adapter its composed update is scaled by √r; that is a PEFT
quirk and not reproduced.)
"""
from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from hub.formats.canonical import LowRankFactors

from .lowrank import lowrank_svd

Tensor = torch.Tensor


@dataclass(frozen=True)
class MethodInfo:
    name: str
    exact: bool  # the composed ΔW always equals Σ wᵢ·ΔWᵢ
    dense: bool  # forms the dense out×in update of each module (one module at a time)
    description: str
    params: tuple[str, ...] = ()  # keyword parameters the method reads besides weights


_METHOD_TABLE = [
    # name, exact, dense, params, description
    ("linear", True, False, (),
     "Exact Σ wᵢ·ΔWᵢ stored losslessly as stacked factors at rank Σrᵢ (FLoRA stacking)."),
    ("cat", True, False, (), "PEFT's name for linear: concatenated factors, rank Σrᵢ, exact."),
    ("task_arithmetic", True, False, (),
     "Task arithmetic Σ λᵢ·ΔWᵢ (weights are the λᵢ); exact, rank Σrᵢ."),
    ("svd", False, False, ("rank",),
     "Best rank-r approximation of Σ wᵢ·ΔWᵢ from the factors (exact when r ≥ Σrᵢ)."),
    ("iso_c", False, False, ("rank", "iso_scale"),
     "Isotropic merging (Iso-C): the spectrum of Σ wᵢ·ΔWᵢ flattened to its mean."),
    ("ties", False, True, ("density", "majority_sign"),
     "TIES (trim by magnitude, elect sign, disjoint mean) on the dense ΔWᵢ; full rank."),
    ("ties_svd", False, True, ("rank", "density", "majority_sign", "seed"), "TIES, then a randomized rank-r SVD."),
    ("dare_linear", False, True, ("density", "seed"),
     "DARE (random drop, rescale 1/density), then the weighted sum; full rank."),
    ("dare_ties", False, True, ("density", "majority_sign", "seed"),
     "DARE drop and rescale, then TIES sign election; full rank."),
    ("dare_linear_svd", False, True, ("rank", "density", "seed"), "dare_linear, then a randomized rank-r SVD."),
    ("dare_ties_svd", False, True, ("rank", "density", "majority_sign", "seed"),
     "dare_ties, then a randomized rank-r SVD."),
    ("magnitude_prune", False, True, ("density",),
     "Keep the largest-|x| fraction of each ΔWᵢ, then the weighted sum; full rank."),
    ("magnitude_prune_svd", False, True, ("rank", "density", "seed"),
     "magnitude_prune, then a randomized rank-r SVD."),
    ("peft_linear", False, False, (),
     "PEFT's linear: √w-weighted sums of A and of B (equal ranks only; approximate)."),
]
METHODS: dict[str, MethodInfo] = {
    name: MethodInfo(name, exact, dense, description, params)
    for name, exact, dense, params, description in _METHOD_TABLE
}
_STACKED = {"linear", "cat", "task_arithmetic"}
_RANDOM = {"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"}
_TAKES_RANK = {"svd", "iso_c", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"}


@dataclass
class ModuleUpdate(LowRankFactors):
    """One adapter's update of one module: ΔW = scale·B·A (B: out×r, A: r×in),
    or, with a DoRA magnitude (out,), W' − W, which needs base_weight (out×in)."""

    A: Tensor
    B: Tensor
    scale: float
    magnitude: Tensor | None = None
    base_weight: Tensor | None = None


@dataclass
class ComposedModule(LowRankFactors):
    """ΔW = scale·B·A. error: relative Frobenius error of the method's
    approximation step (see each method), None where there is none."""

    B: Tensor
    A: Tensor
    scale: float = 1.0
    error: float | None = None


# ----------------------------------------------------------------------
# Pieces shared by the methods


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def effective_delta(update: ModuleUpdate, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense update this module applies: scale·B·A, or W' − W for DoRA."""
    delta = (update.B.to(dtype) @ update.A.to(dtype)) * update.scale
    if update.magnitude is None:
        return delta
    if update.base_weight is None:
        raise ValueError(
            "a DoRA module's update W' − W = m ⊙ (W + sBA)/‖W + sBA‖ − W depends on the base weight W; "
            "pass base_weight (compose_adapters: base_weights=) to compose DoRA adapters"
        )
    weight = update.base_weight.to(dtype)
    if tuple(weight.shape) != tuple(delta.shape):
        raise ValueError(f"base weight has shape {list(weight.shape)}, the DoRA update needs {list(delta.shape)}")
    merged = weight + delta
    factor = update.magnitude.to(dtype).reshape(-1) / torch.linalg.norm(merged, dim=1)
    return factor.view(-1, 1) * merged - weight


def _weighted_factors(update: ModuleUpdate, weight: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(B', A') with B'·A' = weight·ΔW; weight and scale go on A, as in PEFT's cat."""
    if update.magnitude is None:
        return update.B.to(dtype), update.A.to(dtype) * weight * update.scale
    B, A = full_rank_factors(effective_delta(update, dtype))
    return B, A * weight


def stacked_factors(updates: list[ModuleUpdate | None], weights: list[float], dtype: torch.dtype | None = None
                    ) -> tuple[Tensor, Tensor]:
    """B = [B₁ … Bₙ], A = [w₁s₁A₁; …; wₙsₙAₙ] with B·A = Σ wᵢ·ΔWᵢ exactly
    (missing modules skipped; a DoRA update enters as its full-rank factors)."""
    present = [(u, w) for u, w in zip(updates, weights) if u is not None]
    dtype = dtype or _compute_dtype(*(t for u, _ in present for t in (u.A, u.B)))
    pairs = [_weighted_factors(u, float(w), dtype) for u, w in present]
    return torch.cat([b for b, _ in pairs], dim=1), torch.cat([a for _, a in pairs], dim=0)


def full_rank_factors(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Exact B·A = matrix at rank min(out, in), in SVD form, components by
    descending σ: for out ≥ in, A = Vᵀ (orthonormal rows) and B = matrix·V =
    U·diag(σ); for out < in the same on the transpose (B = U orthonormal,
    A = diag(σ)·Vᵀ). V and σ² come from the eigendecomposition of the smaller
    Gram matrix (2–4× faster than torch.linalg.svd on CPU); the product
    reproduces the matrix to rounding whatever its conditioning, because the
    eigenvector matrix is orthogonal."""
    transposed = matrix.shape[0] < matrix.shape[1]
    tall = matrix.T if transposed else matrix
    _, V = torch.linalg.eigh(tall.T @ tall)
    V = V.flip(1)
    B, A = tall @ V, V.T.contiguous()
    return (A.T.contiguous(), B.T.contiguous()) if transposed else (B, A)


def product_svd(B: Tensor, A: Tensor, keep: int | Callable[[Tensor], int]) -> tuple[Tensor, Tensor, Tensor]:
    """Leading singular triplets of B·A (B: out×R, A: R×in) without forming out×in:
    U_k (out×k), all R singular values S, Vh_k (k×in), k = keep (or keep(S)).

    The same factorisation as kernels.lowrank.lowrank_svd (Householder QR of B
    and of Aᵀ, SVD of the R×R core R_b·R_aᵀ), but the orthogonal factors are
    never formed: LAPACK's ormqr applies them to the k kept singular vectors
    only, about 1.7× faster for R = 64 at Llama-7B shapes. O((out+in)·R²)."""
    rows, R = B.shape
    cols = A.shape[1]
    if R > min(rows, cols):  # more stacked components than the matrix has room for: the plain route
        U, S, Vh = lowrank_svd([B], [A])
        k = keep(S) if callable(keep) else min(int(keep), int(S.shape[0]))
        return U[:, :k], S, Vh[:k]
    packed_b, tau_b = torch.geqrf(B)
    packed_a, tau_a = torch.geqrf(A.T)
    u_core, S, vh_core = torch.linalg.svd(torch.triu(packed_b[:R]) @ torch.triu(packed_a[:R]).T)
    k = keep(S) if callable(keep) else min(int(keep), R)
    lift_u = B.new_zeros(rows, k)
    lift_u[:R] = u_core[:, :k]
    lift_v = A.new_zeros(cols, k)
    lift_v[:R] = vh_core[:k].T
    return torch.ormqr(packed_b, tau_b, lift_u), S, torch.ormqr(packed_a, tau_a, lift_v).T


def randomized_svd(matrix: Tensor, rank: int, generator: torch.Generator, *, oversample: int = 16,
                   power_iters: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-`rank` U, S, Vh of a dense matrix (Halko, Martinsson & Tropp 2011, alg. 4.4):
    Y = M·Ω with a seeded Gaussian Ω (in × (rank+oversample)), power iterations
    Q ← qr(M·qr(Mᵀ·Q)), then the SVD of the small QᵀM. Exact dense SVD when
    rank + oversample ≥ min(out, in), where sampling saves nothing."""
    rows, cols = matrix.shape
    width = rank + oversample
    if width >= min(rows, cols):
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    omega = torch.randn(cols, width, generator=generator, dtype=matrix.dtype, device=generator.device)
    Q = torch.linalg.qr(matrix @ omega.to(matrix.device)).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ Q).Q).Q
    U_small, S, Vh = torch.linalg.svd(Q.T @ matrix, full_matrices=False)
    return (Q @ U_small)[:, :rank], S[:rank], Vh[:rank]


# ----------------------------------------------------------------------
# PEFT's merge rules (peft.utils.merge_utils) on dense task tensors


def magnitude_prune_tensor(tensor: Tensor, density: float) -> Tensor:
    """Keep the int(density·numel) entries of largest |x| (PEFT's magnitude_based_pruning).

    PEFT takes torch.topk; the k-th largest |x| from torch.kthvalue selects the
    same entries about 4× faster on CPU (entries equal to the threshold are
    taken in index order; topk leaves that order unspecified)."""
    if density >= 1:
        return tensor
    flat = tensor.abs().reshape(-1)
    n, k = flat.numel(), int(density * flat.numel())
    if k == 0:
        return torch.zeros_like(tensor)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        mask[torch.nonzero(flat == threshold).squeeze(1)[:missing]] = True
    return tensor * mask.reshape(tensor.shape)


def random_prune_tensor(tensor: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: keep each entry with probability density, rescale the kept by 1/density."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """Per entry, which task tensors (stacked on dim 0) carry the elected sign."""
    sign = stacked.sign()
    if method == "total":
        sign_magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        sign_magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f'majority_sign must be "total" or "frequency", not {method!r}')
    return sign == torch.where(sign_magnitude >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_merge(weighted: Tensor, mask: Tensor) -> Tensor:
    """Mean of the agreeing weighted entries (count clamped to ≥ 1)."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def dense_rule(rule: str, deltas: list[Tensor], weights: list[float], *, density: float, majority_sign: str = "total",
               generator: torch.Generator | None = None) -> Tensor:
    """PEFT's ties / dare_linear / dare_ties / magnitude_prune on the dense ΔWᵢ
    of one module. A negative weight negates its task tensor before pruning and
    sign election (task tensor sign(w)·ΔW, weight |w|)."""
    tasks = [d if w >= 0 else -d for d, w in zip(deltas, weights)]
    magnitudes = torch.tensor([abs(float(w)) for w in weights], dtype=deltas[0].dtype, device=deltas[0].device)
    if rule in ("ties", "magnitude_prune"):
        tasks = [magnitude_prune_tensor(t, density) for t in tasks]
    elif rule in ("dare_linear", "dare_ties"):
        tasks = [random_prune_tensor(t, density, generator) for t in tasks]
    else:
        raise ValueError(f"unknown dense rule {rule!r}")
    stacked = torch.stack(tasks, dim=0)
    weighted = stacked * magnitudes.view(-1, *([1] * (stacked.dim() - 1)))
    if rule in ("ties", "dare_ties"):
        return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign))
    return weighted.sum(dim=0)


# ----------------------------------------------------------------------
# One module


def _check(updates: list[ModuleUpdate | None], weights: list[float]) -> list[tuple[ModuleUpdate, float]]:
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    present = [(u, float(w)) for u, w in zip(updates, weights) if u is not None]
    if not present:
        raise ValueError("no adapter has this module")
    for w in weights:
        if not math.isfinite(float(w)):
            raise ValueError(f"weights must be finite, got {w!r}")
    shapes = {u.shape for u, _ in present}
    if len(shapes) > 1:
        raise ValueError(f"updates have different (out, in) shapes: {sorted(shapes)}")
    for u, _ in present:
        if u.A.dim() != 2 or u.B.dim() != 2 or u.B.shape[1] != u.A.shape[0]:
            raise ValueError(f"factors must be B out×r and A r×in, got B {list(u.B.shape)} and A {list(u.A.shape)}")
    return present


def _peft_linear(present: list[tuple[ModuleUpdate, float]]) -> ComposedModule:
    ranks = sorted({u.rank for u, _ in present})
    if len(ranks) > 1:
        raise ValueError(f"peft_linear mixes factors and needs equal ranks, got ranks {ranks}; use linear or svd")
    if any(u.magnitude is not None for u, _ in present):
        raise ValueError("peft_linear mixes B and A factors, which has no meaning for a DoRA update; "
                         "use linear, svd or a dense method")
    weights_a, weights_b = [], []
    for update, weight in present:  # PEFT's _generalized_task_arithmetic_weighted_adapter, operation for operation
        weight_with_scaling = weight * update.scale
        sign = 1 if weight_with_scaling >= 0 else -1
        weights_a.append(math.sqrt(abs(weight_with_scaling)) * sign)
        weights_b.append(math.sqrt(abs(weight_with_scaling)))
    dtype = present[0][0].A.dtype
    mixed = []
    for tensors, weights in (([u.A for u, _ in present], weights_a), ([u.B for u, _ in present], weights_b)):
        stacked = torch.stack(tensors, dim=0)
        weights = torch.tensor(weights).to(stacked.device)
        mixed.append((stacked * weights.view(weights.shape + (1, 1))).sum(dim=0).to(dtype))
    A, B = mixed
    # Error against the exact sum Σ = B_s·A_s (stacked factors), from r×r Gram products in float64:
    # ‖B·A − Σ‖² = ‖B·A‖² − 2⟨B·A, Σ⟩ + ‖Σ‖².
    exact_b, exact_a = (t.double() for t in stacked_factors([u for u, _ in present], [w for _, w in present]))
    ours_b, ours_a = B.double(), A.double()
    target = frobenius_inner(exact_b, exact_a, exact_b, exact_a)
    squared = frobenius_inner(ours_b, ours_a, ours_b, ours_a) - 2 * frobenius_inner(ours_b, ours_a, exact_b, exact_a)
    error = math.sqrt(max(squared + target, 0.0) / target) if target > 0 else 0.0
    return ComposedModule(B=B, A=A, scale=1.0, error=error)


def frobenius_inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> float:
    """⟨B1·A1, B2·A2⟩_F = Σ (B1ᵀB2) ⊙ (A1·A2ᵀ), in O((out+in)·r1·r2) without forming out×in."""
    return float(((B1.T @ B2) * (A1 @ A2.T)).sum())


def _iso_c(B: Tensor, A: Tensor, rank: int | None, iso_scale: float) -> ComposedModule:
    # Numerical rank: σ above the rounding noise of the factorisation, which is of order
    # eps·‖B‖_F·‖A‖_F (directions that cancel exactly come out ≈ 0.2·eps·‖B‖‖A‖);
    # flattening would otherwise raise that noise to the mean singular value.
    floor = 4 * torch.finfo(B.dtype).eps * float(torch.linalg.norm(B)) * float(torch.linalg.norm(A))
    numerical_rank = {}

    def keep(S: Tensor) -> int:
        numerical_rank["k"] = k = int((S > floor).sum())
        return max(1, k if rank is None else min(int(rank), k))

    U, S, Vh = product_svd(B, A, keep)
    k = numerical_rank["k"]
    if k == 0:
        return ComposedModule(B=torch.zeros_like(B[:, :1]), A=torch.zeros_like(A[:1]), error=0.0)
    kept = U.shape[1]
    return ComposedModule(B=(U * (iso_scale * S[:k].mean())).contiguous(), A=Vh.contiguous(),
                          error=math.sqrt((k - kept) / k))


def compose_module(
    updates: list[ModuleUpdate | None],
    weights: list[float],
    method: str,
    *,
    rank: int | None = None,
    density: float = 0.5,
    majority_sign: str = "total",
    seed: int | None = None,
    power_iters: int = 8,
    oversample: int = 16,
    iso_scale: float = 1.0,
) -> ComposedModule:
    """Compose one module's updates (None: the adapter lacks the module) with weights.

    rank: output rank for svd / iso_c / *_svd (svd and *_svd default to the
        largest input rank, PEFT's default; iso_c to the full numerical rank);
        must be None for the other methods, whose rank is fixed by the method.
    density, majority_sign: the pruning and sign-election parameters (PEFT's).
    seed: seeds one torch.Generator that draws the DARE masks, then the
        randomized SVD's test matrix. None: a fresh random seed for DARE
        methods (not repeatable; compose_adapters draws and reports one), 0
        otherwise.
    power_iters, oversample: the randomized SVD of the *_svd methods.
    iso_scale: α of iso_c (ΔW = α·σ̄·U·Vᵀ).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    present = _check(updates, weights)
    if rank is not None and method not in _TAKES_RANK:
        raise ValueError(f"{method} does not take a rank (its rank is fixed by the method); "
                         "use svd or a *_svd method for a rank budget")
    if rank is not None and int(rank) < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")

    if method == "peft_linear":
        return _peft_linear(present)
    if method in _STACKED:
        B, A = stacked_factors([u for u, _ in present], [w for _, w in present])
        return ComposedModule(B=B, A=A, scale=1.0, error=0.0)
    if method == "svd":
        B, A = stacked_factors([u for u, _ in present], [w for _, w in present])
        target_rank = rank if rank is not None else max(u.rank for u, _ in present)
        U, S, Vh = product_svd(B, A, target_rank)
        k = U.shape[1]
        total = float(torch.sum(S.double() ** 2))
        error = math.sqrt(float(torch.sum(S[k:].double() ** 2)) / total) if total > 0 else 0.0
        return ComposedModule(B=(U * S[:k]).contiguous(), A=Vh.contiguous(), scale=1.0, error=error)
    if method == "iso_c":
        B, A = stacked_factors([u for u, _ in present], [w for _, w in present])
        return _iso_c(B, A, rank, float(iso_scale))

    # Dense rules: ΔWᵢ of this one module only.
    dtype = _compute_dtype(*(t for u, _ in present for t in (u.A, u.B)))
    deltas = [effective_delta(u, dtype) for u, _ in present]
    if seed is None:
        seed = secrets.randbits(48) if method in _RANDOM else 0
    generator = torch.Generator(device=deltas[0].device).manual_seed(int(seed))
    rule = method.removesuffix("_svd")
    merged = dense_rule(rule, deltas, [w for _, w in present], density=density, majority_sign=majority_sign,
                        generator=generator)
    del deltas
    if not method.endswith("_svd"):
        B_out, A_out = full_rank_factors(merged)
        return ComposedModule(B=B_out, A=A_out, scale=1.0, error=0.0)
    target_rank = min(rank if rank is not None else max(u.rank for u, _ in present), min(merged.shape))
    U, S, Vh = randomized_svd(merged, target_rank, generator, oversample=oversample, power_iters=power_iters)
    B_out, A_out = U * S, Vh
    norm = float(torch.linalg.norm(merged))
    error = float(torch.linalg.norm(merged - B_out @ A_out)) / norm if norm > 0 else 0.0
    return ComposedModule(B=B_out, A=A_out, scale=1.0, error=error)


# ----------------------------------------------------------------------
# Whole adapters


def module_seed(seed: int, path: str) -> int:
    """A module's own seed: stable, independent of the other modules and their order."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{path}".encode()).digest()[:8], "big") & (2**63 - 1)


def compose_adapters(
    adapters: list,
    weights: list[float],
    method: str,
    *,
    rank: int | None = None,
    base_weights: Callable[[str], Tensor] | None = None,
    seed: int | None = None,
    progress: Callable[[float, str], None] | None = None,
    **params,
):
    """Compose CanonicalAdapters module by module over the union of their
    module paths → (CanonicalAdapter, report).

    base_weights: module path → base weight (out×in), read only for DoRA
        modules (required when any adapter is DoRA).
    seed: DARE masks and randomized SVDs; each module gets its own seed
        derived from (seed, path). For DARE methods a missing seed is drawn
        at random and reported, so every result can be repeated.
    progress: called as progress(fraction, message) after every module.
    params: density, majority_sign, power_iters, oversample, iso_scale.

    The result is a PEFT LoRA: every module at scale 1.0 (alpha = its rank),
    per-module ranks in rank_pattern / alpha_pattern, no DoRA. The report has
    per-module rank and error, the largest error, and `exact` (the composed
    ΔW equals Σ wᵢ·ΔWᵢ up to float rounding).
    """
    from hub.formats.canonical import CanonicalAdapter, LoraModule  # data classes only; no Django

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if not adapters:
        raise ValueError("give at least one adapter")
    if len(adapters) != len(weights):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    unknown = sorted(set(params) - {"density", "majority_sign", "power_iters", "oversample", "iso_scale"})
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}")
    for index, adapter in enumerate(adapters):
        if adapter.extra_tensors:
            raise ValueError(f"adapter {index} carries full tensors (modules_to_save: "
                             f"{sorted(adapter.extra_tensors)[0]!r}, …), which are replacements, not updates, "
                             "and cannot be composed")

    paths = sorted({path for adapter in adapters for path in adapter.modules})
    for path in paths:
        present = [(i, a.modules[path]) for i, a in enumerate(adapters) if path in a.modules]
        layouts = {(m.shape, m.kind, tuple(m.conv_shape[1:]) if m.conv_shape else None) for _, m in present}
        if len(layouts) > 1:
            detail = ", ".join(f"adapter {i}: {m.kind} {list(m.shape)}" for i, m in present)
            raise ValueError(f"module '{path}' has different shapes across adapters ({detail})")
        if any(m.magnitude is not None and m.kind != "linear" for _, m in present):
            raise ValueError(f"module '{path}' is a DoRA {present[0][1].kind} module; only linear DoRA is supported")

    if rank is None and method in _TAKES_RANK and method != "iso_c":
        rank = max(m.rank for adapter in adapters for m in adapter.modules.values())  # PEFT's svd_rank default
    if seed is None and method in _RANDOM:
        seed = secrets.randbits(48)
    base_seed = 0 if seed is None else int(seed)

    modules: dict[str, LoraModule] = {}
    module_reports: dict[str, dict] = {}
    for done, path in enumerate(paths, start=1):
        sources = [adapter.modules.get(path) for adapter in adapters]
        base = None
        if any(m is not None and m.magnitude is not None for m in sources):
            if base_weights is None:
                raise ValueError(f"module '{path}' is DoRA: its update W' − W depends on the base weight; "
                                 "pass base_weights (module path → weight) to compose DoRA adapters")
            base = base_weights(path)
        updates = [None if m is None else ModuleUpdate(m.A, m.B, m.scale, m.magnitude,
                                                       base if m.magnitude is not None else None)
                   for m in sources]
        try:
            result = compose_module(updates, list(weights), method, rank=rank, seed=module_seed(base_seed, path),
                                    **params)
        except ValueError as error:
            raise ValueError(f"module '{path}': {error}") from error
        template = next(m for m in sources if m is not None)
        conv_shape = (result.rank, *template.conv_shape[1:]) if template.conv_shape else None
        modules[path] = LoraModule(A=result.A.contiguous(), B=result.B.contiguous(), scale=1.0,
                                   kind=template.kind, conv_shape=conv_shape)
        module_reports[path] = {"rank": result.rank, "error": result.error}
        if progress is not None:
            progress(done / len(paths), f"composed {done}/{len(paths)} modules")

    ranks = Counter(m.rank for m in modules.values())
    global_rank = max(ranks, key=lambda r: (ranks[r], r))
    others = {re.escape(path): m.rank for path, m in modules.items() if m.rank != global_rank}
    errors = [r["error"] for r in module_reports.values() if r["error"] is not None]
    if METHODS[method].exact:
        exact = True
    elif method == "svd":
        exact = all(r["error"] == 0.0 for r in module_reports.values())
    else:
        exact = False
    report = {
        "method": method,
        "weights": [float(w) for w in weights],
        "rank": rank,
        "seed": seed,
        "params": {k: v for k, v in params.items()},
        "exact": exact,
        "max_error": max(errors) if errors else None,
        "modules": module_reports,
    }
    composed = CanonicalAdapter(
        format="peft",
        peft_type="LORA",
        modules=modules,
        rank=global_rank,
        alpha=float(global_rank),
        use_rslora=False,
        use_dora=False,
        target_modules=sorted({path.rsplit(".", 1)[-1] for path in modules}),
        rank_pattern=dict(others),
        alpha_pattern={k: float(v) for k, v in others.items()},
        dtype=str(next(iter(modules.values())).A.dtype).removeprefix("torch."),
        config={"composed": {"method": method, "weights": [float(w) for w in weights], "rank": rank, "seed": seed,
                             "params": dict(params)}},
    )
    return composed, report
