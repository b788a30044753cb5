"""Pick the merge implementation for where the weight lives.

`merge_lora(weight, Bs, As, scales)` = W + Σ sᵢ·Bᵢ·Aᵢ in W's dtype:

* CUDA weight and Triton importable → the fused kernel (kernels.merge_triton);
* otherwise → the torch reference (kernels.merge_reference), a cache-sized
  block of rows at a time on CPU; with `workers` > 1 the row blocks are
  shared out to that many Python threads, each running single-threaded torch
  ops (rows are independent, so the result is bit-identical). Run that under
  `intra_op_threads(1)` (hub.formats.threads): OpenMP's lock-step parallel regions over cache-sized
  blocks are slow, and collapse on a machine whose cores are busy with other
  work, where independent blocks just load-balance.

`backend="torch"` / `"triton"` forces one (for benchmarks and tests).
kernels.merge_triton is imported only when a CUDA weight asks for it, so
CPU-only callers never import Triton.
"""
from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .merge_reference import check_merge_inputs, default_row_block, fold_scales, merge_lora_reference

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """A shared pool of `workers` threads whose torch ops run single-threaded."""
    with _pools_lock:
        if workers not in _pools:
            # Each pool thread runs its torch ops single-threaded (OpenMP's thread count is per thread).
            _pools[workers] = ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="quiver-merge", initializer=torch.set_num_threads, initargs=(1,)
            )
        return _pools[workers]


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from . import merge_triton  # noqa: F401
    except Exception:  # ImportError, or a Triton without a usable backend
        return False
    return True


def choose_backend(weight: torch.Tensor) -> str:
    return "triton" if weight.is_cuda and triton_available() else "torch"


def merge_lora(
    weight: torch.Tensor,
    Bs: list[torch.Tensor],
    As: list[torch.Tensor],
    scales: list[float],
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    workers: int = 1,
) -> torch.Tensor:
    """W + Σ sᵢ·Bᵢ·Aᵢ, float32 accumulation, result in W's dtype (or into `out`,
    which may be `weight` for an in-place merge). `workers`: threads sharing
    the row blocks on CPU (see the module docstring)."""
    if backend == "auto":
        backend = choose_backend(weight)
    Bs = [B.to(weight.device) for B in Bs]
    As = [A.to(weight.device) for A in As]
    if backend == "triton":
        from .merge_triton import merge_lora_triton

        return merge_lora_triton(weight, Bs, As, scales, out=out)
    if backend != "torch":
        raise ValueError(f"unknown merge backend {backend!r} (auto, torch, triton)")
    if weight.is_cuda:
        return merge_lora_reference(weight, Bs, As, scales, out=out)
    check_merge_inputs(weight, Bs, As, scales)
    rows, row_block = int(weight.shape[0]), default_row_block(int(weight.shape[1]))
    if workers <= 1 or rows <= row_block or not Bs:
        return merge_lora_reference(weight, Bs, As, scales, out=out, row_block=row_block)
    if out is None:
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    compute = torch.promote_types(torch.float32, weight.dtype)
    As, scales = fold_scales([A.to(compute) for A in As], scales)  # once, not per block (same values)

    def block(start: int) -> None:
        stop = min(start + row_block, rows)
        merge_lora_reference(weight[start:stop], [B[start:stop] for B in Bs], As, scales, out=out[start:stop])

    for _ in worker_pool(workers).map(block, range(0, rows, row_block)):
        pass
    return out
