"""Compose and merge through the API, run by a real worker, reported through the job."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tests.conftest import wait_for_job

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def registry(celery_worker_process, demo_files):
    from hub.services.catalog import seed_catalog

    seed_catalog(demo_files, log=lambda message: None)
    return demo_files


def test_methods_say_whether_they_are_exact(client, db):
    methods = {m["name"]: m for m in client.get("/api/v1/compose-methods/").json()}
    assert methods["linear"]["exact"] and methods["cat"]["exact"]
    assert not methods["svd"]["exact"]  # exact only when the rank covers Σ rᵢ: the job reports which
    assert not methods["peft_linear"]["exact"]
    assert {"ties", "dare_ties", "magnitude_prune_svd", "iso_c", "task_arithmetic"} <= set(methods)


def test_compose_two_adapters_into_a_new_adapter_with_provenance(registry, make_user, client_for):
    from hub.models import Adapter
    from hub.selectors import load_revision_adapter

    api = client_for(make_user("alice"))
    response = api.post("/api/v1/compositions/", {
        "adapters": [{"id": "quiver-demo/ticket-summarizer", "weight": 0.7},
                     {"id": "quiver-demo/sql-from-questions", "weight": -0.3}],
        "method": "svd", "params": {"rank": 16}, "name": "tickets-minus-sql"}, format="json")
    assert response.status_code == 202, response.json()
    job = wait_for_job(response.json()["id"])
    assert job.state == "succeeded", job.error
    polled = api.get(f"/api/v1/jobs/{job.id}/").json()
    assert polled["progress"] == 1.0 and polled["result"]["name"] == "tickets-minus-sql"

    detail = api.get("/api/v1/adapters/alice/tickets-minus-sql/").json()
    assert detail["format"] == "peft" and detail["base_model"] == "quiver-demo/tiny-llama"
    provenance = detail["provenance"]
    assert provenance["method"] == "svd" and provenance["exact"] is True
    assert [(p["adapter"], p["weight"]) for p in provenance["parents"]] == [
        ("quiver-demo/ticket-summarizer", 0.7), ("quiver-demo/sql-from-questions", -0.3)]
    # The stored adapter's ΔW is the weighted sum of its parents' (rank 16 ≥ 4 + 8: exact).
    composed = load_revision_adapter(Adapter.objects.get(name="tickets-minus-sql").latest_revision)
    parents = [load_revision_adapter(Adapter.objects.get(name=n).latest_revision)
               for n in ("ticket-summarizer", "sql-from-questions")]
    for module_path, module in composed.modules.items():
        expected = sum(w * p.modules[module_path].delta_weight() for w, p in zip((0.7, -0.3), parents)
                       if module_path in p.modules)
        torch.testing.assert_close(module.delta_weight(), expected, atol=1e-5, rtol=1e-4)


def test_composition_refuses_bad_requests(registry, make_user, client_for):
    api = client_for(make_user("alice"))
    cases = {
        "different_base_models": {"adapters": [{"id": "quiver-demo/ticket-summarizer"},
                                               {"id": "quiver-demo/product-search-minilm"}], "method": "linear"},
        "unknown_method": {"adapters": [{"id": "quiver-demo/ticket-summarizer"}], "method": "average-ish"},
        "adapter_not_found": {"adapters": [{"id": "quiver-demo/nope"}], "method": "linear"},
        "bad_param": {"adapters": [{"id": "quiver-demo/ticket-summarizer"}], "method": "svd", "params": {"rank": -1}},
    }
    for code, body in cases.items():
        response = api.post("/api/v1/compositions/", body, format="json")
        assert response.status_code == 400 and response.json()["error"]["code"] == code, (code, response.json())
    assert client_for(None).post("/api/v1/compositions/", cases["unknown_method"], format="json").status_code == 401


def test_merge_streams_a_checkpoint_that_transformers_loads_and_identical_requests_reuse_it(registry, make_user,
                                                                                          client_for, tmp_path):
    from transformers import AutoModelForCausalLM

    from hub.models import Job, MergedCheckpoint

    api = client_for(make_user("alice"))
    request = {"base_model": "quiver-demo/tiny-llama",
               "adapters": [{"id": "quiver-demo/ticket-summarizer", "weight": 1.0}]}
    response = api.post("/api/v1/merges/", request, format="json")
    assert response.status_code == 202, response.json()
    job = wait_for_job(response.json()["id"])
    assert job.state == Job.State.SUCCEEDED, job.error
    result = api.get(f"/api/v1/jobs/{job.id}/").json()["result"]
    names = {f["filename"] for f in result["files"]}
    assert {"config.json", "model.safetensors"} <= names
    for listed in result["files"]:
        download = api.get(listed["url"])
        content = b"".join(download.streaming_content)
        assert hashlib.sha256(content).hexdigest() == listed["sha256"] == download["ETag"].strip('"')
        (tmp_path / listed["filename"]).write_bytes(content)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)

    again = api.post("/api/v1/merges/", request, format="json")
    assert again.status_code == 200 and again.json()["state"] == "succeeded"
    assert again.json()["result"]["merge_id"] == result["merge_id"]
    assert MergedCheckpoint.objects.count() == 1
    # The merge is visible to whoever sees every input, and to nobody else once an input turns private.
    from hub.models import Adapter

    bob = client_for(make_user("bob"))
    merge_url = f"/api/v1/merges/{result['merge_id']}/"
    assert bob.get(merge_url).status_code == 200
    Adapter.objects.filter(name="ticket-summarizer").update(visibility="private")
    assert bob.get(merge_url).status_code == 404
    assert bob.get(result["files"][0]["url"]).status_code == 404
    assert api.get("/api/v1/merges/").json()["count"] == 0  # alice made it, and no longer sees it either


def merge_of(api, weight: float) -> dict:
    """A merge of the demo summarizer at `weight`, made by the real worker: its job's result."""
    from hub.models import Job

    request = {"base_model": "quiver-demo/tiny-llama",
               "adapters": [{"id": "quiver-demo/ticket-summarizer", "weight": weight}]}
    response = api.post("/api/v1/merges/", request, format="json")
    assert response.status_code in (200, 202), response.json()
    job = wait_for_job(response.json()["id"])
    assert job.state == Job.State.SUCCEEDED, job.error
    return job.result


