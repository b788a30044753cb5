"""Generation requests end to end: the small zoo registered in the hub, generators
trained by a real worker, an adapter generated from a description, downloaded and
loaded with PEFT, better than the base model on a task no expert was trained on."""
from __future__ import annotations

import pytest

from tests.conftest import wait_for_job

# The first test to use the small zoo builds it (13 PEFT trainings, a few minutes on 2 cores).
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(1500)]

BASE = "zoo/minilm-task-classifier"


@pytest.fixture
def trained(zoo_registry, client_for):
    """Both generators trained through the API by the base model's owner."""
    # Parameter space without conjunctions (they are on by default; their test is below): seconds.
    response = client_for(zoo_registry).post("/api/v1/generators/", {"base_model": BASE, "steps": 300,
                                                                      "conjunctions": False}, format="json")
    assert response.status_code == 202, response.json()
    for job in response.json():
        finished = wait_for_job(job["id"], timeout=600)
        assert finished.state == "succeeded", finished.error
    return zoo_registry


def _held_out(small_zoo, split: str):
    from generation.zoo.build import load_manifest, task_from_entry

    return next(task_from_entry(e) for e in load_manifest(small_zoo)["tasks"] if e["task"]["split"] == split)


@pytest.mark.parametrize("method", ["sg-lora", "icm-lora"])
def test_generated_adapter_loads_with_peft_and_beats_the_base(trained, small_zoo, make_user, client_for, tmp_path,
                                                              method):
    from peft import PeftModel

    from generation import generators
    from generation.zoo import data, model as zoo_model

    listed = client_for().get("/api/v1/generators/", {"base_model": BASE}).json()
    assert {g["method"] for g in listed} == {"sg-lora", "icm-lora"}
    assert all(len(g["experts"]) == 14 and g["curve"][0]["step"] == 0 for g in listed)
    assert all(g["settings"]["space"] == "parameter" for g in listed)  # the default
    # A job that does not run the base (parameter space, no conjunctions) keeps the paper's τ.
    assert all(g["settings"]["temperature"] == generators.PAPER_TEMPERATURE
               and g["settings"]["temperature_selection"] is None for g in listed)

    task = _held_out(small_zoo, "unseen_pair")
    api = client_for(make_user("alice"))
    response = api.post("/api/v1/generations/", {"description": task.description, "base_model": BASE,
                                                 "method": method}, format="json")
    assert response.status_code == 202, response.json()
    job = api.get(f"/api/v1/jobs/{response.json()['id']}/").json()
    assert job["kind"] == "generate"
    finished = wait_for_job(job["id"], timeout=300)
    assert finished.state == "succeeded", finished.error
    name = f"{finished.result['namespace']}/{finished.result['name']}"

    detail = api.get(f"/api/v1/adapters/{name}/").json()
    provenance = detail["provenance"]
    assert provenance["kind"] == "generation" and provenance["method"] == method
    assert provenance["generator"] == f"{method}@v1" and provenance["description"] == task.description
    assert provenance["experts"] and all(e["adapter"].startswith("zoo/") for e in provenance["experts"])
    assert abs(sum(e["weight"] for e in provenance["experts"]) - 1) < 1e-4
    assert "generated" in detail["tags"]

    folder = tmp_path / "adapter"
    folder.mkdir()
    for filename in ("adapter_config.json", "adapter_model.safetensors"):
        download = api.get(f"/api/v1/adapters/{name}/files/{filename}")
        assert download.status_code == 200
        (folder / filename).write_bytes(b"".join(download.streaming_content))
    base = zoo_model.load_classifier(small_zoo / "base")
    texts, labels = data.sample(task, 384, seed=0, split="test")
    base_accuracy = zoo_model.accuracy(base, texts, labels)
    generated = PeftModel.from_pretrained(base, folder)
    accuracy = zoo_model.accuracy(generated, texts, labels)
    assert accuracy > base_accuracy + 0.05, (accuracy, base_accuracy)

    # A generated adapter composes like any other.
    composed = api.post("/api/v1/compositions/", {"adapters": [{"id": name, "weight": 0.5},
                                                                {"id": "zoo/person-name-in-german", "weight": 0.5}],
                                                   "method": "linear"}, format="json")
    assert composed.status_code == 202, composed.json()
    assert wait_for_job(composed.json()["id"], timeout=300).state == "succeeded"


