"""Merging LoRA updates into a base weight: the fused Triton kernel.

One GEMM with a residual. The factors of every adapter are concatenated on
the host into

    B_cat = [s₁·B₁ | s₂·B₂ | …]   (out × R, float32, scales folded in)
    A_cat = [A₁; A₂; …]           (R × in, float32),   R = Σ rᵢ

and each program owns one BLOCK_M × BLOCK_N tile of W: it accumulates
tl.dot(B_cat tile, A_cat tile) over R in float32, loads the W tile, adds it
(float32) and stores the sum rounded to the output dtype (round to nearest
even; for bf16 done with integer ops, see the kernel). W is read once and
written once; the factors are tiny (R ≪ in), so the kernel should be bound by
the bandwidth of W's bytes (on an H200 it reaches half of a device copy's:
docs/gpu-merge-kernel.md has the measurements and what is left to try).
`out` may be `weight` (in-place): a tile is read before it is written and no
tile reads another's.

Numerics against kernels.merge_reference: the reference rounds B@A to
float32 and then multiplies by s, per adapter; here s is folded into B and
all adapters share one float32 accumulator, so the float32 sums can differ
in the last bits and, after rounding to bf16/fp16, an element can land one
ulp apart. `input_precision` is "ieee" by default (true float32 products,
also what the interpreter runs); on sm80+ "tf32x3" is close to float32 and
faster, "tf32" is faster still but only ~10 mantissa bits in the products.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter: set
TRITON_INTERPRET=1 before this module is imported (triton.jit decides
between compiling and interpreting when the decorator runs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .merge_reference import check_merge_inputs


@triton.jit
def _to_output(merged, out_ptr, OUT_BF16: tl.constexpr):
    """The float32 sum in the output's dtype, rounded to nearest even."""
    if OUT_BF16:
        # Round to nearest even by hand (the bit trick c10::BFloat16 uses): the compiled
        # cast does the same, but the interpreter's float32 → bfloat16 cast truncates.
        bits = merged.to(tl.uint32, bitcast=True)
        bits += ((bits >> 16) & 1) + 0x7FFF
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(merged != merged, merged.to(tl.bfloat16), rounded)  # NaN stays NaN
    return merged.to(out_ptr.dtype.element_ty)


@triton.jit
def _lora_merge_kernel(
    w_ptr, b_ptr, a_ptr, out_ptr,
    M, N, R,
    stride_wm, stride_wn,
    stride_bm, stride_br,
    stride_ar, stride_an,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    OUT_BF16: tl.constexpr,
    OUTER: tl.constexpr,
):
    # One program per tile on a 1-D grid, in row-major tile order (the tiles in flight
    # together cover contiguous memory); W's tile is loaded before the product so that
    # its latency overlaps the arithmetic.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    tile_mask = mask_m[:, None] & mask_n[None, :]
    w = tl.load(w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn, mask=tile_mask, other=0.0)

    if OUTER:
        # R outer products (float32 FMAs) accumulated straight onto W's tile, with B's and
        # A's entries loaded as broadcast 2-D tiles in W's own register layout: the compiled
        # kernel then has no layout conversion and no shared memory at all (compiled for
        # sm_90: a zeros accumulator or 1-D row loads each cost a trip through shared memory).
        acc = w.to(tl.float32)
        zero_m = offs_m[:, None] * 0
        zero_n = offs_n[None, :] * 0
        for r in range(0, R):
            b = tl.load(b_ptr + offs_m[:, None] * stride_bm + r * stride_br + zero_n, mask=tile_mask, other=0.0)
            a = tl.load(a_ptr + r * stride_ar + offs_n[None, :] * stride_an + zero_m, mask=tile_mask, other=0.0)
            acc += b * a
    else:
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):  # tl.dot, BLOCK_R of R at a time
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            b = tl.load(
                b_ptr + offs_m[:, None] * stride_bm + offs_r[None, :] * stride_br,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0,
            )
            a = tl.load(
                a_ptr + offs_r[:, None] * stride_ar + offs_n[None, :] * stride_an,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0,
            )
            delta += tl.dot(b, a, input_precision=INPUT_PRECISION)
        acc = delta + w.to(tl.float32)
    result = _to_output(acc, out_ptr, OUT_BF16)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, result, mask=tile_mask)


def is_interpreted() -> bool:
    """True when the kernel was built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_lora_merge_kernel, InterpretedFunction)


def concat_factors(
    Bs: list[torch.Tensor], As: list[torch.Tensor], scales: list[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """B_cat (out×R, sᵢ folded in) and A_cat (R×in), float32 and contiguous."""
    B_cat = torch.cat([B.to(device=device, dtype=torch.float32) * float(s) for B, s in zip(Bs, scales)], dim=1)
    A_cat = torch.cat([A.to(device=device, dtype=torch.float32) for A in As], dim=0)
    return B_cat.contiguous(), A_cat.contiguous()


def merge_lora_triton(
    weight: torch.Tensor,
    Bs: list[torch.Tensor],
    As: list[torch.Tensor],
    scales: list[float],
    *,
    out: torch.Tensor | None = None,
    schedule: str = "tile",
    block_m: int = 32,
    block_n: int = 128,
    block_r: int = 16,
    num_warps: int = 4,
    num_stages: int = 3,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """W + Σ sᵢ·Bᵢ·Aᵢ in one fused kernel launch, in W's dtype (or out's).

    schedule: "tile" (the product by tl.dot, BLOCK_R of R at a time) or "outer" (R
    outer products in float32 FMAs; input_precision does not apply; no shared memory and no
    layout conversion when compiled; not yet timed on a GPU, see docs/gpu-merge-kernel.md).
    Tile sizes: the fastest exact (ieee) setting measured on an H200 across Llama shapes
    (same page).
    Block sizes must be powers of two ≥ 16 (tl.dot's minimum)."""
    check_merge_inputs(weight, Bs, As, scales)
    if not weight.is_cuda and not is_interpreted():
        raise RuntimeError(
            "merge_lora_triton got CPU tensors but the kernel is compiled for the GPU: set TRITON_INTERPRET=1 "
            "before importing kernels.merge_triton to run it with the Triton interpreter"
        )
    for size in (block_m, block_n, block_r):
        if size < 16 or size & (size - 1):
            raise ValueError(f"block sizes must be powers of two ≥ 16, got {size}")
    if schedule not in ("tile", "outer"):
        raise ValueError(f"unknown schedule {schedule!r} (tile, outer)")
    if out is None:
        out = torch.empty_like(weight)
    elif out.shape != weight.shape or out.device != weight.device:
        raise ValueError("out must have the weight's shape and device")
    M, N = weight.shape
    if M == 0 or N == 0:
        return out
    if not Bs:
        if out.data_ptr() != weight.data_ptr():
            out.copy_(weight)
        return out
    B_cat, A_cat = concat_factors(Bs, As, scales, weight.device)
    R = int(A_cat.shape[0])
    _lora_merge_kernel[(triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)](
        weight, B_cat, A_cat, out,
        M, N, R,
        weight.stride(0), weight.stride(1),
        B_cat.stride(0), B_cat.stride(1),
        A_cat.stride(0), A_cat.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, INPUT_PRECISION=input_precision,
        OUT_BF16=out.dtype == torch.bfloat16, OUTER=schedule == "outer",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
