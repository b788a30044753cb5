"""Composing LoRA adapters: kernels.compose against PEFT's add_weighted_adapter, same run.

Four rank-16 LoRAs (random factors, fixed seed, alpha 32) on every linear layer
(q, k, v, o, gate, up, down) of a Llama-architecture model (hidden 1024,
intermediate 2816, 4 layers), held as PEFT LoRA state in one PeftModel for PEFT
and as CanonicalAdapters for Quiver (the same tensors). Neither side reads the
base weights (no DoRA), so the base is allocated uninitialised.

Prints JSON lines:
  headline  {"bench": "compose", "method": "svd", "peft_s", "quiver_s", "speedup", "rel_err"}
            (rank 16; rel_err = ‖ΔW_peft − ΔW_quiver‖_F / ‖ΔW_peft‖_F over all modules;
            goals: ≥ 100× faster, rel_err ≤ 1e-4)
  methods   one line per other method, with PEFT's time for the peer that computes
            the same ΔW ("peft_method", "peft_svd_rank"; measured on a one-layer
            model of the same shape × 4, since PEFT's work is per module) and
            rel_err on layer 0 where both sides are deterministic. PEFT's plain
            ties / dare_* / magnitude_prune prune A and B separately (another ΔW),
            so their peer is PEFT's *_svd at full rank; the same-name PEFT time is
            given beside it;
  7B        svd at Llama-7B shape (hidden 4096, intermediate 11008, 32 layers, four
            rank-16 adapters, factors only): Quiver's total time (goal ≤ 5 s), and
            PEFT's time on one layer (a one-layer model of that shape) × 32, with
            rel_err on that layer.
Quiver's times are the median of 3 runs (1 when a run takes over 5 s); PEFT runs
once. Both sides use the same torch thread count (--threads, default 1).
Run: .venv/bin/python benchmarks/compose.py [--skip-peft-7b] [--skip-methods] [--threads N]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from hub.formats.canonical import CanonicalAdapter, LoraModule  # noqa: E402
from kernels.compose import METHODS, compose_adapters  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, N_ADAPTERS = 16, 32, 4
# Positive weights: with a negative weight Quiver's TIES elects signs on −ΔW (the task vector it adds),
# PEFT's on +ΔW, by design (see kernels/compose.py); tests cover negative weights.
WEIGHTS = [0.4, 0.3, 0.2, 0.5]
DENSITY = 0.5
FULL = "full"  # svd_rank = min(out, in): PEFT's *_svd then keeps the whole dense result
# Our method → (PEFT combination_type computing the same ΔW, its svd_rank), None: PEFT has no such method.
# PEFT's own "ties" / "dare_*" / "magnitude_prune" prune the A and B factors separately (a different
# ΔW); the peer with our semantics is its *_svd variant at full rank, which applies the rule to ΔW.
PEER = {
    "linear": ("cat", None), "cat": ("cat", None), "task_arithmetic": ("cat", None), "peft_linear": ("linear", None),
    "ties_svd": ("ties_svd", RANK), "magnitude_prune_svd": ("magnitude_prune_svd", RANK),
    "dare_linear_svd": ("dare_linear_svd", RANK), "dare_ties_svd": ("dare_ties_svd", RANK),
    "ties": ("ties_svd", FULL), "magnitude_prune": ("magnitude_prune_svd", FULL),
    "dare_linear": ("dare_linear_svd", FULL), "dare_ties": ("dare_ties_svd", FULL),
    "iso_c": None,
}
DETERMINISTIC_PEER = {"linear", "cat", "task_arithmetic", "peft_linear", "ties_svd", "magnitude_prune_svd", "ties",
                      "magnitude_prune"}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def module_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
            "down_proj": (hidden, intermediate)}


def module_path(layer: int, name: str) -> str:
    group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{group}.{name}"


def random_adapters(hidden: int, intermediate: int, layers: int, seed: int = 0) -> list[CanonicalAdapter]:
    """Four rank-16 adapters with trained-looking factors: A ~ N(0, 1/in), B ~ N(0, 0.02²)."""
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    for _ in range(N_ADAPTERS):
        modules = {}
        for layer in range(layers):
            for name, (out_f, in_f) in module_shapes(hidden, intermediate).items():
                A = torch.randn(RANK, in_f, generator=generator) / math.sqrt(in_f)
                B = torch.randn(out_f, RANK, generator=generator) * 0.02
                modules[module_path(layer, name)] = LoraModule(A=A, B=B, scale=ALPHA / RANK)
        adapters.append(CanonicalAdapter(format="peft", peft_type="LORA", modules=modules, rank=RANK, alpha=ALPHA,
                                         target_modules=LINEAR))
    return adapters


def peft_model_with(adapters: list[CanonicalAdapter], hidden: int, intermediate: int, layers: int):
    """A PeftModel on an uninitialised Llama of that shape holding the same factors as `adapters`."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    base = base.to_empty(device="cpu")  # neither side reads base weights for plain LoRA composition
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LINEAR, lora_dropout=0.0)
    model = get_peft_model(base, lora, adapter_name="a0")
    for index in range(1, len(adapters)):
        model.add_adapter(f"a{index}", lora)
    layers_by_path = lora_layers(model, "a0")
    with torch.no_grad():
        for index, adapter in enumerate(adapters):
            for path, layer in layers_by_path.items():
                module = adapter.modules[path]
                layer.lora_A[f"a{index}"].weight.copy_(module.A)
                layer.lora_B[f"a{index}"].weight.copy_(module.B)
                assert layer.scaling[f"a{index}"] == module.scale
    return model


