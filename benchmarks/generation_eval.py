"""Generated adapters on held-out zoo tasks (issue: SG-LoRA / ICM-LoRA).

For each held-out task of the LoRA zoo (unseen (category, language) pairs, and
tasks whose category or language no expert has seen), with only the task's
description as input:
  base      the frozen classifier alone
  nearest   the expert whose task embedding is closest to the description
  average   the uniform average of the top-k experts' updates (exact Σ ΔWᵢ / k)
  sg-lora   SG-LoRA trained on the training experts (generation/generators.py)
  icm-lora  ICM-LoRA likewise
  oracle    the adapter trained on the task itself
Recovered gain = (acc − base) / (oracle − base), averaged over tasks.
Also: generation latency per request (embed + generate + write PEFT files) and
the generators' storage as a fraction of the zoo's training adapters.

    python benchmarks/generation_eval.py [--zoo var/zoo/full] [--size full|small] [--per-task]
                                         [--space function|parameter] [--methods sg-lora icm-lora]
--space function trains the generators as the hub does when asked for space=function (the
zoo's base carries probe texts); the experts' teacher outputs are computed once and shared.
By default it first adds the derived conjunction experts (generation/conjunctions.py), as the
hub does on a base it can run (--no-conjunctions leaves them out); nearest and average stay over the real
experts (the peers), and each task line also says which bank entry the generators ranked first.
Where the base runs (--space function or conjunctions) the prior's temperature is chosen by
function as the hub chooses it (generators.select_temperature; one generation_temperature line per
method), unless --temperature fixes it.
--teacher-cache FILE keeps the experts' teacher outputs (safetensors) between runs, and
--conjunction-cache FILE the distilled conjunctions.
Builds (or finishes) the zoo first if needed (resumable, ~40 s per adapter on 2 cores).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from generation import conjunctions, functional, generators, lora_layout  # noqa: E402
from generation.text_encoder import embed_texts  # noqa: E402
from generation.zoo import model as zoo_model  # noqa: E402
from generation.zoo.build import PROBE_TEXTS, build_zoo  # noqa: E402
from generation.zoo.evaluate import AdapterScorer, zoo_adapters  # noqa: E402
from hub.formats import write_peft_adapter  # noqa: E402
from hub.formats.base_model import read_probe_texts  # noqa: E402

METHODS = ("base", "nearest", "average", "sg-lora", "icm-lora", "oracle")


def averaged(adapters, weights):
    """Σ wᵢ·ΔWᵢ as one canonical adapter (factors stacked: exact)."""
    from kernels.compose import compose_adapters

    composed, _ = compose_adapters(adapters, weights, "linear")
    return composed


def cached(path: Path | None, key: dict, compute) -> torch.Tensor:
    """The tensor an earlier run kept in `path` for the same key, else compute() (kept there)."""
    stamp = json.dumps(key, sort_keys=True)
    if path is not None and path.exists():
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") == stamp:
                return handle.get_tensor("value")
    value = compute()
    if path is not None:
        save_file({"value": value.contiguous()}, str(path), {"key": stamp})
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None)
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=None,
                        help="the prior's softmax τ (default: chosen by function where the base runs, as the hub does)")
    parser.add_argument("--steps", type=int, default=None, help="generator training steps (default: the generator's)")
    parser.add_argument("--per-task", action="store_true", help="also print one line per task")
    parser.add_argument("--methods", nargs="+", choices=generators.METHODS, default=list(generators.METHODS))
    parser.add_argument("--space", choices=("parameter", "function"), default="parameter",
                        help="where the generators learn: parameter space (the hub's default) or function space "
                             "(POST /api/v1/generators/ with space=function)")
    parser.add_argument("--conjunctions", action=argparse.BooleanOptionalAction, default=True,
                        help="add derived conjunction experts before training, as the hub does by default on a "
                             "base it can run (--no-conjunctions: the experts alone)")
    parser.add_argument("--max-conjunctions", type=int, default=conjunctions.MAX_CONJUNCTIONS)
    parser.add_argument("--conjunction-steps", type=int, default=conjunctions.DISTILL_STEPS)
    parser.add_argument("--conjunction-probes", type=int, default=32, help="probe texts per conjunction and step")
    parser.add_argument("--teacher-cache", type=Path, default=None,
                        help="safetensors file for the experts' teacher outputs (computed when missing)")
    parser.add_argument("--conjunction-cache", type=Path, default=None,
                        help="safetensors file for the distilled conjunctions (distilled when missing or stale)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("QUIVER_BENCH_THREADS", 2)))
    zoo_dir = args.zoo or ROOT / "var" / "zoo" / args.size
    build_zoo(zoo_dir, args.size)

    experts = zoo_adapters(zoo_dir, ("train",))
    held_out = zoo_adapters(zoo_dir, ("unseen_pair", "unseen_part"))
    layout = lora_layout.dominant_layout([adapter for _, adapter in experts])
    params = torch.stack([lora_layout.flatten(adapter, layout) for _, adapter in experts])
    weights_digest = hashlib.sha256(params.float().numpy().tobytes()).hexdigest()  # a rebuilt zoo invalidates caches
    texts = [embed_texts(list(task.texts)) for task, _ in experts]

    settings = generators.GeneratorSettings(k=args.k, temperature=args.temperature)
    if args.steps:
        settings.steps = args.steps
    probe = teacher = None
    teacher_seconds = 0.0
    if args.space == "function" or args.conjunctions:  # as the hub trains them on a base model it can run
        probe = zoo_model.function_probe(zoo_dir / "base", read_probe_texts(zoo_dir / "base" / PROBE_TEXTS))
        started = time.perf_counter()
        slugs = [task.slug for task, _ in experts]
        teacher = cached(args.teacher_cache, {"experts": slugs, "weights": weights_digest, "probes": len(probe.texts)},
                         lambda: functional.teacher_probabilities(functional.BatchedLoRA(probe, layout), params))
        teacher_seconds = time.perf_counter() - started  # once here; each training job pays it
    derived_names: list[str] = []
    found: list[conjunctions.Conjunction] = []
    if args.conjunctions:
        started = time.perf_counter()
        found = conjunctions.find_conjunctions(teacher, limit=args.max_conjunctions)
        derived_names = ["+".join(experts[i][0].slug for i in c.parents) for c in found]
        derived_key = {"conjunctions": derived_names, "weights": weights_digest, "steps": args.conjunction_steps,
                       "probes": args.conjunction_probes, "version": conjunctions.CONJUNCTIONS_VERSION}
        derived = cached(args.conjunction_cache, derived_key, lambda: conjunctions.distill_conjunctions(
            functional.BatchedLoRA(probe, layout), params, teacher, found,
            steps=args.conjunction_steps, probes_per_task=args.conjunction_probes))
        print(json.dumps({"bench": "generation_conjunctions", "n": len(found), "steps": args.conjunction_steps,
                          "probes_per_step": args.conjunction_probes,
                          "seconds": round(time.perf_counter() - started, 1),
                          "conjunctions": [{"parents": name, "positives": c.positives, "overlap": c.overlap}
                                           for name, c in zip(derived_names, found)]}), flush=True)
        raw = [list(task.texts) for task, _ in experts]
        texts = texts + [embed_texts(conjunctions.conjunction_texts(raw, c)) for c in found]
        params = torch.cat([params, derived])
        teacher = torch.cat([teacher, conjunctions.product_teacher(teacher, found)]) if found else teacher
    trained, train_seconds, storage = {}, {}, {}
    for method in args.methods:
        started = time.perf_counter()
        trained[method], curve = generators.train_generator(
            method, params, texts, settings, probe=probe, layout=layout, teacher=teacher, space=args.space,
            parents=conjunctions.bank_parents(len(experts), found))
        train_seconds[method] = time.perf_counter() - started + teacher_seconds
        print(json.dumps({"bench": "generation_temperature", "method": method,
                          "temperature": trained[method].settings.temperature,
                          "selection": trained[method].temperature_selection}), flush=True)
        if args.per_task:
            print(json.dumps({"bench": "generation_curve", "method": method, "curve": curve}), flush=True)
        buffer = io.BytesIO()
        trained[method].save(buffer)
        storage[method] = buffer.tell()
    zoo_bytes = sum((zoo_dir / "adapters" / task.slug / "adapter_model.safetensors").stat().st_size for task, _ in experts)

    scorer = AdapterScorer(zoo_dir / "base")
    bank = trained[args.methods[0]].bank
    real_tasks = bank.task_embeddings[: len(experts)]  # the peers rank real experts only, never derived ones
    rows = []
    for task, oracle in held_out:
        query = embed_texts([task.description])[0]
        index = (real_tasks @ query).topk(min(args.k, len(experts))).indices.tolist()
        ranked_first = int((bank.task_embeddings @ query).argmax())
        top = [experts[i][1] for i in index]
        candidates = {"base": None, "nearest": top[0], "average": averaged(top, [1 / len(top)] * len(top)),
                      "oracle": oracle}
        for method, generator in trained.items():
            vector, _ = generator.generate(query)
            candidates[method] = lora_layout.unflatten(vector, layout)
        accuracy = {method: scorer.accuracy(task, adapter) for method, adapter in candidates.items()}
        rows.append({"task": task.slug, "split": task.split, "accuracy": accuracy,
                     "nearest_expert": experts[index[0]][0].slug,
                     "ranked_first": experts[ranked_first][0].slug if ranked_first < len(experts)
                     else "conjunction:" + derived_names[ranked_first - len(experts)],
                     # the bank entry alone (a derived conjunction's own quality, when it ranks first)
                     "ranked_first_accuracy": scorer.accuracy(task, lora_layout.unflatten(params[ranked_first], layout))})
        if args.per_task:
            print(json.dumps({"bench": "generation_task", **rows[-1]}), flush=True)

    for split in ("unseen_pair", "unseen_part"):
        chosen = [row for row in rows if row["split"] == split]
        for method in [m for m in METHODS if m in candidates]:
            gains = []
            for row in chosen:
                acc = row["accuracy"]
                span = acc["oracle"] - acc["base"]
                gains.append((acc[method] - acc["base"]) / span if abs(span) > 1e-9 else 0.0)
            print(json.dumps({
                "bench": "generation", "method": method, "split": split,
                "mean_accuracy": round(statistics.mean(row["accuracy"][method] for row in chosen), 4),
                "mean_recovered_gain": round(statistics.mean(gains), 4), "n_tasks": len(chosen)}), flush=True)

    # Latency of one request with a trained generator: embed, generate, write PEFT files.
    for method, generator in trained.items():
        timings = []
        for task, _ in held_out:
            started = time.perf_counter()
            vector, _ = generator.generate(embed_texts([task.description])[0])
            with tempfile.TemporaryDirectory() as scratch:
                write_peft_adapter(lora_layout.unflatten(vector, layout), Path(scratch))
            timings.append(time.perf_counter() - started)
        timings.sort()
        print(json.dumps({"bench": "generation_latency", "method": method, "n": len(timings),
                          "p50_s": round(timings[len(timings) // 2], 4), "max_s": round(timings[-1], 4),
                          "train_s": round(train_seconds[method], 1), "generator_bytes": storage[method],
                          "zoo_adapter_bytes": zoo_bytes,
                          "storage_fraction": round(storage[method] / zoo_bytes, 4)}), flush=True)


if __name__ == "__main__":
    main()
