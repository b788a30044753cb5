"""Reciprocal-rank fusion (Cormack et al., 2009), the product's way of merging
search rankings: score = Σ 1/(RRF_K + rank). No Django here, so offline
evaluations (benchmarks/retrieval_eval.py) fuse exactly as search does."""
from __future__ import annotations

RRF_K = 60


def fuse(rankings: dict[str, list[tuple[int, float]]], k: int) -> list[tuple[int, float, dict[str, float]]]:
    """Reciprocal-rank fusion of several best-first (id, score) lists."""
    scores: dict[int, float] = {}
    matched: dict[int, dict[str, float]] = {}
    for name, ranking in rankings.items():
        for rank, (adapter_id, value) in enumerate(ranking, start=1):
            scores[adapter_id] = scores.get(adapter_id, 0.0) + 1.0 / (RRF_K + rank)
            matched.setdefault(adapter_id, {})[name] = round(float(value), 4)
    best = sorted(scores, key=lambda adapter_id: (-scores[adapter_id], adapter_id))[:k]
    return [(adapter_id, scores[adapter_id], matched[adapter_id]) for adapter_id in best]
