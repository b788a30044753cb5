"""Offline retrieval evaluation for "Search by task description".

Can a text query find an adapter whose description the index does not have?

Data (`load_population`): a list of (name, description, CanonicalAdapter).
  --source demo  (default) the 8 demo adapters from hub.demo.build_demo_files(var/demo-cache).
  --source zoo   every task of the LoRA zoo (generation/zoo/, var/zoo/full; built if missing).

Protocol: the population is split into folds; each adapter is held out exactly
once. Adapters that share a description (one task) are held out together, so a
held-out task is never seen in training. With <= 20 tasks (the demo) this is
leave-one-out; otherwise `--folds` seeded folds (default 5). In each fold a
weight encoder is trained with `generation.weight_encoder.train_encoder` on the
training adapters' (adapter, description embedding) pairs (`--epochs`, default
100; seed = --seed + fold), as the hub's training job does.

Texts are embedded with all-MiniLM-L6-v2 (`generation.text_encoder`). Index-side
texts mirror the hub's `description_text` ("name in words. description"; the
population carries no tags). Each held-out adapter h gives one query:
  query   = the embedding of h's raw description (what a user would type), by the
            search's own query path (`text_encoder.embed_query` at --query-precision,
            default QUIVER_QUERY_PRECISION or auto, as the hub runs it);
  correct = h (or any held-out adapter with the same description).
Every mode ranks all n adapters of the population (training ones + held-out ones):
  weights     — items: weight embeddings of every adapter by this fold's encoder.
  description — items: description embeddings of the training adapters; a held-out
                adapter's description is hidden, so its item is its NAME in words
                only (the "thin metadata" case AutoLoRA targets).
  fused       — reciprocal-rank fusion of the two rankings with the product's
                `hub.ranking.fuse` (each list cut to the CANDIDATES that
                `hub.search.search_adapters` fetches at its default k=10).
  random      — a seeded random permutation: the floor. The analytic expectation
                (k/n for one correct item) is on the summary line.
Items get seeded random ids each fold, so `fuse`'s tie-break by id is not
correlated with the answer.

Output, JSON lines: one per mode
  {"bench": "retrieval", "mode": ..., "recall_at_1": ..., "recall_at_5": ..., "n_queries": ...}
then a summary line with the source, population size, folds and seconds.

Expectations. Zoo goal: weights-only recall@5 >= 0.8 on held-out tasks (measured:
0.867, recall@1 0.587; README "Retrieval on the zoo"). The demo adapters are trained
on random synthetic objectives, so their weights carry no task meaning beyond which
base model and modules they adapt (a Llama chat adapter vs a CLIP style LoRA): that,
not the task, is what weights-only retrieval can find there, and with 8 adapters
recall@5 is mostly the floor.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from generation.text_encoder import embed_query, embed_texts, query_dtype  # noqa: E402
from generation.weight_encoder import TRAIN_EPOCHS, adapter_features, train_encoder  # noqa: E402
from hub.formats import CanonicalAdapter, parse_adapter  # noqa: E402
from hub.ranking import fuse  # noqa: E402

KS = (1, 5)
MODES = ("weights", "description", "fused", "random")
CANDIDATES = 40  # hub.search.search_adapters: max(4 * k, 40) per ranking at its default k=10
LOO_MAX_TASKS = 20  # up to this many tasks: leave-one-task-out
ENCODE_BATCH = 256

Population = list[tuple[str, str, CanonicalAdapter]]


# --- data -----------------------------------------------------------------------------------

def load_population(source: str = "demo", cache: Path = ROOT / "var" / "demo-cache") -> Population:
    """[(name, description, CanonicalAdapter)] of the chosen source."""
    if source == "demo":
        return _demo_population(cache)
    if source == "zoo":
        return _zoo_population()
    raise ValueError(f"unknown source {source!r}")


def _demo_population(cache: Path) -> Population:
    from hub.demo.builders import build_demo_files, upload_files

    built = build_demo_files(cache)  # reuses what is already built there
    return [(entry["name"], entry["description"], parse_adapter(upload_files(entry))) for entry in built["adapters"]]


def _zoo_population(zoo_dir: Path = ROOT / "var" / "zoo" / "full") -> Population:
    """Every task of the LoRA zoo (training experts and held-out oracles alike): its slug,
    its description and its trained adapter. Built first if needed (resumable)."""
    from generation.zoo.build import build_zoo
    from generation.zoo.evaluate import zoo_adapters

    build_zoo(zoo_dir, "full")
    splits = ("train", "unseen_pair", "unseen_part")
    return [(task.slug, task.description, adapter) for task, adapter in zoo_adapters(zoo_dir, splits)]


def name_words(name: str) -> str:
    return name.replace("-", " ").replace("_", " ")


def index_text(name: str, description: str) -> str:
    """Mirror of hub.services.embeddings.description_text (no tags here)."""
    return ". ".join([name_words(name), description.strip()]) if description.strip() else name_words(name)


# --- protocol -------------------------------------------------------------------------------

def make_folds(descriptions: list[str], folds: int | None, seed: int) -> list[list[int]]:
    """Held-out index lists; every adapter in exactly one, one task never split."""
    tasks = sorted(set(descriptions))
    random.Random(seed).shuffle(tasks)
    if folds is None:
        folds = len(tasks) if len(tasks) <= LOO_MAX_TASKS else 5
    folds = max(1, min(folds, len(tasks)))
    fold_of = {task: i % folds for i, task in enumerate(tasks)}
    return [[j for j, d in enumerate(descriptions) if fold_of[d] == f] for f in range(folds)]


def rank_by_cosine(query: torch.Tensor, items: torch.Tensor, ids: list[int]) -> list[tuple[int, float]]:
    """Best-first (id, cosine) of every item (ties by id)."""
    scores = (F.normalize(items, dim=-1) @ F.normalize(query, dim=-1)).tolist()
    return sorted(zip(ids, scores), key=lambda pair: (-pair[1], pair[0]))


@torch.no_grad()
def encode_weights(encoder, prepared: list) -> torch.Tensor:
    """n × TEXT_DIM weight embeddings, in batches (features were computed once)."""
    encoder.eval()
    return torch.cat([encoder.encode_prepared(prepared[i:i + ENCODE_BATCH]) for i in range(0, len(prepared), ENCODE_BATCH)])


def run_fold(fold: int, held: list[int], population: Population, texts: dict, prepared: list, args) -> tuple[dict, float]:
    """{mode: [per-query {k: hit}]} for one fold, and the encoder's final training recall@1."""
    n = len(population)
    descriptions = [description for _, description, _ in population]
    train = [j for j in range(n) if j not in held]
    if len(train) < 2:
        sys.exit("each fold needs at least two training adapters")
    encoder, curve = train_encoder([population[j][2] for j in train], texts["index"][train],
                                   epochs=args.epochs, seed=args.seed + fold)
    weights = encode_weights(encoder, prepared)
    # Description index: training adapters as the hub embeds them; held-out ones by name only.
    described = torch.stack([texts["name"][j] if j in held else texts["index"][j] for j in range(n)])

    rng = random.Random(args.seed * 1_000_003 + fold)
    ids = rng.sample(range(n), n)  # item j is called ids[j]
    hits: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for h in held:
        query = texts["query"][h]
        correct = {ids[j] for j in held if descriptions[j] == descriptions[h]}
        rankings = {
            "weights": rank_by_cosine(query, weights, ids),
            "description": rank_by_cosine(query, described, ids),
        }
        rankings["fused"] = fuse({m: r[:CANDIDATES] for m, r in rankings.items()}, max(KS))
        rankings["random"] = [(i, 0.0) for i in rng.sample(ids, n)]
        for mode, ranking in rankings.items():
            top = [row[0] for row in ranking]
            hits[mode].append({k: bool(correct & set(top[:k])) for k in KS})
    return hits, curve[-1]["recall_at_1"]


