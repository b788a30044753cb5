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

A search is two round trips whatever k is: the rankings, then the fused adapters with
everything their listing shows (the API: hub.selectors.adapter_listings, one statement also
compiled once, whose values PostgreSQL writes; pages: model instances, adapter_hits). Round
trips, not the scans, were most of the SQL time.
The rankings travel as one multi-statement query (RankingsStatements): the weights ranking
(the active trained encoder is looked up inside it) and the description and keyword rankings
UNION ALL'd, each statement after a SET LOCAL of its HNSW breadth (hnsw.ef_search): the two
graphs reach the recall goal at different breadths (hub/settings.py), and the weight scan at
the description's breadth took ≈ 5.8 ms of a 26 ms search (3.4 ms at its own). Each statement
is compiled by the ORM once per search shape (RankingsStatement, a hub.db.KeptStatement); later
searches of that shape only fill in their words and vector.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from django.conf import settings
from django.contrib.postgres.search import SearchQuery, SearchRank
from django.db import connection
from django.db.models import CharField, F, QuerySet, Value
from django.db.models.expressions import RawSQL
from pgvector import Vector
from pgvector.django import CosineDistance

from generation import weight_encoder
from generation.text_encoder import TEXT_DIM
from hub.db import KeptStatement, KeptStatements
from hub.models import Adapter, EncoderArtifact
from hub.ranking import fuse
from hub.selectors import (adapter_list, adapters_for_listing, attach_readable_provenance, visibility_scope,
                           visible_adapters)
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
# no extra round trip and no cache to invalidate (a kept RankingsStatement reads it too). Raw SQL
# because the ORM spelling of this subquery compiled slower than PostgreSQL runs it (≈ 1 ms).
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


