"""Base models through the REST API: single file and shards with their index."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.conftest import stored_state

pytestmark = pytest.mark.django_db


def _upload(api, folder: Path, name: str, extra: dict | None = None):
    files = [SimpleUploadedFile(p.name, p.read_bytes()) for p in sorted(folder.iterdir())
             if p.suffix in (".json", ".safetensors") and p.name != "generation_config.json"]
    return api.post("/api/v1/base-models/", {"files": files, "namespace": "alice", "name": name, **(extra or {})},
                    format="multipart")


def test_single_file_and_sharded_base_models(tmp_path, make_user, client_for):
    from hub.demo.builders import build_tiny_llama

    api = client_for(make_user("alice"))
    single = build_tiny_llama(tmp_path / "single", seed=3)
    sharded = build_tiny_llama(tmp_path / "sharded", seed=3, max_shard_size="100KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1

    first = _upload(api, single, "tiny-single")
    second = _upload(api, sharded, "tiny-sharded", {"description": "Same weights, in shards."})

    assert first.status_code == 201, first.json()
    assert second.status_code == 201, second.json()
    one, many = first.json(), second.json()
    assert one["architecture"] == many["architecture"] == "LlamaForCausalLM"
    assert one["module_shapes"] == many["module_shapes"]
    assert one["parameter_count"] == many["parameter_count"] > 0
    assert "model.safetensors.index.json" in {f["filename"] for f in many["files"]}
    for listed in many["files"]:
        downloaded = b"".join(api.get(f"/api/v1/base-models/alice/tiny-sharded/files/{listed['filename']}").streaming_content)
        assert hashlib.sha256(downloaded).hexdigest() == listed["sha256"]
    assert api.get("/api/v1/base-models/").json()["count"] == 2
    assert _upload(api, single, "tiny-single").status_code == 409


def test_bad_base_model_is_refused_and_stores_nothing(tmp_path, make_user, client_for):
    from hub.demo.builders import build_tiny_llama

    api = client_for(make_user("alice"))
    folder = build_tiny_llama(tmp_path / "base", seed=4)
    before = stored_state()
    weights = (folder / "model.safetensors").read_bytes()
    cases = {
        "no config": [SimpleUploadedFile("model.safetensors", weights)],
        "bad config": [SimpleUploadedFile("config.json", b"[1, 2]"), SimpleUploadedFile("model.safetensors", weights)],
        "pickle": [SimpleUploadedFile("config.json", (folder / "config.json").read_bytes()),
                   SimpleUploadedFile("pytorch_model.bin", weights)],
        "truncated": [SimpleUploadedFile("config.json", (folder / "config.json").read_bytes()),
                      SimpleUploadedFile("model.safetensors", weights[:1000])],
    }
    for label, files in cases.items():
        response = api.post("/api/v1/base-models/", {"files": files, "namespace": "alice", "name": "b"},
                            format="multipart")
        assert 400 <= response.status_code < 500, label
        assert response.json()["error"]["code"], label
    assert stored_state() == before
