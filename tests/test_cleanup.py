"""The orphan sweep removes unreferenced blobs after the grace period, and nothing else."""
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import upload_payload

pytestmark = pytest.mark.django_db


def test_sweep_removes_blobs_of_deleted_adapters_but_keeps_referenced_ones(demo_bases, demo_adapter, make_user,
                                                                          client_for, settings):
    from hub.blobs import blob_storage
    from hub.models import Blob
    from hub.services.cleanup import sweep_orphan_blobs

    api = client_for(make_user("alice"))
    api.post("/api/v1/adapters/", upload_payload(demo_adapter("ticket-summarizer")), format="multipart")
    api.post("/api/v1/adapters/", upload_payload(demo_adapter("sql-from-questions")), format="multipart")
    doomed = {f["sha256"] for f in api.get("/api/v1/adapters/alice/sql-from-questions/").json()["files"]}
    kept = {f["sha256"] for f in api.get("/api/v1/adapters/alice/ticket-summarizer/").json()["files"]}
    assert api.delete("/api/v1/adapters/alice/sql-from-questions/").status_code == 204
    doomed -= kept  # a config shared byte-for-byte stays referenced

    assert sweep_orphan_blobs() == 0  # younger than the grace period: untouched
    removed = sweep_orphan_blobs(grace=timedelta(0))

    assert removed == len(doomed) > 0
    storage = blob_storage()
    for sha in doomed:
        assert not Blob.objects.filter(sha256=sha).exists()
        assert not storage.exists(Blob(sha256=sha, size=0).storage_key)
    for sha in kept:
        assert Blob.objects.filter(sha256=sha).exists() and storage.exists(Blob(sha256=sha, size=0).storage_key)
    assert api.get("/api/v1/adapters/alice/ticket-summarizer/files/adapter_model.safetensors").status_code == 200
    assert all(b.sha256 in kept or Path(storage.path(b.storage_key)).exists() for b in Blob.objects.all())