def test_bad_generation_requests_are_refused_and_leave_nothing(zoo_registry, demo_bases, make_user, client_for):
    from hub.models import Adapter, Job

    jobs_before, adapters_before = Job.objects.count(), Adapter.objects.count()
    api = client_for(make_user("alice"))
    ok = {"description": "Is this text a job title written in Polish?", "base_model": BASE, "method": "sg-lora"}

    def refused(status: int, code: str, **change):
        response = api.post("/api/v1/generations/", {**ok, **change}, format="json")
        assert response.status_code == status, response.json()
        assert response.json()["error"]["code"] == code
        return response.json()["error"]

    assert "generator" in refused(409, "no_generator")["message"]  # no generator trained yet
    refused(404, "base_model_not_found", base_model="nobody/nothing")
    refused(409, "no_generator", base_model="quiver-demo/tiny-llama")
    refused(400, "empty_description", description="   ")
    assert refused(400, "description_too_long", description="x" * 5000)["field"] == "description"
    refused(400, "invalid", method="lora-magic")
    refused(400, "bad_k", k=0)
    assert client_for().post("/api/v1/generations/", ok, format="json").status_code == 401
    # Training costs a worker minutes: only the base model's owner (or staff) may ask.
    response = api.post("/api/v1/generators/", {"base_model": BASE}, format="json")
    assert response.status_code == 403 and response.json()["error"]["code"] == "not_base_owner"
    staff = client_for(make_user("operator", is_staff=True))
    response = staff.post("/api/v1/generators/", {"base_model": BASE, "space": "sideways"}, format="json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid"
    # Function space needs a base the hub can run, with probe texts: the demo Llama is neither.
    response = staff.post("/api/v1/generators/", {"base_model": "quiver-demo/tiny-llama", "space": "function"},
                          format="json")
    assert response.status_code == 409, response.json()
    assert response.json()["error"]["code"] == "function_space_unavailable"
    assert (Job.objects.count(), Adapter.objects.count()) == (jobs_before, adapters_before)


def test_function_space_training_runs_the_stored_base_on_its_probe_texts(zoo_registry):
    """`train_generators --space function`: the service loads the stored zoo base and its
    probe_texts.json from blob storage, trains by the experts' outputs and records the space.
    The experts' outputs are kept: training again runs no expert and learns exactly the same."""
    from django.core.management import call_command

    from generation import generators
    from hub.blobs import blob_storage
    from hub.models import GeneratorArtifact
    from hub.services.generations import TEACHERS_PREFIX

    storage = blob_storage()  # kept between test runs, as in production: start with none cached
    if storage.exists(TEACHERS_PREFIX):
        for name in storage.listdir(TEACHERS_PREFIX)[1]:
            storage.delete(TEACHERS_PREFIX + name)

    def train() -> tuple[GeneratorArtifact, dict]:
        call_command("train_generators", BASE, "--method", "sg-lora", "--space", "function", "--steps", "20",
                     "--no-conjunctions")
        artifact = GeneratorArtifact.objects.filter(base_model__namespace="zoo", method="sg-lora").latest("version")
        return artifact, artifact.job.result

    artifact, result = train()
    assert artifact.settings["space"] == "function" and artifact.settings["steps"] == 20
    assert [point["step"] for point in artifact.curve] == [0, 20]
    assert len(artifact.experts) == 14 and result["teachers"] == {"computed": 14, "reused": 0}
    # The prior's temperature was chosen by function (generators.select_temperature) and recorded.
    selection = artifact.settings["temperature_selection"]
    assert [row["temperature"] for row in selection] == list(generators.TEMPERATURE_CANDIDATES)
    assert artifact.settings["temperature"] == max(selection, key=lambda row: row["agreement"])["temperature"]
    again, result = train()
    assert again.version == artifact.version + 1 and result["teachers"] == {"computed": 0, "reused": 14}
    assert again.curve == artifact.curve  # the reused outputs are the computed ones, to the bit
    assert again.settings["temperature_selection"] == selection


def test_training_with_conjunctions_derives_experts_and_generation_names_their_parents(zoo_registry, make_user,
                                                                                      client_for):
    """Conjunctions, on by default on a base the hub can run: the training job distills the
    conjunctions of experts that no expert covers (kept in blob storage: the second training reuses
    them), the artifact records their parents and the prior's temperature chosen by function over a
    bank that holds them, and a generation drawing on one names both parents."""
    from hub.blobs import blob_storage
    from hub.models import GeneratorArtifact
    from hub.services.generations import CONJUNCTIONS_PREFIX, expert_texts

    storage = blob_storage()
    if storage.exists(CONJUNCTIONS_PREFIX):
        for name in storage.listdir(CONJUNCTIONS_PREFIX)[1]:
            storage.delete(CONJUNCTIONS_PREFIX + name)
    owner = client_for(zoo_registry)

    def train() -> GeneratorArtifact:
        # conjunctions: on by default on a base the hub can run
        response = owner.post("/api/v1/generators/", {"base_model": BASE, "methods": ["sg-lora"], "steps": 50,
                                                      "conjunction_steps": 10}, format="json")
        assert response.status_code == 202, response.json()
        finished = wait_for_job(response.json()[0]["id"], timeout=900)
        assert finished.state == "succeeded", finished.error
        return GeneratorArtifact.objects.filter(base_model__namespace="zoo", method="sg-lora").latest("version")

    artifact = train()
    found = artifact.settings["conjunctions"]
    selection = artifact.settings["temperature_selection"]
    assert artifact.settings["temperature"] == max(selection, key=lambda row: row["agreement"])["temperature"]
    assert found and artifact.job.result["conjunctions"] == len(found) and len(artifact.experts) == 14
    assert all(0 <= a < b < len(artifact.experts) for a, b in (c["parents"] for c in found))
    cached = storage.listdir(CONJUNCTIONS_PREFIX)[1]
    assert len(cached) == 1
    again = train()
    assert again.settings["conjunctions"] == found and storage.listdir(CONJUNCTIONS_PREFIX)[1] == cached

    # A description that is the two parents' descriptions side by side finds their conjunction first.
    first, second = (artifact.experts[i]["adapter"] for i in found[0]["parents"])
    descriptions = [owner.get(f"/api/v1/adapters/{name}/").json()["description"] for name in (first, second)]
    description = " ".join(expert_texts(d)[0] for d in descriptions)
    api = client_for(make_user("carol"))
    response = api.post("/api/v1/generations/", {"description": description, "base_model": BASE,
                                                 "method": "sg-lora", "k": 3}, format="json")
    assert response.status_code == 202, response.json()
    finished = wait_for_job(response.json()["id"], timeout=300)
    assert finished.state == "succeeded", finished.error
    experts = finished.result["experts"]
    derived = [e for e in experts if "conjunction_with" in e]
    assert derived and derived[0]["adapter"] == first and derived[0]["conjunction_with"]["adapter"] == second
    assert experts[0] == max(experts, key=lambda e: e["weight"]) and "conjunction_with" in experts[0]
