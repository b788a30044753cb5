"""Merge kernel throughput: W + Σ sᵢ·Bᵢ·Aᵢ for Llama-sized bf16 weights.

Achieved bandwidth counts the bytes of W read once and written once (2·out·in·2 for
bf16; the factors are R·(out+in) floats, under 1 % at R = 16) over the time of one
merge. Peers in the same run:

* with CUDA: the fused Triton kernel (kernels.merge_triton), the torch path on the
  same GPU (kernels.merge_reference: matmul + elementwise passes over float32), and
  the device's bandwidth as a plain device-to-device copy of the same bytes achieves
  it (`fraction_of_copy` = Triton GB/s ÷ copy GB/s);
* without CUDA: one line saying there is no GPU, then the torch path on the CPU
  (single-threaded and with the row blocks shared out to worker threads, as
  kernels.streaming_merge runs it) next to a CPU memory copy of the same bytes.

    python benchmarks/kernels.py [--rank 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (5632, 2048)]  # attention, MLP up/down (Llama-3-8B), TinyLlama MLP


def cpu_time(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def inputs(out_features, in_features, rank, device):
    generator = torch.Generator().manual_seed(0)
    W = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(torch.bfloat16).to(device)
    B = (torch.randn(out_features, rank, generator=generator) * 0.01).to(device)
    A = (torch.randn(rank, in_features, generator=generator) * 0.05).to(device)
    return W, B, A


def gpu(rank: int) -> None:
    import triton.testing

    from kernels.merge_reference import merge_lora_reference
    from kernels.merge_triton import merge_lora_triton

    name = torch.cuda.get_device_name()
    for out_features, in_features in SHAPES:
        W, B, A = inputs(out_features, in_features, rank, "cuda")
        out = torch.empty_like(W)
        moved = 2 * W.numel() * W.element_size()
        results = {}
        for precision in ("ieee", "tf32x3", "tf32"):
            try:
                ms = triton.testing.do_bench(
                    lambda: merge_lora_triton(W, [B], [A], [2.0], out=out, input_precision=precision))
            except Exception as error:  # an input precision this GPU / Triton does not offer
                results[precision] = {"error": str(error).splitlines()[0][:120]}
                continue
            results[precision] = {"ms": round(ms, 4), "gb_per_s": round(moved / ms / 1e6, 1)}
        torch_ms = triton.testing.do_bench(lambda: merge_lora_reference(W, [B], [A], [2.0], out=out))
        source = torch.empty(W.numel() * W.element_size(), dtype=torch.uint8, device="cuda")
        target = torch.empty_like(source)
        copy_ms = triton.testing.do_bench(lambda: target.copy_(source))
        reference = merge_lora_reference(W, [B], [A], [2.0])
        merged = merge_lora_triton(W, [B], [A], [2.0])
        ieee = results["ieee"].get("gb_per_s", 0.0)
        print(json.dumps({
            "bench": "merge_kernel", "device": name, "shape": [out_features, in_features], "rank": rank,
            "dtype": "bfloat16", "bytes_moved": moved, "triton": results,
            "torch_ms": round(torch_ms, 4), "torch_gb_per_s": round(moved / torch_ms / 1e6, 1),
            "copy_gb_per_s": round(2 * source.numel() / copy_ms / 1e6, 1),
            "fraction_of_copy": round(ieee / (2 * source.numel() / copy_ms / 1e6), 3),
            "max_abs_diff_vs_torch": float((merged.float() - reference.float()).abs().max()),
        }), flush=True)


def cpu(rank: int) -> None:
    from hub.formats.threads import intra_op_threads
    from kernels.dispatch import merge_lora
    from kernels.merge_reference import default_row_block, merge_lora_reference

    threads = torch.get_num_threads()
    print(json.dumps({"bench": "merge_kernel", "device": "cpu", "gpu": False,
                      "note": "no CUDA device: the Triton kernel is not timed (tests run it under TRITON_INTERPRET=1); "
                              "the torch path on the CPU follows", "cpu_count": os.cpu_count(), "torch_threads": threads,
                      "loadavg_1m": os.getloadavg()[0]}), flush=True)
    for out_features, in_features in SHAPES:
        W, B, A = inputs(out_features, in_features, rank, "cpu")
        out = torch.empty_like(W)
        moved = 2 * W.numel() * W.element_size()
        block = default_row_block(in_features)
        with intra_op_threads(1):
            single = cpu_time(lambda: merge_lora_reference(W, [B], [A], [2.0], out=out, row_block=block))
            pooled = cpu_time(lambda: merge_lora(W, [B], [A], [2.0], out=out, workers=threads))
        copy = cpu_time(lambda: out.copy_(W))
        print(json.dumps({
            "bench": "merge_kernel", "device": "cpu", "shape": [out_features, in_features], "rank": rank,
            "dtype": "bfloat16", "bytes_moved": moved,
            "torch_1_thread_gb_per_s": round(moved / single / 1e9, 3),
            f"torch_{threads}_workers_gb_per_s": round(moved / pooled / 1e9, 3),
            "memcpy_gb_per_s": round(moved / copy / 1e9, 3),
        }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    if torch.cuda.is_available():
        gpu(args.rank)
    else:
        cpu(args.rank)


if __name__ == "__main__":
    main()
