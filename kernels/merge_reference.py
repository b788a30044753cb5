"""Merging LoRA updates into a base weight: the torch reference.

    merged = W + Σᵢ sᵢ · Bᵢ · Aᵢ        W: out×in, Bᵢ: out×rᵢ, Aᵢ: rᵢ×in

computed in float32 and rounded once to W's dtype. This is the definition the
Triton kernel (`kernels.merge_triton`) is tested against, and the CPU path of
`kernels.dispatch.merge_lora`.

Rounding, and what it matches in PEFT 0.21 (`merge_and_unload`, CPU):

* Each adapter's delta is computed the way PEFT's `Linear.get_delta_weight`
  does on CPU: `(B.float() @ A.float()) * s` (matmul rounded to float32 first,
  then the scale), and added to the float32 accumulator in adapter order:
  `((W + Δ₁) + Δ₂) + …`, then cast to W's dtype (round to nearest even).
* `delta_dtype=None` (default) matches `PeftModel.from_pretrained(base, …)`
  followed by `merge_and_unload()`: PEFT's default `autocast_adapter_dtype=True`
  keeps LoRA weights in float32 even on a bf16/fp16 base, so `W += Δ` computes
  `float(W) + Δ` and rounds once. For a single adapter the result is bit-exact
  with PEFT for fp32, bf16 and fp16 bases (asserted in tests/test_merge_kernels.py
  and tests/test_streaming_merge.py).
* `delta_dtype=torch.bfloat16` (or float16) matches PEFT when the LoRA weights
  themselves live in that dtype (`autocast_adapter_dtype=False`, or a model
  cast after loading): on CPU PEFT computes the delta in float32, rounds it to
  the adapter dtype, then adds, so the delta is rounded twice. Bit-exact for a
  single adapter; with several adapters PEFT also rounds W after each one,
  which this (single final rounding) does not reproduce.
* A power-of-two scale (alpha/r = 2, 1, ½ …, the common case) is folded into
  A before the matmul (`fold_scales`): multiplying by 2ᵏ is exact, so
  B @ (2ᵏ·A) is 2ᵏ·(B @ A) bit for bit, and a pass over the block is saved.
  (The one exception would be products in float32's subnormal range, below
  2⁻¹²⁶ ≈ 1e-38, far under any weight's rounding.)
* A term whose scale is 1 after folding may run as one `acc.addmm_(B, A)`
  (W's block in acc, then acc += B @ A inside the GEMM: a pass saved), but
  only where `fused_add_is_exact` found that it gives exactly `acc + (B @ A)`
  for that shape, dtype and device.
* Not matched: PEFT on CUDA with bf16/fp16 LoRA weights runs the matmul in
  that dtype (cuBLAS), which no CPU computation reproduces bit for bit.

`row_block` computes the same thing a block of rows at a time, so that the
float32 temporaries stay in cache and never cost 2× the weight in memory. The
element-wise steps are the same either way; the matmul is too as long as the
BLAS computes each element independently of how rows are tiled. MKL's sgemm
(torch's CPU BLAS) does for row blocks that are a multiple of its 8-row panel
and not for others (a block of 7 rows rounds differently in float32), so
`default_row_block` returns multiples of 64; tests assert blocked == whole bit
for bit, and the tiny-model tests compare with PEFT's whole-matrix merge.
"""
from __future__ import annotations

import math

import torch


def check_merge_inputs(
    weight: torch.Tensor, Bs: list[torch.Tensor], As: list[torch.Tensor], scales: list[float]
) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be a matrix (out×in), got shape {list(weight.shape)}")
    if not (len(Bs) == len(As) == len(scales)):
        raise ValueError(f"got {len(Bs)} B, {len(As)} A and {len(scales)} scales; they must pair up")
    out_features, in_features = weight.shape
    for index, (B, A) in enumerate(zip(Bs, As)):
        if B.ndim != 2 or A.ndim != 2 or B.shape[0] != out_features or A.shape[1] != in_features or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"adapter {index}: B {list(B.shape)} @ A {list(A.shape)} does not give the weight's shape "
                f"{list(weight.shape)} (B must be out×r and A r×in)"
            )


ROW_BLOCK_MULTIPLE = 64


