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
