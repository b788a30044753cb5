"""A private adapter never leaks to anyone but its owner: not through ids, error messages, counts,
search, similar, by-hash, update checks, jobs, compositions, merges or the Hub-compatible API, nor
through the adapters composed from it or flagged as its near-duplicates."""
from __future__ import annotations

import hashlib

import pytest

from tests.conftest import upload_payload, wait_for_all_jobs, wait_for_job

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def scene(celery_worker_process, demo_bases, demo_adapter, make_user, client_for):
    """alice: a private adapter (secret), a public one (open), a public composition of both and a merge
    of both; bob: a public byte-for-byte copy of alice's secret (flagged as its near-duplicate)."""
    alice, bob = make_user("alice"), make_user("bob")
    owner, other = client_for(alice), client_for(bob)
    secret_entry = demo_adapter("ticket-summarizer")
    assert owner.post("/api/v1/adapters/", upload_payload(secret_entry, name="secret", visibility="private",
                                                          description="Private: summarises support tickets."),
                      format="multipart").status_code == 201
    assert owner.post("/api/v1/adapters/", upload_payload(demo_adapter("sql-from-questions"), name="open"),
                      format="multipart").status_code == 201
    wait_for_all_jobs()
    assert other.post("/api/v1/adapters/", upload_payload(secret_entry, namespace="bob", name="copy"),
                      format="multipart").status_code == 201
    both = [{"id": "alice/secret", "weight": 0.5}, {"id": "alice/open", "weight": 0.5}]
    composed = owner.post("/api/v1/compositions/", {"adapters": both, "method": "linear", "name": "mix"},
                          format="json").json()
    merged = owner.post("/api/v1/merges/", {"base_model": "quiver-demo/tiny-llama", "adapters": both},
                        format="json").json()
    finished = {name: wait_for_job(job["id"]) for name, job in (("composed", composed), ("merged", merged))}
    assert {job.state for job in finished.values()} == {"succeeded"}, [job.error for job in finished.values()]
    wait_for_all_jobs()
    sha = hashlib.sha256(open(secret_entry["files"][1], "rb").read()).hexdigest()
    return {"owner": owner, "bob": other, "anonymous": client_for(None), "merge_id": finished["merged"].result["merge_id"],
            "job": composed["id"], "secret_sha": sha}


def _names(response) -> set[str]:
    body = response.json()
    rows = body["results"] if isinstance(body, dict) else body
    return {(row.get("adapter") or row)["id"] for row in rows}


def test_the_owner_sees_everything(scene):
    owner = scene["owner"]
    assert {"alice/secret", "alice/open", "alice/mix"} <= _names(owner.get("/api/v1/adapters/"))
    parents = owner.get("/api/v1/adapters/alice/mix/").json()["provenance"]["parents"]
    assert [p["adapter"] for p in parents] == ["alice/secret", "alice/open"]
    assert owner.get("/api/v1/adapters/bob/copy/").json()["near_duplicate_of"] == "alice/secret"
    assert owner.get(f"/api/v1/merges/{scene['merge_id']}/").status_code == 200
    assert "alice/secret" in _names(owner.get("/api/v1/search?q=support tickets"))