def lora_layers(model, adapter_name: str) -> dict:
    from peft.tuners.lora import LoraLayer

    return {key.removeprefix("base_model.model."): layer for key, layer in model.named_modules()
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A}


def time_peft(model, combination_type: str, name: str, **kw) -> tuple[float, dict]:
    start = time.perf_counter()
    with torch.no_grad():
        model.add_weighted_adapter([f"a{i}" for i in range(N_ADAPTERS)], WEIGHTS, name,
                                   combination_type=combination_type, **kw)
    return time.perf_counter() - start, lora_layers(model, name)


def time_quiver(adapters, method: str, **kw) -> tuple[float, CanonicalAdapter, dict, int]:
    """Median of 3 runs (1 run when the first takes over 5 s)."""
    times = []
    while True:
        start = time.perf_counter()
        composed, report = compose_adapters(adapters, WEIGHTS, method, **kw)
        times.append(time.perf_counter() - start)
        if len(times) == 3 or times[0] > 5:
            break
    return statistics.median(times), composed, report, len(times)


def rel_err(peft_layers: dict, name: str, composed: CanonicalAdapter) -> float:
    """‖ΔW_peft − ΔW_quiver‖_F / ‖ΔW_peft‖_F over the modules PEFT composed."""
    num = den = 0.0
    with torch.no_grad():
        for path, layer in peft_layers.items():
            theirs = layer.get_delta_weight(name).double()
            module = composed.modules[path]
            ours = (module.B.double() @ module.A.double()) * module.scale
            num += float(((theirs - ours) ** 2).sum())
            den += float((theirs ** 2).sum())
    return math.sqrt(num / den)


def truncation_error(dense: CanonicalAdapter, result, peft_name: str | None = None) -> float:
    """‖D − ΔW‖_F / ‖D‖_F over the modules of `dense` (a full-rank composition)."""
    num = den = 0.0
    with torch.no_grad():
        for path, module in dense.modules.items():
            target = module.B.double() @ module.A.double()
            if peft_name is None:
                got = result.modules[path].B.double() @ result.modules[path].A.double()
            else:
                got = result[path].get_delta_weight(peft_name).double()
            num += float(((target - got) ** 2).sum())
            den += float((target ** 2).sum())
    return math.sqrt(num / den)


