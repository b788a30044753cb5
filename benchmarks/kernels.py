"""Merge kernel throughput: W + Σ sᵢ·Bᵢ·Aᵢ for Llama-sized bf16 weights.

Achieved bandwidth counts the bytes of W read once and written once (2·out·in·2 for
bf16; the factors are R·(out+in) floats, under 1 % at R = 16) over the time of one
merge. Peers in the same run:

* with CUDA: the fused Triton kernel (kernels.merge_triton) in every configuration of
  GPU_CONFIGS and input precision of PRECISIONS, the torch path on the same GPU
  (kernels.merge_reference: matmul + elementwise passes over float32), and the
  device's bandwidth as a 4 GiB device-to-device copy achieves it (`fraction_of_copy`
  = kernel GB/s ÷ copy GB/s). Kernel times are medians of CUDA-graph replays
  (triton.testing.do_bench_cudagraph: the host's Python and launch gaps left out),
  over input sets rotated so that W and out total ≥ 8× the L2 between reuses; the
  default configuration's eager per-call time (host work included) is printed beside.
  The fastest configuration per precision is checked on fresh inputs with a
  NaN-poisoned output: elements left unwritten, and the fraction of elements off the
  correctly rounded (float64) result, beside the same fraction for the torch path.
  One line per shape and adapter count, then a short summary per line;
* without CUDA: one line saying there is no GPU, then the torch path on the CPU
  (single-threaded and with the row blocks shared out to worker threads, as
  kernels.streaming_merge runs it) next to a CPU memory copy of the same bytes.

    python benchmarks/kernels.py [--rank 16] [--adapters 1,4] [--out FILE]
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

DEVICE = "cuda"  # the GPU path's device (a CPU smoke run of the GPU path under TRITON_INTERPRET=1 sets "cpu")
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (5632, 2048)]  # attention, MLP up/down (Llama-3-8B), TinyLlama MLP
GPU_SHAPES = [(4096, 4096), (14336, 4096), (5632, 2048)]  # MLP down behaves as MLP up (measured): left out of the sweep


def cpu_time(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# The sweep: merge_lora_triton keyword sets (the schedule, blocks, warps, pipeline depth), each
# timed at every input precision below. The first is merge_lora_triton's default.
GPU_CONFIGS = {
    "tile:32x128w4": dict(schedule="tile", block_m=32, block_n=128, num_warps=4),
    "tile:64x128w4": dict(schedule="tile", block_m=64, block_n=128, num_warps=4),
    "outer:32x128w4": dict(schedule="outer", block_m=32, block_n=128, num_warps=4),
    "outer:16x256w4": dict(schedule="outer", block_m=16, block_n=256, num_warps=4),
    "outer:64x128w4": dict(schedule="outer", block_m=64, block_n=128, num_warps=4),
    "outer:16x512w4": dict(schedule="outer", block_m=16, block_n=512, num_warps=4),
    "outer:32x256w8": dict(schedule="outer", block_m=32, block_n=256, num_warps=8),
    "outer:64x256w8": dict(schedule="outer", block_m=64, block_n=256, num_warps=8),
}
PRECISIONS = ("ieee", "tf32x3")  # tf32 alone was measured off the correctly rounded bf16 in 8 % of elements


def rounded_reference(W, Bs, As, scales):
    """W + Σ sᵢ·Bᵢ·Aᵢ in float64, rounded once to W's dtype: the correctly rounded merge."""
    acc = W.double()
    for B, A, s in zip(Bs, As, scales):
        acc += s * (B.double() @ A.double())
    return acc.to(W.dtype)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in bf16 units in the last place: bf16 bit patterns are sign-magnitude, so map
    them to integers that count up through zero (−0 and +0 both → 0) and subtract."""
    def ordered(x):
        bits = x.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


def check_config(config, precision, out_features, in_features, adapters, rank):
    """Fresh random inputs, NaN-poisoned output: every element written, distance from the correctly
    rounded result and from the torch path."""
    from kernels.merge_reference import merge_lora_reference
    from kernels.merge_triton import merge_lora_triton

    W, Bs, As, scales = merge_inputs(out_features, in_features, adapters, rank, DEVICE, seed=1234)
    out = torch.full_like(W, float("nan"))
    merge_lora_triton(W, Bs, As, scales, out=out, input_precision=precision, **GPU_CONFIGS[config])
    torch.cuda.synchronize()
    exact = rounded_reference(W, Bs, As, scales)
    torch_path = merge_lora_reference(W, Bs, As, scales)
    ulps = ulp_distance(out, exact)
    return {
        "unwritten": int(torch.isnan(out).sum()),
        "max_ulp_vs_exact": int(ulps.max()),  # large only near 0, where an ulp is tiny
        "fraction_off_exact": round(float((ulps > 0).float().mean()), 6),
        "fraction_off_exact_torch": round(float((ulp_distance(torch_path, exact) > 0).float().mean()), 6),
        "max_abs_diff_vs_torch": float((out.float() - torch_path.float()).abs().max()),
    }


def merge_inputs(out_features, in_features, adapters, rank, device, seed=0):
    """A bf16 weight and `adapters` float32 rank-`rank` factor pairs, drawn on `device`."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape, std):
        return torch.randn(*shape, generator=generator, device=device) * std
    W = draw(out_features, in_features, std=0.02).to(torch.bfloat16)
    Bs = [draw(out_features, rank, std=0.01) for _ in range(adapters)]
    As = [draw(rank, in_features, std=0.05) for _ in range(adapters)]
    return W, Bs, As, [2.0 / (i + 1) for i in range(adapters)]


