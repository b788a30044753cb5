"""Background work in a real Celery worker process, reported through the Job row."""
from __future__ import annotations

import pytest

from tests.conftest import upload_payload, wait_for_job

pytestmark = pytest.mark.django_db(transaction=True)


def test_upload_is_analysed_by_a_real_worker_and_job_is_visible_to_its_owner(
        celery_worker_process, demo_bases, demo_adapter, make_user, client_for):
    from hub.models import Job, Revision

    alice = make_user("alice")
    api = client_for(alice)
    response = api.post("/api/v1/adapters/", upload_payload(demo_adapter("sql-from-questions")), format="multipart")
    assert response.status_code == 201
    revision = Revision.objects.get(adapter__name="sql-from-questions")
    job = Job.objects.get(kind=Job.Kind.ANALYZE, params__revision_id=revision.id)

    finished = wait_for_job(job.id)

    assert finished.state == Job.State.SUCCEEDED, finished.error
    api_job = api.get(f"/api/v1/jobs/{job.id}/").json()
    assert api_job["state"] == "succeeded" and api_job["progress"] == 1.0
    assert api_job["result"]["modules"] == len(revision.metadata["module_shapes"])
    revision.refresh_from_db()
    spectra = revision.analysis["modules"]
    assert set(spectra) == set(revision.metadata["module_shapes"])
    for module in spectra.values():
        values = module["singular_values"]
        assert len(values) == module["rank"] == 8 and values == sorted(values, reverse=True) and values[0] > 0
    # The adapter page's pictures are rendered once, by the same job.
    plots = {plot.kind: plot.svg for plot in revision.plots.all()}
    assert set(plots) == {"spectrum", "layer-norms"} and all("<svg" in svg for svg in plots.values())
    assert "q_proj" in plots["spectrum"]  # the legend names the module kinds
    # Jobs are private to their owner.
    assert client_for(make_user("bob")).get(f"/api/v1/jobs/{job.id}/").status_code == 404
    assert client_for(None).get(f"/api/v1/jobs/{job.id}/").status_code == 401


def test_a_finished_job_is_not_run_twice(celery_worker_process, demo_bases, demo_adapter, make_user, client_for):
    from hub.models import Job
    from hub.services.jobs import run_job

    api = client_for(make_user("alice"))
    api.post("/api/v1/adapters/", upload_payload(demo_adapter("ticket-summarizer")), format="multipart")
    job = wait_for_job(Job.objects.get(kind=Job.Kind.ANALYZE).id)
    calls = []

    rerun = run_job(str(job.id), lambda job, reporter: calls.append(job) or {})

    assert calls == [] and rerun.state == Job.State.SUCCEEDED and rerun.attempts == 1


def test_revisions_without_plots_are_analysed_again_on_request(celery_worker_process, demo_bases, demo_adapter,
                                                              make_user, client_for):
    import io

    from django.core.management import call_command

    from hub.models import Job, RevisionPlot

    api = client_for(make_user("alice"))
    api.post("/api/v1/adapters/", upload_payload(demo_adapter("ticket-summarizer")), format="multipart")
    wait_for_job(Job.objects.get(kind=Job.Kind.ANALYZE).id)
    RevisionPlot.objects.all().delete()  # as for a revision analysed before plots existed
    out = io.StringIO()

    call_command("analyze_revisions", stdout=out)

    assert "queued 1 analysis job" in out.getvalue()
    rerun = Job.objects.filter(kind=Job.Kind.ANALYZE).order_by("-created_at").first()
    assert wait_for_job(rerun.id).state == Job.State.SUCCEEDED
    assert set(RevisionPlot.objects.values_list("kind", flat=True)) == {"spectrum", "layer-norms"}


def test_cancelling_a_job_stops_it_before_it_starts_or_at_its_next_progress_report(make_user, client_for):
    """Through the API, with the job's own run_job: a queued job, once cancelled, never runs (its
    task, delivered later, does nothing); a running one stops at its next report, and its end
    (success, or a failure) never overwrites the cancellation. Only its owner (or staff) may
    cancel it, and only before it has ended."""
    from hub.models import Job
    from hub.services.jobs import run_job

    alice, bob = make_user("alice"), make_user("bob")
    api = client_for(alice)
    queued = Job.objects.create(kind=Job.Kind.MERGE, owner=alice)
    assert client_for(bob).post(f"/api/v1/jobs/{queued.id}/cancel/").status_code == 404
    assert client_for(None).post(f"/api/v1/jobs/{queued.id}/cancel/").status_code == 401
    response = api.post(f"/api/v1/jobs/{queued.id}/cancel/")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    calls = []
    delivered = run_job(str(queued.id), lambda job, reporter: calls.append(job) or {})
    assert calls == [] and delivered.state == Job.State.CANCELLED and delivered.attempts == 0

    running = Job.objects.create(kind=Job.Kind.COMPOSE, owner=alice)
    steps = []

    def work(job, reporter):
        reporter.progress(0.1, "started")
        steps.append("reported")
        assert api.post(f"/api/v1/jobs/{job.id}/cancel/").status_code == 200  # from outside, mid-work
        reporter.progress(1.0, "the last report")  # stops here
        steps.append("went on")
        return {"stored": "nothing"}

    stopped = run_job(str(running.id), work)
    assert steps == ["reported"]
    assert stopped.state == Job.State.CANCELLED and stopped.result is None and stopped.error == ""
    assert stopped.progress == 0.1 and stopped.message == "cancelled"
    finished = api.post(f"/api/v1/jobs/{running.id}/cancel/")
    assert finished.status_code == 409 and "already ended (cancelled)" in finished.json()["error"]["message"]

    def fails_after_the_cancel(job, reporter):
        api.post(f"/api/v1/jobs/{job.id}/cancel/")
        raise RuntimeError("an error after the cancellation")

    failing = Job.objects.create(kind=Job.Kind.COMPOSE, owner=alice)
    assert run_job(str(failing.id), fails_after_the_cancel).state == Job.State.CANCELLED


def test_the_jobs_list_shows_only_your_jobs_newest_first_and_refuses_unknown_filters(make_user, client_for):
    from hub.models import Job

    alice, bob = make_user("alice"), make_user("bob")
    merge = Job.objects.create(kind=Job.Kind.MERGE, owner=alice, state=Job.State.SUCCEEDED, progress=1.0)
    compose = Job.objects.create(kind=Job.Kind.COMPOSE, owner=alice)
    Job.objects.create(kind=Job.Kind.MERGE, owner=bob)
    api = client_for(alice)

    listed = api.get("/api/v1/jobs/").json()
    assert listed["count"] == 2 and [job["id"] for job in listed["results"]] == [str(compose.id), str(merge.id)]
    assert [job["id"] for job in api.get("/api/v1/jobs/?state=succeeded").json()["results"]] == [str(merge.id)]
    assert [job["id"] for job in api.get("/api/v1/jobs/?kind=compose").json()["results"]] == [str(compose.id)]
    assert api.get("/api/v1/jobs/?limit=1").json()["results"][0]["id"] == str(compose.id)
    for bad in ("state=done", "kind=teleport"):
        refused = api.get(f"/api/v1/jobs/?{bad}")
        assert refused.status_code == 400 and bad.split("=")[0] in refused.json()["error"]["fields"], refused.json()
    assert client_for(None).get("/api/v1/jobs/").status_code == 401
    assert client_for(make_user("ops", is_staff=True)).get("/api/v1/jobs/").json()["count"] == 0  # theirs only