def downloaded(response) -> bool:
    """Whether a download answered 200 (its stream read to the end, which closes the blob)."""
    content = b"".join(response.streaming_content) if response.status_code == 200 else b""
    return response.status_code == 200 and len(content) > 0


def used_ago(merge_id: str, **ago) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from hub.models import MergedCheckpoint

    MergedCheckpoint.objects.filter(key=merge_id).update(last_used_at=timezone.now() - timedelta(**ago))


def last_used(merge_id: str):
    from hub.models import MergedCheckpoint

    return MergedCheckpoint.objects.get(key=merge_id).last_used_at


def test_unused_merges_expire_with_their_bytes_and_are_made_again_on_request(registry, make_user, client_for, client):
    """Stored merges are listed with their size and expiry; a download or an identical request marks
    one used; the beat task, run by the real worker, removes those unused for the retention period;
    the orphan sweep then removes their bytes (not the base's), and the same request makes the same
    bytes again."""
    from datetime import timedelta

    from django.utils import timezone

    from hub.blobs import blob_storage
    from hub.models import BaseModelFile, Blob, Job, MergedCheckpoint
    from hub.services.cleanup import sweep_orphan_blobs
    from workers.tasks import expire_merged_checkpoints

    user = make_user("alice")
    alice = client_for(user)
    result = merge_of(alice, 1.0)
    merge_id, merge_url = result["merge_id"], result["url"]
    client.force_login(user)
    job_page = f"/jobs/{Job.objects.get(kind=Job.Kind.MERGE).id}/"
    assert "it is kept until" in client.get(job_page).content.decode()
    listed = alice.get("/api/v1/merges/").json()
    assert listed["count"] == 1 and client_for(make_user("bob")).get("/api/v1/merges/").json()["count"] == 0
    summary = listed["results"][0]
    assert summary["merge_id"] == merge_id and summary["url"] == merge_url
    assert summary["size"] == sum(f["size"] for f in result["files"]) > 0
    detail = alice.get(merge_url).json()
    assert detail["expires_at"] == summary["expires_at"] and detail["files"] == result["files"]
    assert MergedCheckpoint.objects.get(key=merge_id).size == summary["size"]

    # Marked used: a download (native, or through the Hub-compatible API) and an identical request.
    weights_file = next(f for f in result["files"] if f["filename"] == "model.safetensors")
    uses = {"download": lambda: downloaded(alice.get(weights_file["url"])),
            "Hub download": lambda: downloaded(alice.get(f"/{result['repo_id']}/resolve/main/model.safetensors")),
            "identical request": lambda: merge_of(alice, 1.0)["merge_id"] == merge_id}
    for name, use in uses.items():
        used_ago(merge_id, days=40)
        assert use(), name
        assert timezone.now() - last_used(merge_id) < timedelta(minutes=1), name

    merged_only = {f["sha256"] for f in result["files"]} - set(BaseModelFile.objects.values_list("blob_id", flat=True))
    assert "model.safetensors" in {f["filename"] for f in result["files"] if f["sha256"] in merged_only}
    used_ago(merge_id, days=29)
    assert expire_merged_checkpoints.delay().get(timeout=60) == {"expired": 0, "evicted": 0, "bytes": 0}
    used_ago(merge_id, days=31)
    assert expire_merged_checkpoints.delay().get(timeout=60) == {"expired": 1, "evicted": 0, "bytes": summary["size"]}
    gone = alice.get(merge_url)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "merge_not_found"
    assert "makes it again" in gone.json()["error"]["message"]
    assert alice.get(weights_file["url"]).status_code == 404
    page = client.get(job_page).content.decode()
    assert 'id="merge-removed"' in page and weights_file["url"] not in page

    Blob.objects.filter(sha256__in=merged_only).update(claimed_at=timezone.now() - timedelta(days=31))
    assert sweep_orphan_blobs() == len(merged_only)
    storage = blob_storage()
    assert not any(storage.exists(Blob(sha256=sha, size=0).storage_key) for sha in merged_only)
    assert alice.get("/api/v1/base-models/quiver-demo/tiny-llama/files/model.safetensors").status_code == 200

    again = alice.post("/api/v1/merges/", {"base_model": "quiver-demo/tiny-llama", "adapters": [
        {"id": "quiver-demo/ticket-summarizer", "weight": 1.0}]}, format="json")
    assert again.status_code == 202  # made again, not reused
    remade = merge_of(alice, 1.0)
    assert remade["merge_id"] == merge_id and remade["files"] == result["files"]  # the same bytes


