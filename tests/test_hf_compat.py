"""The Hugging Face Hub-compatible API, driven by the real, installed clients (huggingface_hub,
PEFT, transformers) in their own processes with HF_ENDPOINT pointing at a live test server."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, upload_payload, wait_for_job

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_hf_client(script: str, hub_url: str, workdir: Path, args: dict, hf_token: str | None = None) -> dict:
    """Run `script` in a fresh interpreter the way a user would: only HF_ENDPOINT (and HF_TOKEN) point
    it at Quiver; huggingface_hub reads them at import. The script prints one JSON line last."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_TOKEN", "TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(workdir / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=str(ROOT))
    if hf_token:
        env["HF_TOKEN"] = hf_token
    prelude = "import json, sys, hashlib\nfrom pathlib import Path\nargs = json.loads(sys.argv[1])\n"
    completed = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script), json.dumps(args)],
                               cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-6000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture
def alice(make_user):
    return make_user("alice")


DOWNLOADS = """
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)

def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

def error_of(call):
    try:
        call()
    except HfHubHTTPError as error:
        return [type(error).__name__, error.response.status_code]
    return None

repo, cache = args["repo"], args["cache"]
out = {"main": sha(hf_hub_download(repo, "adapter_model.safetensors", cache_dir=cache + "/a"))}
for name, revision in args["revisions"].items():
    out[name] = sha(hf_hub_download(repo, "adapter_model.safetensors", revision=revision, cache_dir=cache + "/b"))
folder = Path(snapshot_download(repo, cache_dir=cache + "/c"))
out["snapshot"] = {path.name: sha(path) for path in folder.iterdir()}
out["snapshot_commit"] = folder.name
info = HfApi().model_info(repo)
out["info"] = {"sha": info.sha, "private": info.private, "library_name": info.library_name,
               "card": info.card_data.to_dict(),
               "siblings": {s.rfilename: [s.size, s.lfs.sha256] for s in info.siblings}}
out["pinned_info_sha"] = HfApi().model_info(repo, revision=args["revisions"]["first_by_commit"]).sha
out["errors"] = {
    "missing_file": error_of(lambda: hf_hub_download(repo, "nope.json", cache_dir=cache + "/d")),
    "missing_revision": error_of(lambda: hf_hub_download(repo, "adapter_config.json", revision="0" * 40,
                                                         cache_dir=cache + "/d")),
    "missing_repo": error_of(lambda: hf_hub_download("nobody/nothing", "adapter_config.json", cache_dir=cache + "/d")),
    "create_repo": error_of(lambda: HfApi().create_repo("alice/new-one")),
    "upload_file": error_of(lambda: HfApi().upload_file(path_or_fileobj=b"{}", path_in_repo="extra.json",
                                                        repo_id=repo)),
}
print(json.dumps(out))
"""


def test_hf_hub_download_snapshot_download_and_model_info_of_adapter_revisions(live_hub, alice, client_for, demo_adapter,
                                                                                tmp_path):
    first, second = demo_adapter("ticket-summarizer"), demo_adapter("sql-from-questions")
    api = client_for(alice)
    # Two revisions of one adapter: main is the latest, older ones stay reachable by commit and by number.
    revision_one = api.post("/api/v1/adapters/", upload_payload(first, name="tickets"), format="multipart").json()
    revision_two = api.post("/api/v1/adapters/", upload_payload(second, name="tickets"), format="multipart").json()
    assert revision_two["revision"] == 2 and revision_one["commit"] != revision_two["commit"]
    weights = {entry["name"]: sha256_file(next(p for p in entry["files"] if p.name == "adapter_model.safetensors"))
               for entry in (first, second)}

    out = run_hf_client(DOWNLOADS, live_hub, tmp_path, {
        "repo": "alice/tickets", "cache": str(tmp_path / "cache"),
        "revisions": {"first_by_commit": revision_one["commit"], "first_by_number": "1",
                      "second_by_short_commit": revision_two["commit"][:12]}})

    assert out["main"] == weights["sql-from-questions"]
    assert out["first_by_commit"] == out["first_by_number"] == weights["ticket-summarizer"]
    assert out["second_by_short_commit"] == weights["sql-from-questions"]
    assert out["snapshot"] == {p.name: sha256_file(p) for p in second["files"]}
    assert out["snapshot_commit"] == out["info"]["sha"] == revision_two["commit"]
    assert out["pinned_info_sha"] == revision_one["commit"]
    assert out["info"]["siblings"] == {p.name: [p.stat().st_size, sha256_file(p)] for p in second["files"]}
    assert out["info"]["private"] is False and out["info"]["library_name"] == "peft"
    # The card pins the base model's revision (the commit over its files) next to the adapter's.
    from hub.models import BaseModel
    from hub.selectors import base_model_commit

    base = BaseModel.objects.get(name="tiny-llama")
    assert out["info"]["card"]["base_model"] == "quiver-demo/tiny-llama"
    assert out["info"]["card"]["base_model_revision"] == base_model_commit(base)
    assert out["errors"] == {
        "missing_file": ["RemoteEntryNotFoundError", 404],
        "missing_revision": ["RevisionNotFoundError", 404],
        "missing_repo": ["RepositoryNotFoundError", 401],  # anonymous: the Hub's answer for missing and private
        "create_repo": ["HfHubHTTPError", 501],
        "upload_file": ["HfHubHTTPError", 501],
    }


