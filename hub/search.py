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

A search is two SQL statements whatever k is: the three rankings UNION ALL'd into one
(the active trained encoder is looked up inside it), then the fused adapters with
everything their listing shows. Round trips, not the scans, were most of the SQL time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from django.contrib.postgres.search import SearchQuery, SearchRank
from django.db.models import CharField, F, QuerySet, Value
from django.db.models.expressions import RawSQL
from pgvector.django import CosineDistance

from generation import weight_encoder
from hub.models import Adapter, EncoderArtifact
from hub.ranking import fuse
from hub.selectors import adapter_list, adapters_for_listing, attach_readable_provenance, visible_adapters
from hub.services.embeddings import TEXT_ENCODER_LABEL, embed_query

RANKINGS = ("description", "weights", "keywords")


@dataclass
class SearchHit:
    adapter: Adapter
    score: float
    matched: dict[str, float] = field(default_factory=dict)  # ranking → similarity (keywords: text rank)


def _nearest_query(scope: QuerySet, column: str, vector, limit: int, ranking: str) -> QuerySet:
    """(ranking, id, cosine similarity) of the `limit` nearest rows, best first (HNSW index scan)."""
    return (scope.annotate(ranking=Value(ranking), distance=CosineDistance(column, vector))
            .order_by("distance").values_list("ranking", "id", "distance")[:limit])


def _nearest(scope, column: str, vector, limit: int, **encoder_filter) -> list[tuple[int, float]]:
    rows = _nearest_query(scope.filter(**encoder_filter), column, vector, limit, "nearest")
    return [(adapter_id, 1.0 - distance) for _, adapter_id, distance in rows]


def _keyword_query(scope: QuerySet, query: str, limit: int) -> QuerySet:
    """Full-text matches (all query words, stemmed) on the GIN-indexed stored document,
    ranked by ts_rank over that stored document (F(): SearchRank would otherwise rebuild a
    tsvector from each row's text). AND semantics keep the matched set small enough to rank
    within the latency budget at 100 000 adapters; recall for loosely worded queries comes
    from the description vectors, which RRF fuses with this precision-oriented list."""
    text = SearchQuery(query, config="english", search_type="plain")
    return (scope.filter(search_document=text)
            .annotate(ranking=Value("keywords"), text_rank=SearchRank(F("search_document"), text))
            .order_by("-text_rank").values_list("ranking", "id", "text_rank")[:limit])


# The label (EncoderArtifact.label) of the active trained encoder, as SQL: the weight ranking reads it
# inside the search statement, so a newly trained encoder counts at once in every web process, with
# no extra round trip and no cache to invalidate. Raw SQL because the ORM spelling of this subquery
# took longer to compile (≈ 1 ms a search) than PostgreSQL takes to run it.
ACTIVE_WEIGHT_LABEL_SQL = (
    f"(SELECT version || '@' || left(weights_id, 12) FROM {EncoderArtifact._meta.db_table}"
    " WHERE active AND version = %s ORDER BY created_at DESC LIMIT 1)")


def _with_trained_weight_encoder(scope: QuerySet) -> QuerySet:
    """`scope` limited to weight vectors of the active trained encoder. The IS NOT NULL test reads
    no row, so PostgreSQL evaluates it once and skips the HNSW scan when no trained encoder
    exists (a scan whose every row failed the filter would walk thousands of index entries)."""
    label = RawSQL(ACTIVE_WEIGHT_LABEL_SQL, [weight_encoder.ENCODER_VERSION], output_field=CharField())
    return scope.alias(active_weight_label=label).filter(active_weight_label__isnull=False,
                                                         weight_encoder=F("active_weight_label"))


def rankings_query(scope: QuerySet, query: str, vector, limit: int, modes=RANKINGS) -> QuerySet:
    """One statement: each ranking's best `limit` (ranking, id, value) rows, UNION ALL'd."""
    parts = []
    if "description" in modes:
        parts.append(_nearest_query(scope.filter(description_encoder=TEXT_ENCODER_LABEL),
                                    "description_embedding", vector, limit, "description"))
    if "weights" in modes:
        parts.append(_nearest_query(_with_trained_weight_encoder(scope), "weight_embedding", vector, limit, "weights"))
    if "keywords" in modes:
        parts.append(_keyword_query(scope, query, limit))
    return parts[0].union(*parts[1:], all=True) if len(parts) > 1 else parts[0]


def search_adapters(user, query: str, *, k: int = 10, base_model=None, format=None, tag=None, license=None,
                    modes: tuple[str, ...] = RANKINGS) -> list[SearchHit]:
    scope = adapter_list(user, base_model=base_model, format=format, tag=tag, license=license).order_by()
    candidates = max(4 * k, 40)
    vector = embed_query(query)
    rankings: dict[str, list[tuple[int, float]]] = {mode: [] for mode in RANKINGS if mode in modes}
    for ranking, adapter_id, value in rankings_query(scope, query, vector, candidates, modes):
        # Cosine distance for the vector rankings, text rank for keywords; rows of each come best first.
        rankings[ranking].append((adapter_id, value if ranking == "keywords" else 1.0 - value))
    fused = fuse({name: ranking for name, ranking in rankings.items() if ranking}, k)
    adapters = adapters_for_listing(user, visible_adapters(user)).in_bulk([adapter_id for adapter_id, _, _ in fused])
    attach_readable_provenance(user, adapters.values())
    return [SearchHit(adapters[adapter_id], score, matched) for adapter_id, score, matched in fused if adapter_id in adapters]


def similar_adapters(user, adapter: Adapter, *, k: int = 10) -> list[SearchHit]:
    """Nearest adapters by weight embedding on the same base model ("more like this")."""
    if adapter.weight_embedding is None:
        return []
    scope = visible_adapters(user).filter(base_model_id=adapter.base_model_id).exclude(id=adapter.id).order_by()
    nearest = _nearest(scope, "weight_embedding", adapter.weight_embedding, k, weight_encoder=adapter.weight_encoder)
    adapters = adapters_for_listing(user, visible_adapters(user)).in_bulk([adapter_id for adapter_id, _ in nearest])
    attach_readable_provenance(user, adapters.values())
    return [SearchHit(adapters[i], similarity, {"weights": round(similarity, 4)}) for i, similarity in nearest if i in adapters]