def test_past_the_storage_cap_the_least_recently_used_merges_go_and_only_their_maker_may_delete(
        registry, make_user, client_for, settings):
    from hub.models import MergedCheckpoint
    from hub.services.cleanup import expire_merged_checkpoints

    alice, bob = make_user("alice"), make_user("bob")
    made = {weight: merge_of(client_for(alice), weight)["merge_id"] for weight in (1.0, 0.5, 0.25)}
    sizes = dict(MergedCheckpoint.objects.values_list("key", "size"))
    for hours, weight in ((3, 1.0), (5, 0.5), (4, 0.25)):
        used_ago(made[weight], hours=hours)

    # One byte over the cap: the least recently used (0.5) goes, the others stay.
    cap = sum(sizes.values()) - 1
    removed = expire_merged_checkpoints(storage_bytes=cap)
    assert removed == {"expired": 0, "evicted": 1, "bytes": sizes[made[0.5]]}
    assert set(MergedCheckpoint.objects.values_list("key", flat=True)) == {made[1.0], made[0.25]}
    # A merge used within the hour is never evicted, even with a cap it alone exceeds.
    used_ago(made[1.0], minutes=5)
    assert expire_merged_checkpoints(storage_bytes=1)["evicted"] == 1
    assert set(MergedCheckpoint.objects.values_list("key", flat=True)) == {made[1.0]}
    used_ago(made[1.0], days=400)
    settings.QUIVER_MERGE_RETENTION_DAYS = 0  # kept however long unused: the listing says so
    assert client_for(alice).get("/api/v1/merges/").json()["results"][0]["expires_at"] is None
    assert expire_merged_checkpoints() == {"expired": 0, "evicted": 0, "bytes": 0}

    url = f"/api/v1/merges/{made[1.0]}/"
    assert client_for(None).delete(url).status_code == 401
    refused = client_for(bob).delete(url)  # bob may see it, and make it, but not remove it for alice
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_creator"
    assert client_for(alice).delete(url).status_code == 204
    assert client_for(alice).get(url).status_code == 404
    assert client_for(alice).delete(url).status_code == 404
    # Staff may remove anyone's.
    other = merge_of(client_for(bob), 2.0)["merge_id"]
    assert client_for(make_user("ops", is_staff=True)).delete(f"/api/v1/merges/{other}/").status_code == 204
    assert not MergedCheckpoint.objects.exists()