@pytest.mark.parametrize("who", ["bob", "anonymous"])
def test_outsiders_never_learn_of_the_private_adapter(scene, who):
    api = scene[who]
    secret, missing = "/api/v1/adapters/alice/secret/", "/api/v1/adapters/alice/nothing-here/"

    # Ids and error messages: the private adapter reads exactly like a missing one, everywhere.
    for suffix in ("", "revisions/", "manifest", "similar", "files/adapter_model.safetensors"):
        hidden, absent = api.get(secret + suffix), api.get(missing + suffix)
        assert hidden.status_code == absent.status_code == 404, suffix
        assert hidden.json()["error"]["message"] == absent.json()["error"]["message"].replace("nothing-here", "secret")
    # Counts, listings, search and similar.
    listing = api.get("/api/v1/adapters/?owner=alice").json()
    assert listing["count"] == 2 and _names(api.get("/api/v1/adapters/?owner=alice")) == {"alice/open", "alice/mix"}
    assert "alice/secret" not in _names(api.get("/api/v1/search?q=support tickets"))
    assert "alice/secret" not in _names(api.get("/api/v1/adapters/bob/copy/similar?k=20"))
    # The bytes it holds: only the visible copy is named.
    holders = api.get(f"/api/v1/adapters/by-hash/{scene['secret_sha']}").json()["matches"]
    assert {h["adapter"] for h in holders} == {"bob/copy"}
    updates = api.post("/api/v1/adapters/updates", {"adapters": ["alice/secret@1", "alice/nothing-here@1"]},
                       format="json").json()["results"]
    assert updates[0]["error"] == {key: str(value).replace("nothing-here", "secret")
                                   for key, value in updates[1]["error"].items()}
    # What was made from it: the composition's provenance and the near-duplicate flag leave it out.
    mix = api.get("/api/v1/adapters/alice/mix/").json()
    assert [p["adapter"] for p in mix["provenance"]["parents"]] == ["alice/open"]
    assert "alice/secret" not in str(mix)
    copy = api.get("/api/v1/adapters/bob/copy/").json()
    assert copy["near_duplicate_of"] is None and copy["near_duplicate_similarity"] is None
    assert "alice/secret" not in str(api.get("/api/v1/adapters/").json())
    # Merges that used it, and the owner's jobs.
    for path in (f"/api/v1/merges/{scene['merge_id']}/", f"/api/v1/merges/{scene['merge_id']}/files/config.json"):
        assert api.get(path).status_code == 404
    assert api.get(f"/api/v1/jobs/{scene['job']}/").status_code in (401, 404)
    # Hugging Face-compatible reads: the same answer as for a missing repository.
    expected = 404 if who == "bob" else 401
    for path in ("/api/models/alice/secret", "/api/models/alice/secret/tree/main",
                 "/alice/secret/resolve/main/adapter_config.json", f"/api/models/merges/{scene['merge_id']}"):
        response = api.get(path)
        assert response.status_code == expected and response["X-Error-Code"] == "RepoNotFound", path
        assert "secret" not in response.json()["error"]["message"].replace("alice/secret", "") or path


def test_outsiders_cannot_use_it_as_an_input(scene):
    bob = scene["bob"]
    for target, body in (("compositions", {"method": "linear"}),
                         ("merges", {"base_model": "quiver-demo/tiny-llama"})):
        refused = bob.post(f"/api/v1/{target}/", {**body, "adapters": [{"id": "alice/secret"}]}, format="json")
        absent = bob.post(f"/api/v1/{target}/", {**body, "adapters": [{"id": "alice/nothing-here"}]}, format="json")
        assert refused.status_code == absent.status_code == 400, target
        assert refused.json()["error"]["code"] == absent.json()["error"]["code"] == "adapter_not_found"
        assert refused.json()["error"]["message"] == absent.json()["error"]["message"].replace("nothing-here", "secret")
    # Generation draws on public adapters only: a request names no adapter, and a base without a
    # trained generator answers the same for everyone.
    generation = bob.post("/api/v1/generations/", {"description": "summarise support tickets",
                                                  "base_model": "quiver-demo/tiny-llama"}, format="json")
    assert generation.status_code == 409 and "secret" not in generation.content.decode()
    assert "alice/secret" not in scene["anonymous"].get("/api/v1/generators/").content.decode()


def test_session_writes_need_the_csrf_token_and_token_writes_do_not(make_user, client_for):
    from django.test import Client

    make_user("carol")
    browser = Client(enforce_csrf_checks=True)
    assert browser.login(username="carol", password="pw-carol")
    body = {"base_model": "nobody/nothing", "adapters": [{"id": "carol/none"}]}

    forged = browser.post("/api/v1/merges/", body, content_type="application/json")
    assert forged.status_code == 403 and "CSRF" in forged.json()["error"]["message"]
    browser.get("/account/sign-in/")  # a page that sets the CSRF cookie
    token = browser.cookies["csrftoken"].value
    with_token = browser.post("/api/v1/merges/", body, content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert with_token.status_code == 400  # past CSRF: refused for its content
    assert client_for(None).post("/api/v1/merges/", body, format="json").status_code == 401