def rotating(fn_of_set, sets):
    """A callable that runs fn on the next input set each call, so that repeated timing reads
    memory, not the 60 MB L2 left warm by the previous call."""
    state = {"i": 0}

    def call():
        fn_of_set(sets[state["i"] % len(sets)])
        state["i"] += 1
    return call


def gpu(rank: int, adapter_counts: list[int], out_path: Path | None) -> None:
    import triton
    import triton.testing

    from kernels.merge_reference import merge_lora_reference
    from kernels.merge_triton import merge_lora_triton

    lines = []

    def emit(line):
        lines.append(line)
        print(json.dumps(line), flush=True)

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 60 * 2**20)
    name = torch.cuda.get_device_name()
    # The ceiling: a device-to-device copy of 4 GiB (bytes read + bytes written over the time).
    source = torch.randint(0, 255, (4 * 2**30,), dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    copy_ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=50, rep=300, return_mode="median")
    copy_gbs = 2 * source.numel() / copy_ms / 1e6
    del source, target
    emit({"bench": "merge_kernel.ceiling", "device": name, "torch": torch.__version__, "triton": triton.__version__,
          "sms": props.multi_processor_count, "l2_bytes": l2, "copy_gb_per_s": round(copy_gbs, 1)})

    headline = []
    for adapters in adapter_counts:
        for out_features, in_features in GPU_SHAPES:
            one = out_features * in_features * 2
            sets = [merge_inputs(out_features, in_features, adapters, rank, DEVICE, seed=s)
                    for s in range(max(2, -(-8 * l2 // (2 * one))))]  # ≥ 8× L2 of W + out between reuses
            outs = [torch.empty_like(W) for W, *_ in sets]
            for i in range(len(sets)):
                sets[i] = (*sets[i], outs[i])
            moved = 2 * one
            # Kernel time: replays of a captured CUDA graph (launch gaps and the host's Python
            # out of the number); per-call time beside it, eagerly, for the default only.
            sweep = {}
            for precision in PRECISIONS:
                for config, keywords in GPU_CONFIGS.items():
                    if keywords["schedule"] == "outer" and precision != "ieee":
                        continue  # no tl.dot: float32 FMAs whatever the precision

                    def run(inputs, keywords=keywords, precision=precision):
                        W, Bs, As, scales, out = inputs
                        merge_lora_triton(W, Bs, As, scales, out=out, input_precision=precision, **keywords)
                    try:
                        ms = triton.testing.do_bench_cudagraph(rotating(run, sets), rep=40, return_mode="median")
                    except Exception as error:  # a precision or shape this GPU / Triton does not offer
                        sweep[(precision, config)] = {"error": str(error).splitlines()[0][:160]}
                        continue
                    sweep[(precision, config)] = {"ms": ms, "gb_per_s": moved / ms / 1e6}

            def default_run(inputs):
                W, Bs, As, scales, out = inputs
                merge_lora_triton(W, Bs, As, scales, out=out)

            def torch_run(inputs):
                W, Bs, As, scales, out = inputs
                merge_lora_reference(W, Bs, As, scales, out=out)
            eager_ms = triton.testing.do_bench(rotating(default_run, sets), warmup=25, rep=100, return_mode="median")
            default_ms = triton.testing.do_bench_cudagraph(rotating(default_run, sets), rep=40, return_mode="median")
            torch_ms = triton.testing.do_bench_cudagraph(rotating(torch_run, sets), rep=40, return_mode="median")
            table = {f"{p}:{c}": (round(r["gb_per_s"], 1) if "gb_per_s" in r else r["error"])
                     for (p, c), r in sweep.items()}
            best = {}
            for precision in PRECISIONS:
                timed = [(r["ms"], c) for (p, c), r in sweep.items() if p == precision and "ms" in r]
                if timed:
                    ms, config = min(timed)
                    best[precision] = {"config": config, "ms": round(ms, 4), "gb_per_s": round(moved / ms / 1e6, 1),
                                       "fraction_of_copy": round(moved / ms / 1e6 / copy_gbs, 3),
                                       **check_config(config, precision, out_features, in_features, adapters, rank)}
            line = {"bench": "merge_kernel", "device": name, "shape": [out_features, in_features], "rank": rank,
                    "adapters": adapters, "dtype": "bfloat16", "bytes_moved": moved, "input_sets": len(sets),
                    "default_ms": round(default_ms, 4), "default_gb_per_s": round(moved / default_ms / 1e6, 1),
                    "default_fraction_of_copy": round(moved / default_ms / 1e6 / copy_gbs, 3),
                    "default_eager_call_ms": round(eager_ms, 4),
                    "best": best, "torch_ms": round(torch_ms, 4), "torch_gb_per_s": round(moved / torch_ms / 1e6, 1),
                    "torch_fraction_of_copy": round(moved / torch_ms / 1e6 / copy_gbs, 3),
                    "copy_gb_per_s": round(copy_gbs, 1), "sweep_gb_per_s": table}
            emit(line)
            headline.append(line)
            del sets, outs
            torch.cuda.empty_cache()
    for line in headline:  # the short table last: the reply carries the end of the output
        best = line["best"]
        print(json.dumps({"bench": "merge_kernel.summary", "shape": line["shape"], "adapters": line["adapters"],
                          "default": line["default_fraction_of_copy"],
                          "eager_call_ms": line["default_eager_call_ms"],
                          **{p: [best[p]["fraction_of_copy"], best[p]["config"],
                                 best[p]["fraction_off_exact"], best[p]["unwritten"]] for p in best},
                          "torch": line["torch_fraction_of_copy"]}), flush=True)
    if out_path is not None:
        out_path.write_text("".join(json.dumps(line) + "\n" for line in lines))


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
        W, (B,), (A,), _ = merge_inputs(out_features, in_features, 1, rank, "cpu")
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
    parser.add_argument("--adapters", default="1,4", help="adapter counts to time on the GPU (comma-separated)")
    parser.add_argument("--out", type=Path, default=None, help="also write the GPU lines to this file")
    args = parser.parse_args()
    if torch.cuda.is_available():
        gpu(args.rank, [int(n) for n in args.adapters.split(",")], args.out)
    else:
        cpu(args.rank)


if __name__ == "__main__":
    main()