def test_the_merge_page_lists_your_stored_merges_and_removes_them(registry, make_user, client_for, client):
    from django.utils import timezone

    from hub.models import MergedCheckpoint

    alice, bob = make_user("alice"), make_user("bob")
    result = merge_of(client_for(alice), 1.0)
    short = f"merges/{result['merge_id'][:12]}"
    client.force_login(alice)
    page = client.get("/merge/").content.decode()
    assert short in page and "quiver-demo/ticket-summarizer@1 × 1.0" in page
    assert all(f'href="{f["url"]}"' in page for f in result["files"])
    kept_until = MergedCheckpoint.objects.get(key=result["merge_id"]).last_used_at + timezone.timedelta(days=30)
    assert kept_until.strftime("%Y-%m-%d") in page

    staff = client_for(make_user("ops", is_staff=True)).get("/api/v1/merges/?limit=1").json()
    assert staff["count"] == 1 and staff["results"][0]["merge_id"] == result["merge_id"]  # staff see every merge
    client.force_login(bob)  # bob may make the same merge, but it is not his to remove
    assert "You have no stored merges." in client.get("/merge/").content.decode()
    refused = client.post(f"/merges/{result['merge_id']}/delete/", follow=True).content.decode()
    assert "Only whoever made this merge, or staff, can delete it." in refused
    assert MergedCheckpoint.objects.filter(key=result["merge_id"]).exists()

    client.force_login(alice)
    removed = client.post(f"/merges/{result['merge_id']}/delete/", follow=True)
    assert removed.redirect_chain == [("/merge/#stored-merges", 302)]
    page = removed.content.decode()
    assert "was removed; merging the same adapters again makes it again" in page and short not in page
    assert not MergedCheckpoint.objects.exists()
    assert client.post(f"/merges/{result['merge_id']}/delete/").status_code == 404


def test_a_user_may_have_only_so_many_jobs_queued_or_running(registry, make_user, client_for, settings):
    """Past QUIVER_MAX_ACTIVE_JOBS_PER_USER of their own queued or running jobs, a user's request
    is refused with 429 and queues nothing; the hub's own jobs (an upload's embedding) do not count,
    a reused merge queues nothing and is answered, a finished or cancelled job frees its slot, and
    staff have no limit."""
    from hub.models import Job

    settings.QUIVER_MAX_ACTIVE_JOBS_PER_USER = 2
    alice, ops = make_user("alice"), make_user("ops", is_staff=True)
    merge_of(client_for(alice), 1.0)  # stored: an identical request is answered at once
    compose = {"adapters": [{"id": "quiver-demo/ticket-summarizer", "weight": 0.5}], "method": "linear"}
    held = []  # two of their own queued (no task sent: they stay queued), and one of the hub's
    for user in (alice, ops):
        held += Job.objects.bulk_create([Job(kind=Job.Kind.MERGE, owner=user), Job(kind=Job.Kind.GENERATE, owner=user),
                                         Job(kind=Job.Kind.EMBED, owner=user)])
    jobs_before = Job.objects.count()

    refused = client_for(alice).post("/api/v1/compositions/", compose, format="json")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
    assert "2 jobs queued or running" in refused.json()["error"]["message"]
    assert Job.objects.count() == jobs_before
    reused = client_for(alice).post("/api/v1/merges/", {"base_model": "quiver-demo/tiny-llama", "adapters": [
        {"id": "quiver-demo/ticket-summarizer", "weight": 1.0}]}, format="json")
    assert reused.status_code == 200

    staff = client_for(ops).post("/api/v1/compositions/", compose, format="json")
    assert staff.status_code == 202
    assert wait_for_job(staff.json()["id"]).state == Job.State.SUCCEEDED

    Job.objects.filter(id=held[0].id).update(state=Job.State.CANCELLED)  # alice's held merge
    accepted = client_for(alice).post("/api/v1/compositions/", {**compose, "name": "mine"}, format="json")
    assert accepted.status_code == 202, accepted.json()
    assert wait_for_job(accepted.json()["id"]).state == Job.State.SUCCEEDED
    Job.objects.filter(id__in=[job.id for job in held]).update(state=Job.State.CANCELLED)  # nothing left waiting
