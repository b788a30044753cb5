"""The `quiver` command-line client, run as a real process against a live test server; with it the
by-hash lookup and the bulk update check end to end."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT

pytestmark = pytest.mark.django_db(transaction=True)


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def quiver(hub_url: str, *args, token: str | None = None, json_output: bool = True, cwd=None):
    """`python -m api.cli ...` (what the `quiver` console script runs): (exit code, stdout as JSON or text, stderr)."""
    command = [sys.executable, "-m", "api.cli", "--endpoint", hub_url, *(["--json"] if json_output else [])]
    command += [*(["--token", token] if token else []), *map(str, args)]
    completed = subprocess.run(command, cwd=cwd or ROOT, capture_output=True, text=True, timeout=600,
                               env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    output = json.loads(completed.stdout) if json_output and completed.stdout.strip() else completed.stdout
    return completed.returncode, output, completed.stderr


@pytest.fixture
def alice_token(make_user):
    from hub.services.accounts import create_api_token

    return create_api_token(make_user("alice"))


def test_console_script_is_declared_and_the_client_imports_no_django():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["quiver"] == "api.cli:main"
    probe = "import sys, api.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'hub', 'torch'}))"
    completed = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert completed.stdout.strip() == "[]", completed.stderr


def test_upload_show_download_and_check_for_updates_from_a_manifest(live_hub, alice_token, demo_adapter, tmp_path):
    from hub.models import BaseModel
    from hub.selectors import base_model_commit

    first, second = demo_adapter("ticket-summarizer"), demo_adapter("sql-from-questions")
    rc, uploaded, _ = quiver(live_hub, "upload", *first["files"], "--name", "alice/tickets", "--base-model",
                             "quiver-demo/tiny-llama", "--tags", "cli,support", "--description", "tickets",
                             token=alice_token)
    assert rc == 0, uploaded
    assert uploaded["id"] == "alice/tickets" and uploaded["revision"] == 1 and uploaded["tags"] == ["cli", "support"]
    rc, found, _ = quiver(live_hub, "search", "tickets", json_output=False)
    assert rc == 0 and any(line.split()[0] == "alice/tickets" and "keywords" in line.split()[1:-1]
                      for line in found.splitlines()), found  # named first, then what matched

    rc, shown, _ = quiver(live_hub, "show", "alice/tickets@1")
    assert rc == 0 and shown["manifest"]["adapter"] == {"id": "alice/tickets", "revision": 1,
                                                        "commit": uploaded["commit"]}

    rc, downloaded, _ = quiver(live_hub, "download", "alice/tickets", "--dir", tmp_path / "tickets")
    assert rc == 0, downloaded
    for path in first["files"]:
        assert sha256_file(tmp_path / "tickets" / path.name) == sha256_file(path)
    manifest = json.loads((tmp_path / "tickets" / "quiver-manifest.json").read_text())
    # The manifest pins the adapter revision and the base model revision it was made for.
    assert manifest["adapter"]["commit"] == uploaded["commit"]
    base = BaseModel.objects.get(name="tiny-llama")
    assert manifest["base_model"] == {"id": "quiver-demo/tiny-llama", "revision": base_model_commit(base),
                                      "weight_fingerprint": base.weight_fingerprint}

    rc, text, _ = quiver(live_hub, "updates", "--manifest", tmp_path / "tickets" / "quiver-manifest.json",
                         json_output=False)
    assert rc == 0 and text.strip() == "alice/tickets: up to date (1)"
    rc, uploaded_again, _ = quiver(live_hub, "upload", *second["files"], "--name", "alice/tickets",
                                   "--base-model", "quiver-demo/tiny-llama", token=alice_token)
    assert rc == 0 and uploaded_again["revision"] == 2

    rc, updates, _ = quiver(live_hub, "updates", "quiver-demo/ticket-summarizer@1", "alice/nothing@1",
                            "alice/tickets", "--manifest", tmp_path / "tickets" / "quiver-manifest.json")
    assert rc == 0
    by_ref = {item["ref"]: item for item in updates["results"]}
    pinned = by_ref[f"alice/tickets@{uploaded['commit']}"]
    assert pinned["update_available"] is True and pinned["current"]["revision"] == 1
    assert [r["revision"] for r in pinned["newer"]] == [2] and pinned["latest"]["commit"] == uploaded_again["commit"]
    assert by_ref["quiver-demo/ticket-summarizer@1"]["update_available"] is False
    assert by_ref["alice/nothing@1"]["error"]["code"] == "adapter_not_found"
    assert by_ref["alice/tickets"]["error"]["code"] == "revision_required"

    # A download cut short resumes with a Range request, and the result is checked against its sha256:
    # resuming after a corrupt partial file keeps the corrupt bytes, so the check must catch it.
    weights = next(p for p in first["files"] if p.name == "adapter_model.safetensors")
    partial = tmp_path / "resumed" / "adapter_model.safetensors.part"
    partial.parent.mkdir()
    partial.write_bytes(weights.read_bytes()[:100])
    rc, resumed, _ = quiver(live_hub, "download", f"alice/tickets@{uploaded['commit'][:10]}", "--dir", partial.parent)
    assert rc == 0 and resumed["adapter"]["revision"] == 1
    assert sha256_file(partial.parent / weights.name) == sha256_file(weights) and not partial.exists()
    (partial.parent / weights.name).unlink()
    partial.write_bytes(b"\0" * 100)
    rc, refused, _ = quiver(live_hub, "download", "alice/tickets@1", "--dir", partial.parent)
    assert rc == 1 and "do not match sha256" in refused["error"]["message"] and not partial.exists()


def test_which_finds_adapters_from_a_file_and_hides_private_ones(live_hub, alice_token, demo_adapter, tmp_path):
    entry = demo_adapter("recipe-steps-dora")
    weights = next(p for p in entry["files"] if p.name == "adapter_model.safetensors")
    rc, _, _ = quiver(live_hub, "upload", *entry["files"], "--name", "alice/recipes-copy", "--base-model",
                      "quiver-demo/tiny-llama", "--visibility", "private", token=alice_token)
    assert rc == 0

    rc, anonymous, _ = quiver(live_hub, "which", weights)
    assert rc == 0 and [(m["adapter"], m["revision"], m["latest"]) for m in anonymous["matches"]] == [
        ("quiver-demo/recipe-steps-dora", 1, True)]
    rc, by_digest, _ = quiver(live_hub, "which", sha256_file(weights))
    assert rc == 0 and by_digest == anonymous
    rc, owner, _ = quiver(live_hub, "which", weights, token=alice_token)
    assert {m["adapter"] for m in owner["matches"]} == {"quiver-demo/recipe-steps-dora", "alice/recipes-copy"}
    assert owner["sha256"] == sha256_file(weights)

    stranger = tmp_path / "adapter_model.safetensors"
    stranger.write_bytes(b"not an adapter anyone registered")
    rc, missing, _ = quiver(live_hub, "which", stranger)
    assert rc == 1 and missing["error"]["code"] == "file_not_registered"
    bad = requests.get(f"{live_hub}/api/v1/adapters/by-hash/xyz", timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_sha256"
    # The update check is no way around visibility either.
    rc, updates, _ = quiver(live_hub, "updates", "alice/recipes-copy@1")
    assert updates["results"][0]["error"]["code"] == "adapter_not_found"


@pytest.mark.slow
def test_compose_merge_and_jobs_follow_background_jobs(live_hub, celery_worker_process, alice_token, tmp_path):
    rc, composed, _ = quiver(live_hub, "compose", "quiver-demo/ticket-summarizer:0.7",
                             "quiver-demo/sql-from-questions@1:-0.3", "--method", "svd", "--param", "rank=16",
                             "--name", "alice/mix", token=alice_token)
    assert rc == 0, composed
    assert composed["state"] == "succeeded" and composed["result"]["name"] == "mix"
    assert composed["result"]["exact"] is True  # rank 16 ≥ 4 + 8

    rc, merged, _ = quiver(live_hub, "merge", "alice/mix", "--base-model", "quiver-demo/tiny-llama", "--download",
                           tmp_path / "merged", token=alice_token)
    assert rc == 0, merged
    result = merged["result"]
    assert result["adapters"][0]["adapter"] == "alice/mix" and result["base_model_revision"]
    for listed in result["files"]:
        assert sha256_file(tmp_path / "merged" / listed["filename"]) == listed["sha256"]
    assert json.loads((tmp_path / "merged" / "quiver-manifest.json").read_text())["repo_id"] == result["repo_id"]

    rc, listed, _ = quiver(live_hub, "jobs", "--kind", "merge", token=alice_token)
    assert rc == 0 and [job["id"] for job in listed["results"]] == [merged["id"]]
    rc, job, _ = quiver(live_hub, "jobs", merged["id"], "--wait", token=alice_token)
    assert rc == 0 and job["state"] == "succeeded" and job["progress"] == 1.0
    rc, refused, _ = quiver(live_hub, "jobs", merged["id"], "--cancel", token=alice_token)
    assert rc == 1 and refused["error"]["code"] == "job_finished"
    from django.contrib.auth import get_user_model

    from hub.models import Job

    queued = Job.objects.create(kind=Job.Kind.MERGE, owner=get_user_model().objects.get(username="alice"))
    rc, cancelled, _ = quiver(live_hub, "jobs", str(queued.id), "--cancel", token=alice_token)
    assert rc == 0 and cancelled["state"] == "cancelled"
    rc, waited, _ = quiver(live_hub, "jobs", str(queued.id), "--wait", token=alice_token)
    assert rc == 1 and waited["error"]["code"] == "job_cancelled"
    rc, text, _ = quiver(live_hub, "show", result["repo_id"], json_output=False)
    assert rc == 0 and "model.safetensors" in text

    rc, text, _ = quiver(live_hub, "merges", token=alice_token, json_output=False)
    assert rc == 0 and text.startswith(result["repo_id"]) and "expires 20" in text
    rc, refused, _ = quiver(live_hub, "merges", "--delete", result["repo_id"])
    assert rc == 1 and refused["error"]["code"] == "not_authenticated"
    rc, deleted, _ = quiver(live_hub, "merges", "--delete", result["repo_id"], token=alice_token)
    assert rc == 0 and deleted == {"deleted": result["repo_id"]}
    rc, text, _ = quiver(live_hub, "merges", token=alice_token, json_output=False)
    assert rc == 0 and text.strip() == "no stored merges"


def test_cli_errors_are_clear(live_hub, alice_token, demo_adapter):
    from django.urls import Resolver404, resolve

    entry = demo_adapter("ticket-summarizer")
    rc, refused, _ = quiver(live_hub, "upload", *entry["files"], "--name", "alice/anonymous")
    assert rc == 1 and refused["error"]["code"] == "not_authenticated"
    rc, _, stderr = quiver(live_hub, "compose", "quiver-demo/ticket-summarizer:heavy", json_output=False)
    assert rc == 1 and "weight after ':' must be a number" in stderr
    rc, _, stderr = quiver(live_hub, "show", "quiver-demo/nothing", json_output=False)
    assert rc == 1 and stderr.startswith("quiver: adapter_not_found:")
    rc, _, stderr = quiver("http://127.0.0.1:9", "show", "a/b", json_output=False)
    assert rc == 1 and "cannot reach Quiver" in stderr

    rc, generated, _ = quiver(live_hub, "generate", "summarize tickets", "--base-model", "nobody/nothing",
                              "--method", "icm-lora", token=alice_token)
    assert rc == 1
    try:
        resolve("/api/v1/generations/")
    except Resolver404:  # not served yet: the client says so instead of printing an HTML page
        assert generated["error"]["code"] in ("http_404", "http_405")
        assert "no such endpoint" in generated["error"]["message"]
    else:  # served: the server's own JSON error about the unknown base model comes through
        assert not generated["error"]["code"].startswith("http_")