def test_resolve_answers_head_and_range_with_the_headers_hub_clients_read(live_hub, demo_adapter):
    from hub.models import Adapter

    path = next(p for p in demo_adapter("ticket-summarizer")["files"] if p.name == "adapter_model.safetensors")
    content, digest = path.read_bytes(), sha256_file(path)
    commit = Adapter.objects.get(name="ticket-summarizer").latest_revision.commit
    url = f"{live_hub}/quiver-demo/ticket-summarizer/resolve/main/adapter_model.safetensors"

    head = requests.head(url, headers={"Accept-Encoding": "identity"}, timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["X-Repo-Commit"] == commit
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{digest}"'
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(content))

    part = requests.get(url, headers={"Range": "bytes=100-163"}, timeout=30)
    assert part.status_code == 206 and part.content == content[100:164]
    assert part.headers["Content-Range"] == f"bytes 100-163/{len(content)}"
    resumed = requests.get(url, headers={"Range": f"bytes={len(content) - 10}-"}, timeout=30)
    assert resumed.status_code == 206 and resumed.content == content[-10:]
    assert requests.get(url, headers={"Range": f"bytes={len(content)}-"}, timeout=30).status_code == 416

    missing = requests.head(url.replace("adapter_model", "nothing"), timeout=30)
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    assert missing.headers["X-Repo-Commit"] == commit


PEFT_AND_MERGE = """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits

base_dir = args["base_dir"]
ids = torch.randint(0, AutoModelForCausalLM.from_pretrained(base_dir).config.vocab_size, (2, 12),
                    generator=torch.Generator().manual_seed(0))
plain = logits(AutoModelForCausalLM.from_pretrained(base_dir), ids)
from_hub = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), args["repo"]), ids)
from_disk_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), args["adapter_dir"])
from_disk = logits(from_disk_model, ids)
merged_in_memory = logits(from_disk_model.merge_and_unload(), ids)
merged_from_hub = logits(AutoModelForCausalLM.from_pretrained(args["merge_repo"]), ids)
base_from_hub = logits(AutoModelForCausalLM.from_pretrained(args["base_repo"]), ids)
print(json.dumps({
    "hub_equals_disk": torch.equal(from_hub, from_disk),
    "adapter_changes_outputs": (from_hub - plain).abs().max().item(),
    "merged_vs_peft": (merged_from_hub - from_disk).abs().max().item(),
    "merged_vs_merge_and_unload": (merged_from_hub - merged_in_memory).abs().max().item(),
    "base_from_hub_equals_local": torch.equal(base_from_hub, plain),
}))
"""


