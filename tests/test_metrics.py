"""/metrics: the hub's queues, jobs and stored merges in Prometheus' text format, read from the real
broker and database at each scrape, and served only to whoever may scrape."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.django_db(transaction=True)


def scrape(client, **headers) -> dict:
    """{(metric name, frozen labels): value} of one scrape."""
    response = client.get("/metrics", **headers)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.content.decode()) for sample in family.samples}


def test_metrics_count_the_queued_tasks_the_jobs_and_the_stored_merges(celery_worker_process, demo_bases, make_user,
                                                                       client):
    """The worker stops consuming `gpu` (a real control command), two merges are queued: the scrape
    sees them in the broker's queue and as queued jobs with their age; jobs that ended in the last
    hour count by state, older ones not; stored merges count with their bytes."""
    from django.utils import timezone

    from hub.models import Job, MergedCheckpoint
    from hub.services.jobs import cancel_job, enqueue_job
    from workers import app

    alice = make_user("alice")
    now = timezone.now()
    Job.objects.create(kind=Job.Kind.COMPOSE, owner=alice, state=Job.State.SUCCEEDED, finished_at=now)
    Job.objects.create(kind=Job.Kind.GENERATE, owner=alice, state=Job.State.FAILED, finished_at=now)
    Job.objects.create(kind=Job.Kind.COMPOSE, owner=alice, state=Job.State.FAILED, finished_at=now - timedelta(hours=2))
    base = demo_bases["quiver-demo/tiny-llama"]
    for key, size in (("a" * 64, 1000), ("b" * 64, 2345)):
        MergedCheckpoint.objects.create(key=key, base_model=base, recipe={"adapters": []}, size=size)

    assert app.control.cancel_consumer("gpu", reply=True, timeout=10, limit=1)
    queued = []
    try:
        queued = [enqueue_job(kind=Job.Kind.MERGE, owner=alice, params={}) for _ in range(2)]
        time.sleep(1.5)  # the oldest queued job's age
        metrics = scrape(client)
    finally:
        for job in queued:  # delivered once the worker consumes `gpu` again, they do nothing
            cancel_job(user=alice, job_id=job.id)
        assert app.control.add_consumer("gpu", reply=True, timeout=10, limit=1)

    assert metrics[("quiver_queue_length", frozenset({("queue", "gpu")}))] == 2
    assert metrics[("quiver_queue_length", frozenset({("queue", "embed")}))] == 0
    assert metrics[("quiver_jobs_unfinished", frozenset({("kind", "merge"), ("state", "queued")}))] == 2
    assert 1.5 <= metrics[("quiver_job_oldest_queued_seconds", frozenset({("kind", "merge")}))] < 60
    assert metrics[("quiver_job_oldest_queued_seconds", frozenset({("kind", "compose")}))] == 0
    finished = {dict(labels)["kind"] + "/" + dict(labels)["state"]: value for (name, labels), value in metrics.items()
                if name == "quiver_jobs_finished_last_hour"}
    assert finished == {"compose/succeeded": 1, "generate/failed": 1}
    assert metrics[("quiver_merged_checkpoints", frozenset())] == 2
    assert metrics[("quiver_merged_checkpoint_bytes", frozenset())] == 3345

    deadline = time.monotonic() + 60  # the worker takes the two tasks again and leaves the jobs cancelled
    while scrape(client)[("quiver_queue_length", frozenset({("queue", "gpu")}))] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scrape(client)[("quiver_queue_length", frozenset({("queue", "gpu")}))] == 0


def test_an_openmetrics_scraper_gets_openmetrics(client):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    response = client.get("/metrics", HTTP_ACCEPT="application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert response["Content-Type"].startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(response.content.decode())}
    assert {"quiver_queue_length", "quiver_jobs_unfinished", "quiver_merged_checkpoint_bytes"} <= names


def test_metrics_need_the_token_where_one_is_set_and_are_off_without_one_in_production(client, settings):
    settings.QUIVER_METRICS_TOKEN = "scrape-secret"
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer wrong"}, {"HTTP_AUTHORIZATION": "scrape-secret-and-more"}):
        refused = client.get("/metrics", **headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "metrics_token_required"
    assert "quiver_queue_length" in str(scrape(client, HTTP_AUTHORIZATION="Bearer scrape-secret"))
    settings.QUIVER_METRICS_TOKEN, settings.QUIVER_METRICS_OPEN = None, False  # real servers, no token
    off = client.get("/metrics")
    assert off.status_code == 404 and off.json()["error"]["code"] == "metrics_disabled"
    assert client.post("/metrics").status_code == 405


def test_the_scrapes_job_queries_read_indexes_not_every_job(make_user):
    """Every upload adds jobs: the backlog is read through the partial index of unfinished jobs and
    the last hour's ends through the index on finished_at (sequential scans priced out, as the
    planner does for a table of millions)."""
    from django.utils import timezone

    from hub import selectors
    from tests.test_web_pages import plan_nodes

    for queryset, index in ((selectors.job_backlog(), "job_unfinished"),
                            (selectors.jobs_finished_since(timezone.now()), "job_finished_at")):
        kinds = [node["Node Type"] for node in plan_nodes(queryset, "enable_seqscan")]
        indexes = [node["Index Name"] for node in plan_nodes(queryset, "enable_seqscan") if "Index Name" in node]
        assert "Seq Scan" not in kinds and indexes == [index], (kinds, indexes)