def default_row_block(in_features: int, target_bytes: int = 1 << 20) -> int:
    """Rows per block so one float32 block is about `target_bytes` (cache-sized),
    a multiple of ROW_BLOCK_MULTIPLE rows (see the module docstring)."""
    rows = target_bytes // (4 * max(1, in_features))
    return max(ROW_BLOCK_MULTIPLE, rows // ROW_BLOCK_MULTIPLE * ROW_BLOCK_MULTIPLE)


def fold_scales(As: list[torch.Tensor], scales: list[float]) -> tuple[list[torch.Tensor], list[float]]:
    """Move power-of-two scales into A (A·2ᵏ is exact, and then so is every product and
    sum of B @ (2ᵏ·A) = 2ᵏ·(B @ A)), leaving 1.0: one pass over the block saved and the
    same bits. Other scales stay, to be applied after the matmul as PEFT does."""
    folded_As, folded_scales = [], []
    for A, scale in zip(As, scales):
        scale = float(scale)
        if scale != 1.0 and scale != 0.0 and math.isfinite(scale) and abs(math.frexp(scale)[0]) == 0.5:
            folded_As.append(A * scale)
            folded_scales.append(1.0)
        else:
            folded_As.append(A)
            folded_scales.append(scale)
    return folded_As, folded_scales


def merge_rows_into(
    acc: torch.Tensor,
    weight: torch.Tensor,
    Bs: list[torch.Tensor],
    As: list[torch.Tensor],
    scales: list[float],
    tmp: torch.Tensor,
    *,
    delta_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """acc = W + Σ sᵢ·Bᵢ·Aᵢ for one block of rows, in acc's dtype (the compute
    dtype: float32, float64 for float64 weights), with PEFT's rounding.

    weight: the block's rows (any float dtype; upcast exactly into acc);
    Bs: the block's rows of each B; As: in acc's dtype, scales already folded
    (`fold_scales`); tmp: a buffer like acc. Returns acc.

    A term with scale 1 (after folding) and no delta_dtype is one
    `acc.addmm_(B, A)` where that gives the same bits as `acc + (B @ A)`
    (`fused_add_is_exact`): a pass over the block saved, ~25% of the merge's
    compute."""
    acc.copy_(weight)
    for B, A, scale in zip(Bs, As, scales):
        B = B.to(acc.dtype)
        if scale == 1.0 and delta_dtype is None and fused_add_is_exact(acc, B, A):
            acc.addmm_(B, A)
            continue
        torch.mm(B, A, out=tmp)  # PEFT: B @ A in float32 …
        if scale != 1.0:
            tmp.mul_(float(scale))  # … then * scaling
        if delta_dtype is not None:
            tmp.copy_(tmp.to(delta_dtype))  # PEFT with LoRA weights in bf16/fp16
        acc.add_(tmp)  # W + Δ₁, then + Δ₂ … (float32)
    return acc


def fused_add_is_exact(C: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> bool:
    """Does C.addmm_(B, A) give exactly C + (B @ A) for these shapes, dtype, device and
    thread count? It does when the GEMM sums the rank-r products in registers and adds C
    once at the end (MKL's sgemm on AVX-512 up to r = 192), and not when it starts from
    C or splits K (MKL's dgemm; sgemm for larger r). BLAS promises neither, so each
    combination is tried once on random data of the same shapes (the block's own data
    could hide a difference: a zero B, as a fresh LoRA has, agrees either way) and the
    answer is kept in `_FUSED_ADD_EXACT`."""
    key = (C.device.type, C.dtype, tuple(C.shape), tuple(A.shape), torch.get_num_threads())
    exact = _FUSED_ADD_EXACT.get(key)
    if exact is None:
        generator = torch.Generator(device=C.device).manual_seed(0)

        def sample(shape):
            return torch.randn(shape, generator=generator, dtype=C.dtype, device=C.device)

        C0, B0, A0 = sample(C.shape), sample(B.shape), sample(A.shape)
        exact = _FUSED_ADD_EXACT[key] = torch.equal(C0.clone().addmm_(B0, A0), C0 + B0 @ A0)
    return exact


# (device, compute dtype, block shape, A shape, torch threads) → does acc.addmm_(B, A) give
# exactly acc + B @ A? Filled by fused_add_is_exact, once per key, from random data.
_FUSED_ADD_EXACT: dict[tuple, bool] = {}


def merge_lora_reference(
    weight: torch.Tensor,
    Bs: list[torch.Tensor],
    As: list[torch.Tensor],
    scales: list[float],
    *,
    delta_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    row_block: int | None = None,
) -> torch.Tensor:
    """W + Σ sᵢ·Bᵢ·Aᵢ in float32, returned in W's dtype (into `out` if given;
    `out` may be `weight` itself for an in-place merge). See the module
    docstring for the exact rounding and what it matches in PEFT."""
    check_merge_inputs(weight, Bs, As, scales)
    if out is None:
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    elif out.shape != weight.shape:
        raise ValueError(f"out has shape {list(out.shape)}, the weight {list(weight.shape)}")
    rows = int(weight.shape[0])
    if rows == 0 or weight.shape[1] == 0:
        return out
    if not Bs:
        if out.data_ptr() != weight.data_ptr():
            out.copy_(weight)
        return out
    compute = torch.promote_types(torch.float32, weight.dtype)  # float32, float64 for float64 weights
    As32, scales = fold_scales([A.to(compute) for A in As], scales)
    block = rows if row_block is None else max(1, min(int(row_block), rows))
    acc = torch.empty((block, weight.shape[1]), dtype=compute, device=weight.device)
    tmp = torch.empty_like(acc)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        acc_rows = merge_rows_into(
            acc[: stop - start], weight[start:stop], [B[start:stop] for B in Bs], As32, scales, tmp[: stop - start],
            delta_dtype=delta_dtype,
        )
        out[start:stop].copy_(acc_rows)  # one rounding to W's dtype (nearest even)
    return out