def ranking_groups(modes: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The rankings as statements: the weights ranking alone (its scan runs at its own breadth),
    then the others together (last: their breadth is the session's, which then stays set)."""
    weights = tuple(mode for mode in modes if mode == "weights")
    others = tuple(mode for mode in modes if mode != "weights")
    return [group for group in (weights, others) if group]


def hnsw_ef_search(modes: tuple[str, ...]) -> int:
    """The HNSW breadth (hnsw.ef_search) of a statement of these rankings."""
    return settings.QUIVER_HNSW_WEIGHTS_EF_SEARCH if modes == ("weights",) else settings.QUIVER_HNSW_EF_SEARCH


class RankingsStatement(KeptStatement):
    """A rankings statement of one search shape, compiled by the ORM once (hub.db.KeptStatement):
    building and compiling the three-part statement costs ≈ 2 ms of the web's CPU per search, as
    much as PostgreSQL takes to run it. Slots: the query's words and its vector (as pgvector text)."""

    # Stand-ins compiled in place of a search's words and vector. Two of each: a slot must change
    # with its stand-in and nothing else may.
    QUERY_STAND_INS = ("quiver query stand-in one", "quiver query stand-in two")
    VECTOR_STAND_INS = ([0.5] * TEXT_DIM, [0.25] * TEXT_DIM)

    def __init__(self, scope: QuerySet, limit: int, modes: tuple[str, ...]):
        self.modes, self.ef_search = modes, hnsw_ef_search(modes)
        super().__init__(lambda query, vector: rankings_query(scope, query, vector, limit, modes),
                         stand_ins={"query": self.QUERY_STAND_INS, "vector": self.VECTOR_STAND_INS},
                         as_param={"vector": lambda vector: Vector(vector).to_text()})


class RankingsStatements:
    """The rankings statements of one search shape (ranking_groups), sent as one query string, each
    after `SET LOCAL hnsw.ef_search`: one round trip. Sent outside a transaction, the statements
    of a multi-statement query run as one implicit transaction, which the SET LOCALs end with;
    inside one (an atomic block), the last SET LOCAL leaves the session's breadth (hub/db.py)
    set. This relies on Django's default client-side parameter binding (psycopg's ClientCursor):
    server-side binding would refuse several statements in one query."""

    def __init__(self, scope: QuerySet, limit: int, modes: tuple[str, ...]):
        self.statements = [RankingsStatement(scope, limit, group) for group in ranking_groups(modes)]
        parts = [f"SET LOCAL hnsw.ef_search = {int(statement.ef_search)}; {statement.sql}"
                 for statement in self.statements]
        if self.statements[-1].ef_search != settings.QUIVER_HNSW_EF_SEARCH:
            parts.append(f"SET LOCAL hnsw.ef_search = {int(settings.QUIVER_HNSW_EF_SEARCH)}")
        self.sql = "; ".join(parts)

    def rows(self, query: str, vector) -> list[tuple[str, int, float]]:
        """(ranking, id, value) rows of each statement in turn, as `rankings_query(...)` of its
        rankings would return them."""
        vector_text = Vector(vector).to_text()
        params = [param for statement in self.statements
                  for param in statement.params_with(query=query, vector=vector_text)]
        rows = []
        with connection.cursor() as cursor:
            cursor.execute(self.sql, params)
            while True:
                if cursor.description is not None:  # a SELECT's result, not a SET's
                    rows.extend(cursor.fetchall())
                if not cursor.nextset():
                    return rows


_rankings_statements = KeptStatements()


def rankings_statement(user, *, limit: int, modes: tuple[str, ...], **filters) -> RankingsStatements:
    key = (visibility_scope(user), limit, modes, tuple(sorted(filters.items())))
    return _rankings_statements.get(
        key, lambda: RankingsStatements(adapter_list(user, **filters).order_by(), limit, modes))


# A search's or a "more like this" list's result before its adapters are fetched: (adapter id,
# score, what matched), best first. Pages fetch the adapters (search_adapters, similar_adapters);
# the API fetches their listings (hub.selectors.adapter_listings), a faster path to the same JSON.
Match = tuple[int, float, dict[str, float]]


def search_matches(user, query: str, *, k: int = 10, base_model=None, format=None, tag=None, license=None,
                   modes: tuple[str, ...] = RANKINGS) -> list[Match]:
    statement = rankings_statement(user, limit=max(4 * k, 40), modes=tuple(modes),
                                   base_model=base_model, format=format, tag=tag, license=license)
    vector = embed_query(query)
    rankings: dict[str, list[tuple[int, float]]] = {mode: [] for mode in RANKINGS if mode in modes}
    for ranking, adapter_id, value in statement.rows(query, vector):
        # Cosine distance for the vector rankings, text rank for keywords; rows of each come best first.
        rankings[ranking].append((adapter_id, value if ranking == "keywords" else 1.0 - value))
    return fuse({name: ranking for name, ranking in rankings.items() if ranking}, k)


def similar_matches(user, adapter: Adapter, *, k: int = 10) -> list[Match]:
    """Nearest adapters by weight embedding on the same base model ("more like this")."""
    if adapter.weight_embedding is None:
        return []
    scope = visible_adapters(user).filter(base_model_id=adapter.base_model_id).exclude(id=adapter.id).order_by()
    nearest = _nearest(scope, "weight_embedding", adapter.weight_embedding, k, weight_encoder=adapter.weight_encoder)
    return [(adapter_id, similarity, {"weights": round(similarity, 4)}) for adapter_id, similarity in nearest]


def adapter_hits(user, matches: list[Match]) -> list[SearchHit]:
    """The matched adapters with what their listing shows, in the matches' order (an adapter deleted
    or hidden since it was ranked is left out)."""
    adapters = adapters_for_listing(user, visible_adapters(user)).in_bulk([adapter_id for adapter_id, _, _ in matches])
    attach_readable_provenance(user, adapters.values())
    return [SearchHit(adapters[adapter_id], score, matched) for adapter_id, score, matched in matches
            if adapter_id in adapters]


def search_adapters(user, query: str, **options) -> list[SearchHit]:
    return adapter_hits(user, search_matches(user, query, **options))


def similar_adapters(user, adapter: Adapter, *, k: int = 10) -> list[SearchHit]:
    return adapter_hits(user, similar_matches(user, adapter, k=k))