def bench_small(skip_methods: bool) -> None:
    hidden, intermediate, layers = 1024, 2816, 4
    adapters = random_adapters(hidden, intermediate, layers, seed=0)
    shape = {"hidden": hidden, "intermediate": intermediate, "layers": layers, "adapters": N_ADAPTERS,
             "adapter_rank": RANK, "modules": len(adapters[0].modules), "threads": torch.get_num_threads()}

    model = peft_model_with(adapters, hidden, intermediate, layers)
    compose_adapters(adapters, WEIGHTS, "svd", rank=RANK)  # warm-up (first linalg calls)
    peft_s, peft_layers = time_peft(model, "svd", "svd_out", svd_rank=RANK)
    quiver_s, composed, report, runs = time_quiver(adapters, "svd", rank=RANK)
    emit({"bench": "compose", "method": "svd", "rank": RANK, "peft_s": round(peft_s, 3),
          "quiver_s": round(quiver_s, 4), "speedup": round(peft_s / quiver_s, 1),
          "rel_err": rel_err(peft_layers, "svd_out", composed), "truncation_error_max": report["max_error"],
          "quiver_runs": runs, "goal": {"speedup": 100, "rel_err": 1e-4}, **shape})
    del model, peft_layers, composed
    gc.collect()
    if skip_methods:
        return

    # PEFT's peers run on a one-layer model of the same shape (its work is per module and every
    # layer has the same shapes), × layers; Quiver composes all layers. rel_err is on layer 0.
    model = peft_model_with([replace_modules(a, 1) for a in adapters], hidden, intermediate, 1)
    for method in METHODS:
        if method == "svd":
            continue
        kw: dict = {}
        if method.endswith("_svd"):
            kw["rank"] = RANK
        if METHODS[method].dense:
            kw.update(density=DENSITY, seed=0)
        quiver_s, composed, report, runs = time_quiver(adapters, method, **kw)
        record = {"bench": "compose", "method": method, "quiver_s": round(quiver_s, 4), "quiver_runs": runs,
                  "out_rank_max": max(m.rank for m in composed.modules.values()), "exact": report["exact"],
                  "error_max": report["max_error"], "threads": torch.get_num_threads()}
        if PEER[method] is not None:
            peer, svd_rank = PEER[method]
            peft_kw: dict = {}
            if svd_rank is not None:
                peft_kw["svd_rank"] = min(hidden, intermediate) if svd_rank == FULL else svd_rank
            if peer not in ("cat", "linear"):
                peft_kw["density"] = DENSITY
            name = f"out_{method}"
            layer_s, peft_layers = time_peft(model, peer, name, **peft_kw)
            record.update(peft_method=peer, peft_svd_rank=peft_kw.get("svd_rank"), peft_s=round(layer_s * layers, 3),
                          peft_s_from="one layer x 4", speedup=round(layer_s * layers / quiver_s, 1))
            if method in DETERMINISTIC_PEER:
                record["rel_err_layer0"] = rel_err(peft_layers, name, composed)
            else:
                record["note"] = "random DARE masks differ between the two runs; no rel_err"
            if method in ("ties_svd", "magnitude_prune_svd"):
                # Both truncate the same dense result D: how close each gets to it (layer 0).
                dense, _ = compose_adapters([replace_modules(a, 1) for a in adapters], WEIGHTS,
                                            method.removesuffix("_svd"), density=DENSITY)
                record["trunc_err_layer0"] = {"quiver": truncation_error(dense, composed),
                                              "peft": truncation_error(dense, peft_layers, name)}
            if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
                start = time.perf_counter()
                with torch.no_grad():
                    model.add_weighted_adapter([f"a{i}" for i in range(N_ADAPTERS)], WEIGHTS, name + "_factors",
                                               combination_type=method, density=DENSITY)
                record["peft_same_name_factor_level_s"] = round((time.perf_counter() - start) * layers, 3)
                model.delete_adapter(name + "_factors")
            model.delete_adapter(name)
            del peft_layers
        emit(record)
        del composed
        gc.collect()
    del model
    gc.collect()


def bench_7b(skip_peft: bool) -> None:
    hidden, intermediate, layers = 4096, 11008, 32
    adapters = random_adapters(hidden, intermediate, layers, seed=1)
    compose_adapters([replace_modules(a, 1) for a in adapters], WEIGHTS, "svd", rank=RANK)  # warm-up
    quiver_s, composed, report, runs = time_quiver(adapters, "svd", rank=RANK)
    record = {"bench": "compose", "method": "svd", "shape": "llama-7b", "hidden": hidden,
              "intermediate": intermediate, "layers": layers, "adapters": N_ADAPTERS, "adapter_rank": RANK,
              "rank": RANK, "modules": len(composed.modules), "quiver_s": round(quiver_s, 3), "quiver_runs": runs,
              "goal_quiver_s": 5.0, "threads": torch.get_num_threads()}
    if not skip_peft:
        one_layer = [replace_modules(a, 1) for a in adapters]
        del adapters
        gc.collect()
        model = peft_model_with(one_layer, hidden, intermediate, 1)
        layer_s, peft_layers = time_peft(model, "svd", "svd_out", svd_rank=RANK)
        record.update(peft_one_layer_s=round(layer_s, 2), peft_s=round(layer_s * layers, 1),
                      peft_s_from="one layer x 32", speedup=round(layer_s * layers / quiver_s, 1),
                      rel_err_layer0=rel_err(peft_layers, "svd_out", composed))
    emit(record)


def replace_modules(adapter: CanonicalAdapter, layers: int) -> CanonicalAdapter:
    """The same adapter restricted to its first `layers` layers."""
    keep = {p: m for p, m in adapter.modules.items() if int(p.split(".")[2]) < layers}
    return CanonicalAdapter(format=adapter.format, peft_type=adapter.peft_type, modules=keep, rank=adapter.rank,
                            alpha=adapter.alpha, target_modules=adapter.target_modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-methods", action="store_true", help="only the svd headline and the 7B line")
    parser.add_argument("--skip-peft-7b", action="store_true", help="no PEFT one-layer measurement at 7B shape")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: on a shared small box, OpenMP barriers of "
                             "more threads than free cores make timings swing 10x)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bench_small(args.skip_methods)
    bench_7b(args.skip_peft_7b)


if __name__ == "__main__":
    main()