def random_expectation(population: Population, k: int) -> float:
    """E[recall@k] of a uniformly random ranking: 1 - C(n-c, k)/C(n, k), c correct of n, per query."""
    n = len(population)
    k = min(k, n)
    counts = {}
    for _, description, _ in population:
        counts[description] = counts.get(description, 0) + 1
    per_query = [1 - math.comb(n - counts[d], k) / math.comb(n, k) for _, d, _ in population]
    return sum(per_query) / n


# --- main -----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("demo", "zoo"), default="demo")
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "demo-cache", help="demo build folder")
    parser.add_argument("--folds", type=int, default=None, help="default: leave-one-task-out up to 20 tasks, else 5")
    parser.add_argument("--epochs", type=int, default=TRAIN_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--query-precision", default=os.environ.get("QUIVER_QUERY_PRECISION", "auto"),
                        choices=("auto", "bfloat16", "float32"))
    args = parser.parse_args()

    start = time.perf_counter()
    population = load_population(args.source, args.cache)
    names = [name for name, _, _ in population]
    descriptions = [description for _, description, _ in population]
    texts = {
        "query": torch.stack([embed_query(d, args.query_precision) for d in descriptions]),
        "index": embed_texts([index_text(n, d) for n, d in zip(names, descriptions)]),
        "name": embed_texts([name_words(n) for n in names]),
    }
    prepared = [adapter_features(adapter) for _, _, adapter in population]  # encoder defaults k / proj_dim

    folds = make_folds(descriptions, args.folds, args.seed)
    hits: dict[str, list[dict]] = {mode: [] for mode in MODES}
    train_recalls = []
    for fold, held in enumerate(folds):
        fold_hits, train_recall = run_fold(fold, held, population, texts, prepared, args)
        train_recalls.append(train_recall)
        for mode in MODES:
            hits[mode].extend(fold_hits[mode])

    for mode in MODES:
        queries = hits[mode]
        line = {"bench": "retrieval", "mode": mode}
        line.update({f"recall_at_{k}": round(sum(q[k] for q in queries) / len(queries), 4) for k in KS})
        line["n_queries"] = len(queries)
        print(json.dumps(line))
    print(json.dumps({
        "bench": "retrieval", "source": args.source, "population": len(population), "folds": len(folds),
        "epochs": args.epochs, "seed": args.seed, "query_dtype": str(query_dtype(args.query_precision)),
        **{f"random_expected_recall_at_{k}": round(random_expectation(population, k), 4) for k in KS},
        "encoder_train_recall_at_1": round(sum(train_recalls) / len(train_recalls), 4),
        "seconds": round(time.perf_counter() - start, 2),
    }))


if __name__ == "__main__":
    main()
