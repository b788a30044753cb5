"""Search selectors: semantic search by task description and "more like this".

Three rankings of the adapters the user may see (visibility and filters are part
of each SQL query, so HNSW scans never return rows the user cannot see):
  description — cosine distance between the query's MiniLM embedding and each
                adapter's description embedding (HNSW index);
  weights     — the same query vector against weight embeddings (HNSW index),
                only once a trained weight encoder exists: the untrained encoder
                is not aligned with text, it only serves "similar";
  keywords    — PostgreSQL full-text rank over name and description.
Fusion is reciprocal-rank fusion (hub.ranking.fuse): score = Σ 1/(60 + rank),
which needs no calibration between cosine similarities and text ranks and lets an
adapter with no description be found through its weights alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from django.contrib.postgres.search import SearchQuery, SearchRank
from pgvector.django import CosineDistance

from hub.models import Adapter
from hub.ranking import fuse
from hub.selectors import adapter_list, visible_adapters
from hub.services.embeddings import TEXT_ENCODER_LABEL, embed_query, trained_weight_label


@dataclass
class SearchHit:
    adapter: Adapter
    score: float
    matched: dict[str, float] = field(default_factory=dict)  # ranking → similarity (keywords: text rank)


def _nearest(scope, column: str, vector, limit: int, **encoder_filter) -> list[tuple[int, float]]:
    rows = (scope.filter(**encoder_filter).annotate(distance=CosineDistance(column, vector))
            .order_by("distance").values_list("id", "distance")[:limit])
    return [(adapter_id, 1.0 - distance) for adapter_id, distance in rows]


def _keyword_matches(scope, query: str, limit: int) -> list[tuple[int, float]]:
    """Full-text matches (all query words, stemmed) on the GIN-indexed stored document,
    ranked by ts_rank. AND semantics keep the matched set small enough to rank within the
    latency budget at 100 000 adapters; recall for loosely worded queries comes from the
    description vectors, which RRF fuses with this precision-oriented list."""
    text = SearchQuery(query, config="english", search_type="plain")
    rows = (scope.filter(search_document=text).annotate(text_rank=SearchRank("search_document", text))
            .order_by("-text_rank").values_list("id", "text_rank")[:limit])
    return list(rows)


def search_adapters(user, query: str, *, k: int = 10, base_model=None, format=None, tag=None, license=None,
                    modes: tuple[str, ...] = ("description", "weights", "keywords")) -> list[SearchHit]:
    scope = adapter_list(user, base_model=base_model, format=format, tag=tag, license=license).order_by()
    candidates = max(4 * k, 40)
    vector = embed_query(query)
    rankings: dict[str, list[tuple[int, float]]] = {}
    if "description" in modes:
        rankings["description"] = _nearest(scope, "description_embedding", vector, candidates,
                                           description_encoder=TEXT_ENCODER_LABEL)
    weight_label = trained_weight_label()
    if "weights" in modes and weight_label:
        rankings["weights"] = _nearest(scope, "weight_embedding", vector, candidates, weight_encoder=weight_label)
    if "keywords" in modes:
        rankings["keywords"] = _keyword_matches(scope, query, candidates)
    fused = fuse(rankings, k)
    adapters = visible_adapters(user).in_bulk([adapter_id for adapter_id, _, _ in fused])
    return [SearchHit(adapters[adapter_id], score, matched) for adapter_id, score, matched in fused if adapter_id in adapters]


def similar_adapters(user, adapter: Adapter, *, k: int = 10) -> list[SearchHit]:
    """Nearest adapters by weight embedding on the same base model ("more like this")."""
    if adapter.weight_embedding is None:
        return []
    scope = visible_adapters(user).filter(base_model_id=adapter.base_model_id).exclude(id=adapter.id).order_by()
    nearest = _nearest(scope, "weight_embedding", adapter.weight_embedding, k, weight_encoder=adapter.weight_encoder)
    adapters = visible_adapters(user).in_bulk([adapter_id for adapter_id, _ in nearest])
    return [SearchHit(adapters[i], similarity, {"weights": round(similarity, 4)}) for i, similarity in nearest if i in adapters]