def test_peft_and_transformers_load_adapters_merges_and_bases_through_hf_endpoint(live_hub, celery_worker_process, alice,
                                                                                  client_for, demo_files, demo_adapter,
                                                                                  tmp_path):
    api = client_for(alice)
    response = api.post("/api/v1/merges/", {"base_model": "quiver-demo/tiny-llama",
                                            "adapters": [{"id": "quiver-demo/ticket-summarizer", "weight": 1.0}]},
                        format="json")
    job = wait_for_job(response.json()["id"])
    assert job.state == "succeeded", job.error
    assert job.result["repo_id"] == f"merges/{job.result['merge_id']}"
    base_dir = next(entry["dir"] for entry in demo_files["base_models"] if entry["name"] == "tiny-llama")

    out = run_hf_client(PEFT_AND_MERGE, live_hub, tmp_path, {
        "base_dir": str(base_dir), "repo": "quiver-demo/ticket-summarizer",
        "adapter_dir": str(demo_adapter("ticket-summarizer")["dir"]), "merge_repo": job.result["repo_id"],
        "base_repo": "quiver-demo/tiny-llama"})

    assert out["hub_equals_disk"] is True
    assert out["adapter_changes_outputs"] > 1e-3  # the comparison above is not vacuous
    assert out["merged_vs_peft"] < 1e-4 and out["merged_vs_merge_and_unload"] < 1e-4
    assert out["base_from_hub_equals_local"] is True


PRIVATE = """
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

def attempt(**kwargs):
    try:
        path = hf_hub_download(args["repo"], "adapter_model.safetensors", cache_dir=args["cache"], **kwargs)
    except HfHubHTTPError as error:
        return [type(error).__name__, error.response.status_code]
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

out = {
    "anonymous": attempt(token=False),
    "wrong_token": attempt(token="not-a-quiver-token"),
    "other_user": attempt(token=args["bob_token"]),
    "owner_from_hf_token": attempt(),
}
out["snapshot"] = sorted(p.name for p in Path(snapshot_download(args["repo"], cache_dir=args["cache"])).iterdir())
out["whoami"] = HfApi().whoami()["name"]
print(json.dumps(out))
"""


def test_private_adapter_is_refused_without_its_owners_token_and_served_with_it(live_hub, alice, make_user, client_for,
                                                                               demo_adapter, tmp_path):
    from hub.services.accounts import create_api_token

    entry = demo_adapter("ticket-summarizer")
    created = client_for(alice).post("/api/v1/adapters/", upload_payload(entry, name="secret", visibility="private"),
                                     format="multipart")
    assert created.status_code == 201
    bob = make_user("bob")

    out = run_hf_client(PRIVATE, live_hub, tmp_path, {"repo": "alice/secret", "cache": str(tmp_path / "cache"),
                                                     "bob_token": create_api_token(bob)},
                        hf_token=create_api_token(alice))

    assert out["anonymous"] == ["RepositoryNotFoundError", 401]
    assert out["wrong_token"] == ["HfHubHTTPError", 401]  # the Hub refuses a bad token whatever the repo
    assert out["other_user"] == ["RepositoryNotFoundError", 404]
    weights = next(p for p in entry["files"] if p.name == "adapter_model.safetensors")
    assert out["owner_from_hf_token"] == sha256_file(weights)
    assert out["snapshot"] == sorted(p.name for p in entry["files"])
    assert out["whoami"] == "alice"  # `hf auth whoami` confirms which Quiver user HF_TOKEN is

    # A private repo and a missing one get the same answer: existence is never revealed.
    for headers, status in (({}, 401), ({"Authorization": "Bearer " + create_api_token(bob)}, 404)):
        answers = []
        for repo in ("alice/secret", "alice/never-uploaded"):
            response = requests.get(f"{live_hub}/api/models/{repo}", headers=headers, timeout=30)
            answers.append((response.status_code, response.headers["X-Error-Code"], response.json()["error"]["code"]))
        assert answers[0] == answers[1] == (status, "RepoNotFound", "repo_not_found")


def test_the_merges_namespace_is_reserved_for_merged_checkpoints(demo_bases, demo_adapter, make_user, client_for):
    staff = client_for(make_user("root", is_staff=True))  # staff may write to any namespace but this one
    response = staff.post("/api/v1/adapters/", upload_payload(demo_adapter("ticket-summarizer"), namespace="merges"),
                          format="multipart")
    assert response.status_code == 403 and response.json()["error"]["code"] == "namespace_reserved"
