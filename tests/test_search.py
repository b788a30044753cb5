"""Search by task description: embeddings made by a real worker, pgvector HNSW
queries with visibility and filters inside SQL, weight-based retrieval."""
from __future__ import annotations

import pytest

from tests.conftest import upload_payload, wait_for_all_jobs, wait_for_job

pytestmark = pytest.mark.django_db(transaction=True)


def names(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [hit["adapter"]["name"] for hit in response.json()["results"]]


def test_a_fresh_upload_is_embedded_by_the_worker_without_any_request(celery_worker_process, demo_bases,
                                                                      demo_adapter, make_user, client_for):
    from hub.models import Adapter, Job
    from hub.services.embeddings import TEXT_ENCODER_LABEL, UNTRAINED_WEIGHT_LABEL

    response = client_for(make_user("alice")).post(
        "/api/v1/adapters/", upload_payload(demo_adapter("ticket-summarizer")), format="multipart")
    assert response.status_code == 201
    adapter = Adapter.objects.get(name="ticket-summarizer")
    job = Job.objects.get(kind=Job.Kind.EMBED, params__adapter_id=adapter.id)
    assert wait_for_job(job.id).state == Job.State.SUCCEEDED  # polls the row, no HTTP request
    adapter.refresh_from_db()
    assert adapter.description_encoder == TEXT_ENCODER_LABEL and len(adapter.description_embedding) == 384
    assert adapter.weight_encoder == UNTRAINED_WEIGHT_LABEL and len(adapter.weight_embedding) == 384
    assert adapter.weight_embedded_revision == 1


@pytest.mark.parametrize("query, expected", [
    ("summarise support tickets for the triage queue", "ticket-summarizer"),
    ("write SQL queries from questions about a database", "sql-from-questions"),
    ("make images look like pixel art", "pixel-art-diffusers"),
    ("rewrite legal contracts in plain language", "contract-plain-language-rslora"),
])
def test_search_finds_the_adapter_for_a_described_task(registry, client, query, expected):
    results = names(client.get("/api/v1/search", {"q": query, "k": 3}))
    assert results[0] == expected, results


def test_search_filters_apply_and_results_say_what_matched(registry, client):
    response = client.get("/api/v1/search", {"q": "style for image generation", "base_model": "quiver-demo/tiny-clip-text"})
    results = response.json()["results"]
    assert {hit["adapter"]["base_model"] for hit in results} == {"quiver-demo/tiny-clip-text"}
    assert all("description" in hit["matched"] and hit["score"] > 0 for hit in results)
    assert names(client.get("/api/v1/search", {"q": "style", "format": "kohya"})) == ["watercolor-style-kohya"]
    assert client.get("/api/v1/search", {"q": ""}).status_code == 400
    assert client.get("/api/v1/search", {"q": "x", "k": 1000}).status_code == 400


def test_narrowing_a_search_reuses_its_query_vector(registry, client):
    """Same words, other filters: the encoder runs once, and the kept vector is the encoder's."""
    from django.conf import settings

    from generation import text_encoder
    from hub.services import embeddings

    embeddings._query_vector.cache_clear()
    query = "style for image generation"
    for filters in ({}, {"base_model": "quiver-demo/tiny-clip-text"}, {"format": "kohya"}):
        assert client.get("/api/v1/search", {"q": query, **filters}).status_code == 200
    info = embeddings._query_vector.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    fresh = text_encoder.embed_query(query, settings.QUIVER_QUERY_PRECISION).tolist()
    assert embeddings.embed_query(query) == fresh


def test_private_adapters_never_appear_in_others_search_or_similar(registry, make_user, client_for):
    from hub.models import Job

    alice = make_user("alice")
    owner = client_for(alice)
    entry = next(e for e in registry["adapters"] if e["name"] == "ticket-summarizer")
    owner.post("/api/v1/adapters/", upload_payload(entry, name="secret-ticket-digest", visibility="private",
                                                   description="Secret digest of support tickets for triage."),
               format="multipart")
    wait_for_all_jobs()
    query = {"q": "digest of support tickets for triage", "k": 20}

    assert "secret-ticket-digest" in names(owner.get("/api/v1/search", query))
    for outsider in (client_for(make_user("bob")), client_for(None)):
        assert "secret-ticket-digest" not in names(outsider.get("/api/v1/search", query))
        similar = outsider.get("/api/v1/adapters/quiver-demo/ticket-summarizer/similar", {"k": 20})
        assert "secret-ticket-digest" not in names(similar)
    assert "secret-ticket-digest" in names(owner.get("/api/v1/adapters/quiver-demo/ticket-summarizer/similar"))
    assert Job.objects.filter(state=Job.State.FAILED).count() == 0


def test_same_weights_uploaded_again_are_flagged_as_near_duplicate_and_most_similar(registry, make_user, client_for):
    api = client_for(make_user("alice"))
    entry = next(e for e in registry["adapters"] if e["name"] == "sql-from-questions")
    api.post("/api/v1/adapters/", upload_payload(entry, name="my-sql", description="Text to SQL."), format="multipart")
    wait_for_all_jobs()

    detail = api.get("/api/v1/adapters/alice/my-sql/").json()
    assert detail["near_duplicate_of"] == "quiver-demo/sql-from-questions"
    assert detail["near_duplicate_similarity"] > 0.999
    similar = api.get("/api/v1/adapters/alice/my-sql/similar").json()["results"]
    assert similar[0]["adapter"]["id"] == "quiver-demo/sql-from-questions"
    assert {hit["adapter"]["base_model"] for hit in similar} == {"quiver-demo/tiny-llama"}
    original = api.get("/api/v1/adapters/quiver-demo/sql-from-questions/").json()
    assert original["near_duplicate_of"] is None


def test_training_the_weight_encoder_improves_recall_and_reembeds_everything(registry, client):
    import torch

    from hub.models import Adapter, Job
    from hub.services.embeddings import training_set
    from hub.services.jobs import enqueue_job
    from generation.weight_encoder import recall_at_k

    def weights_recall() -> float:
        adapters = training_set()
        texts = torch.tensor([list(a.description_embedding) for a in adapters])
        weights = torch.tensor([list(a.weight_embedding) for a in adapters])
        return recall_at_k(texts, weights, 1)

    before = weights_recall()
    job = enqueue_job(kind=Job.Kind.TRAIN_WEIGHT_ENCODER, owner=None, params={"training": {"epochs": 60}})
    from django.db import transaction  # noqa: F401  (enqueue sends on commit; autocommit here)
    trained = wait_for_job(job.id, timeout=300)
    assert trained.state == Job.State.SUCCEEDED, trained.error
    wait_for_job(trained.result["reembed_job"], timeout=300)

    label = trained.result["encoder"]
    assert Adapter.objects.exclude(weight_encoder=label).count() == 0
    after = weights_recall()
    assert trained.result["final"]["recall_at_1"] > trained.result["initial"]["recall_at_1"]
    assert after > before and after >= 0.9
    # With a trained encoder, text queries also rank adapters by their weights.
    hits = client.get("/api/v1/search", {"q": "write SQL queries from questions", "k": 3}).json()["results"]
    assert hits[0]["adapter"]["name"] == "sql-from-questions" and "weights" in hits[0]["matched"]


def test_a_search_makes_the_same_few_sql_queries_whatever_k(registry, make_user, client_for, client):
    """Rankings in one statement, then the hits with everything their listing shows (files, near
    duplicates, provenance) in a fixed number of queries: never one more per hit."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from hub.models import Adapter

    entry = next(e for e in registry["adapters"] if e["name"] == "sql-from-questions")
    client_for(make_user("alice")).post("/api/v1/adapters/", upload_payload(entry, name="my-sql", description="Text to SQL."),
                                        format="multipart")
    wait_for_all_jobs()  # embedded and flagged as a near duplicate of quiver-demo/sql-from-questions
    Adapter.objects.filter(name="my-sql").update(
        provenance={"method": "linear", "parents": [{"adapter": "quiver-demo/sql-from-questions", "weight": 1.0}]})

    counts = {}
    for k in (2, 5, 20):
        with CaptureQueriesContext(connection) as queries:
            response = client.get("/api/v1/search", {"q": "write SQL queries from questions", "k": k})
        hits = response.json()["results"]
        assert response.status_code == 200 and len(hits) == min(k, Adapter.objects.count())
        counts[k] = len(queries)
    mine = next(hit["adapter"] for hit in hits if hit["adapter"]["name"] == "my-sql")
    assert mine["near_duplicate_of"] == "quiver-demo/sql-from-questions" and mine["files"]
    assert mine["provenance"]["parents"][0]["adapter"] == "quiver-demo/sql-from-questions"
    # the rankings, the hits' listings (latest files and visible near duplicates inside), visible provenance parents
    assert counts[2] == counts[5] == counts[20] <= 3, counts


def test_search_listings_are_the_list_serializers_json(registry, make_user, client_for):
    """The search's listings (one kept statement, hub.selectors.adapter_listings, written out by
    api.serializers.listing_data) are exactly the JSON AdapterListSerializer writes for the same
    adapters and viewer: files with their URLs, a near duplicate only when the viewer may see it,
    provenance without the adapters they may not see, adapters without a base model or revision."""
    from django.contrib.auth.models import AnonymousUser
    from django.test import RequestFactory

    from api.serializers import AdapterListSerializer, listing_data
    from hub.models import Adapter
    from hub.selectors import adapter_listings, adapters_for_listing, attach_readable_provenance, visible_adapters

    alice, bob, staff = make_user("alice"), make_user("bob"), make_user("root", is_staff=True)
    entry = next(e for e in registry["adapters"] if e["name"] == "sql-from-questions")
    client_for(alice).post("/api/v1/adapters/", upload_payload(entry, name="my-sql", visibility="private"),
                           format="multipart")
    wait_for_all_jobs()
    mine = Adapter.objects.get(name="my-sql")
    # A public adapter whose near duplicate and one parent are private to alice; one with no base model or files.
    Adapter.objects.filter(name="ticket-summarizer").update(
        near_duplicate_of=mine, near_duplicate_similarity=0.97,
        provenance={"method": "linear", "parents": [{"adapter": "alice/my-sql", "weight": 0.5},
                                                    {"adapter": "quiver-demo/sql-from-questions", "weight": -1.0}]})
    bare = Adapter.objects.exclude(name__in=["my-sql", "ticket-summarizer"]).first()
    Adapter.objects.filter(id=bare.id).update(base_model=None, latest_revision=None)
    ids = [*Adapter.objects.values_list("id", flat=True), 10 ** 9]  # and one that does not exist

    for user in (None, alice, bob, staff):
        request = RequestFactory().get("/api/v1/search", HTTP_HOST="localhost")
        request.user = user or AnonymousUser()
        adapters = list(adapters_for_listing(user, visible_adapters(user)).filter(id__in=ids))
        attach_readable_provenance(user, adapters)
        expected = {adapter.id: AdapterListSerializer(adapter, context={"request": request}).data
                    for adapter in adapters}
        listed = {adapter_id: listing_data(listing, request)
                  for adapter_id, listing in adapter_listings(user, ids).items()}
        assert listed == expected
        summarizer = next(listing for listing in listed.values() if listing["name"] == "ticket-summarizer")
        sees_mine = user in (alice, staff)
        assert (summarizer["near_duplicate_of"] == "alice/my-sql") == sees_mine
        assert len(summarizer["provenance"]["parents"]) == (2 if sees_mine else 1)
        assert (mine.id in listed) == sees_mine
        assert listed[bare.id]["base_model"] is None and listed[bare.id]["files"] == []
        assert all(file["url"].startswith("http://localhost/api/v1/adapters/") for file in summarizer["files"])
        assert summarizer["files"] and isinstance(summarizer["alpha"], float)


def test_search_statements_are_compiled_once_per_shape_and_equal_the_orms(registry, make_user, settings):
    """Kept rankings statements, their words and vector put in, are exactly the statements the ORM
    compiles for that search: for anonymous, signed-in and staff users, with and without filters.
    Users who see the same adapters share them; a user who sees their own private ones does not.
    Each runs at its ranking's HNSW breadth, and the session's is the one set afterwards, in a
    transaction or not."""
    from django.db import connection, transaction
    from pgvector import Vector

    from hub.search import RANKINGS, rankings_query, rankings_statement
    from hub.selectors import adapter_list
    from hub.services.embeddings import embed_query

    def session_ef_search() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('hnsw.ef_search')::int")
            return cursor.fetchone()[0]

    alice, bob, staff = make_user("alice"), make_user("bob"), make_user("root", is_staff=True)
    shapes = [(None, {}), (alice, {}), (staff, {}),
              (None, {"base_model": "quiver-demo/tiny-clip-text", "format": "kohya", "tag": "style", "license": "mit"})]
    for query in ("watercolor style for images", "summarise support tickets"):
        vector = embed_query(query)
        for (user, filters), modes in [*((shape, RANKINGS) for shape in shapes), ((None, {}), ("keywords",)),
                                       ((None, {}), ("description",)), ((None, {}), ("weights",))]:
            kept = rankings_statement(user, limit=40, modes=modes, **filters)
            expected_rows = []
            for statement in kept.statements:
                orm = rankings_query(adapter_list(user, **filters).order_by(), query, vector, 40, statement.modes)
                sql, params = orm.query.sql_with_params()
                filled = statement.params_with(query=query, vector=Vector(vector).to_text())
                assert (statement.sql, filled) == (sql, list(params))
                assert f"SET LOCAL hnsw.ef_search = {statement.ef_search}; {statement.sql}" in kept.sql
                expected_rows += [tuple(row) for row in orm]
            assert [statement.modes for statement in kept.statements] == (
                [("weights",), ("description", "keywords")] if modes == RANKINGS else [modes])
            assert kept.rows(query, vector) == expected_rows
            assert session_ef_search() == settings.QUIVER_HNSW_EF_SEARCH
            with transaction.atomic():  # SET LOCALs last until the transaction's end: the last one restores
                kept.rows(query, vector)
                assert session_ef_search() == settings.QUIVER_HNSW_EF_SEARCH
    assert [statement.ef_search for statement in rankings_statement(None, limit=40, modes=RANKINGS).statements] == [
        settings.QUIVER_HNSW_WEIGHTS_EF_SEARCH, settings.QUIVER_HNSW_EF_SEARCH]
    assert rankings_statement(None, limit=40, modes=RANKINGS) is rankings_statement(None, limit=40, modes=RANKINGS)
    assert rankings_statement(alice, limit=40, modes=RANKINGS) is not rankings_statement(bob, limit=40, modes=RANKINGS)
    assert rankings_statement(alice, limit=40, modes=RANKINGS).sql == rankings_statement(bob, limit=40, modes=RANKINGS).sql
